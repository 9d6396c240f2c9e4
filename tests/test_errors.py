"""Bad input fails before any training, with a message that says what and how to fix it."""

from __future__ import annotations

import flax.linen as nn
import numpy as np
import pytest
from conftest import MLP, Recorder, make_trainer

from jaxfit import Callback, ConfigError, DataError, MonitorError, ShapeError, Trainer


def _no_training(rec: Recorder) -> bool:
    return not any(h == "batch_end" for h, _, _ in rec.calls)


def test_mismatched_lengths_name_both(data):
    x, y = data
    with pytest.raises(DataError, match=r"same number of samples.*x has 70.*y has 69"):
        make_trainer().fit(MLP(), (x, y[:-1]), epochs=1)


def test_empty_data():
    with pytest.raises(DataError, match="empty"):
        make_trainer().fit(MLP(), (np.zeros((0, 4), np.float32), np.zeros((0,), np.int32)), epochs=1)


def test_empty_iterable():
    with pytest.raises(DataError, match="empty"):
        make_trainer().fit(MLP(), [], epochs=1)


@pytest.mark.parametrize("bs", [0, -3, 2.5, True])
def test_bad_batch_size(data, bs):
    x, y = data
    with pytest.raises(DataError, match=r"batch_size must be a positive integer"):
        make_trainer().fit(MLP(), (x, y), batch_size=bs)


def test_unknown_loss_lists_known_ones():
    with pytest.raises(ConfigError, match=r"unknown loss 'cross_entropy'.*softmax_cross_entropy"):
        Trainer(optimizer=__import__("optax").sgd(0.1), loss="cross_entropy")


def test_unknown_metric_lists_known_ones():
    with pytest.raises(ConfigError, match=r"unknown metric 'acc'.*accuracy.*top_<k>_accuracy"):
        make_trainer(metrics=["acc"])


def test_model_outputs_that_do_not_fit_the_targets_say_both_shapes(data):
    x, y = data
    one_hot = np.eye(3, dtype=np.float32)[y]
    with pytest.raises(ShapeError, match=r"outputs have shape \(16, 5\) but targets have shape \(16, 3\)"):
        make_trainer().fit(MLP(classes=5), (x, one_hot), batch_size=16)


def test_regression_shape_mismatch(data):
    x, _ = data
    trainer = Trainer(optimizer=__import__("optax").sgd(0.1), loss="mse")
    with pytest.raises(ShapeError, match=r"model outputs have shape \(16, 3\) but targets have shape \(16, 2\)"):
        trainer.fit(nn.Dense(3), (x, np.zeros((70, 2), np.float32)), batch_size=16)


def test_non_numeric_data(data):
    x, _ = data
    with pytest.raises(DataError, match=r"dtype <U3.*numeric"):
        make_trainer().fit(MLP(), (x, np.array(["cat"] * 70)), batch_size=16)


def test_one_shot_generator_is_refused(data):
    x, y = data

    def gen():
        yield x[:16], y[:16]

    with pytest.raises(DataError, match=r"one-shot iterator.*data=make_batches, not make_batches\(\)"):
        make_trainer().fit(MLP(), gen(), epochs=2)


class Monitors(Callback):
    def __init__(self, name):
        self.name = name

    def on_fit_start(self, trainer):
        trainer.check_monitor(self.name, self)


def test_monitoring_a_missing_metric_lists_what_exists(data):
    x, y = data
    rec = Recorder()
    with pytest.raises(MonitorError, match=r"Monitors monitors 'val_acc'.*Available: loss, accuracy, val_loss, val_accuracy"):
        make_trainer().fit(MLP(), (x, y), validation_data=(x, y), epochs=1, callbacks=[Monitors("val_acc"), rec])
    assert _no_training(rec)


def test_monitoring_val_metric_without_validation_data_says_so(data):
    x, y = data
    with pytest.raises(MonitorError, match=r"`val_` metrics exist only when fit gets validation_data="):
        make_trainer().fit(MLP(), (x, y), epochs=1, callbacks=[Monitors("val_loss")])


def test_optimizer_must_be_optax():
    with pytest.raises(ConfigError, match="optax GradientTransformation"):
        Trainer(optimizer="adam")


def test_fit_without_model_or_data():
    with pytest.raises(ConfigError, match="needs a model"):
        make_trainer().fit()
    with pytest.raises(DataError, match="needs training data"):
        make_trainer().fit(MLP())


def test_model_type_is_checked(data):
    x, y = data
    with pytest.raises(ConfigError, match="flax.linen.Module or a flax.nnx.Module"):
        make_trainer().fit(lambda x: x, (x, y))
