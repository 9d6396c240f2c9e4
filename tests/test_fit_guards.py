"""Bad input and stops before the first step: each is a named error or a clean exit."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
from conftest import MLP, make_trainer

from jaxfit import Callback, ConfigError, DataError, Preempted, ShapeError


def test_one_callback_instead_of_a_list_is_a_clear_error(data):
    class Noop(Callback):
        pass

    with pytest.raises(ConfigError, match=r"callbacks= takes a list, got one Noop: callbacks=\[Noop\(...\)\]"):
        make_trainer().fit(MLP(), data, epochs=1, callbacks=Noop(), verbose=0)


def test_integer_labels_out_of_range_are_refused_before_training(data):
    x, y = data
    with pytest.raises(DataError, match=r"labels range from 0 to 7, but the model has 3 outputs"):
        make_trainer().fit(MLP(), (x, np.where(y == 2, 7, y)), epochs=1, verbose=0)
    with pytest.raises(DataError, match=r"labels range from -1 to 1"):
        make_trainer().fit(MLP(), (x, np.where(y == 2, -1, y)), epochs=1, verbose=0)


def test_validation_data_of_another_width_names_the_validation_data(data):
    x, y = data
    with pytest.raises(ShapeError, match=r"validation data does not fit the model"):
        make_trainer().fit(MLP(), (x, y), validation_data=(x[:, :3], y), epochs=1, verbose=0)


def test_a_second_fit_with_a_total_already_reached_says_so(data):
    trainer = make_trainer()
    trainer.fit(MLP(), data, epochs=2, batch_size=16, verbose=0)
    with pytest.warns(UserWarning, match=r"nothing to train: the run has completed 2 epochs and epochs=1 is the total"):
        trainer.fit(epochs=1)
    assert trainer.step == 10


def test_sigterm_during_setup_stops_before_the_first_step_and_says_nothing_was_due(data):
    class TermInSetup(Callback):
        def setup(self, trainer):
            os.kill(os.getpid(), signal.SIGTERM)  # arrives before any init or compile

    previous = signal.getsignal(signal.SIGTERM)
    trainer = make_trainer()
    with pytest.raises(Preempted, match="before its first step: nothing was trained") as info:
        trainer.fit(MLP(), data, epochs=2, batch_size=16, callbacks=[TermInSetup()], verbose=0)
    assert info.value.code == 143
    assert trainer.step == 0
    assert signal.getsignal(signal.SIGTERM) is previous


def test_a_wrong_loss_signature_names_the_accepted_forms():
    import optax

    from jaxfit import Trainer

    with pytest.raises(ConfigError, match=r"loss bad takes 1 required positional.*fn\(outputs, targets\).*"
                                          r"fn\(model, batch, ctx\).*Trainer\(step=MyStep\(\)\)"):
        def bad(outputs):
            return outputs

        Trainer(optax.sgd(0.1), loss=bad)


def test_metrics_with_a_full_form_loss_are_refused():
    import optax

    from jaxfit import Trainer

    def loss(model, batch, ctx):
        return 0.0

    with pytest.raises(ConfigError, match=r"full-form loss fn\(model, batch, ctx\) returns its metrics itself"):
        Trainer(optax.sgd(0.1), loss=loss, metrics=["accuracy"])


def test_a_fit_failing_before_it_starts_releases_the_run_directory(tmp_path, data):
    from jaxfit.callbacks import ModelCheckpoint

    x, y = data
    ckpt = ModelCheckpoint(tmp_path / "run")
    with pytest.raises(ShapeError):  # fails after setup took the lock, before on_fit_start
        make_trainer().fit(MLP(), (x, y), validation_data=(x[:, :3], y), epochs=1, callbacks=[ckpt], verbose=0)
    # Another trainer in this process may now write there: the lock was released in teardown.
    make_trainer().fit(MLP(), (x, y), epochs=1, batch_size=16, verbose=0,
                       callbacks=[ModelCheckpoint(tmp_path / "run")])
    assert any(p.name.startswith("ckpt-") for p in (tmp_path / "run").iterdir())


def test_labels_of_an_iterables_first_batch_are_checked_and_the_message_says_so(data):
    x, y = data
    batches = [(x[:16], np.where(y[:16] == 2, 5, y[:16])), (x[16:32], y[16:32])]
    with pytest.raises(DataError, match=r"checked on the iterable's first batch only.*range from 0 to 5"):
        make_trainer().fit(MLP(), batches, epochs=1, verbose=0)


def test_validation_split_holds_out_the_last_fraction_before_shuffling(data):
    x, y = data  # 70 samples: Keras keeps floor(70 * 0.8) = 56 for training
    a, b = make_trainer(), make_trainer()
    a.fit(MLP(), (x, y), validation_split=0.2, epochs=2, batch_size=16, verbose=0)
    b.fit(MLP(), (x[:56], y[:56]), validation_data=(x[56:], y[56:]), epochs=2, batch_size=16, verbose=0)
    assert a.history.history == b.history.history
    assert a.step == 8  # 56 samples in batches of 16


def test_validation_split_needs_array_data_and_no_validation_data(data):
    x, y = data
    with pytest.raises(ConfigError, match="validation_data= or validation_split=, not both"):
        make_trainer().fit(MLP(), (x, y), validation_data=(x, y), validation_split=0.1, verbose=0)
    with pytest.raises(ConfigError, match="works on array data"):
        make_trainer().fit(MLP(), [(x, y)], validation_split=0.1, verbose=0)
    with pytest.raises(ConfigError, match="fraction between 0 and 1"):
        make_trainer().fit(MLP(), (x, y), validation_split=1.5, verbose=0)
