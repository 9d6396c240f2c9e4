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
