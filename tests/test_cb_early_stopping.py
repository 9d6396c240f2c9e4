"""EarlyStopping: Keras 3's decision table, restore_best, the stop reason, state on resume."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
from cb_helpers import leaves, resume, tiny_data
from conftest import MLP, make_trainer

from jaxfit import ConfigError, MonitorError
from jaxfit.callbacks import EarlyStopping, LambdaCallback


def run_table(stop, values):
    """Feed epoch values; the epoch at which the callback asked to stop (or None)."""
    trainer = SimpleNamespace(epoch=0, step=0, stop_training=False, stop_reason=None)
    for epoch, v in enumerate(values, start=1):
        trainer.epoch = epoch
        stop.on_epoch_end(trainer, {"loss": v})
        if trainer.stop_training:
            assert trainer.stop_reason == "early_stopping"
            return epoch
    return None


# (kwargs, monitored values per epoch, epoch at which training stops)
TABLE = {
    "patience 0 stops at the first non-improving epoch": (dict(), [3, 2, 2, 1], 3),
    "patience 2": (dict(patience=2), [3, 2, 2, 2, 1], 4),
    "an improvement resets wait": (dict(patience=2), [3, 2, 2, 1, 1, 0.5, 0.5, 0.5], 8),
    "min_delta": (dict(patience=2, min_delta=0.5), [3, 2.8, 2.4, 2.3, 2.2], 5),
    "never stops while improving": (dict(patience=0), [5, 4, 3, 2, 1], None),
    "the first epoch never stops": (dict(patience=0), [math.nan, 1, 1], 3),
    "start_from_epoch ignores warm-up epochs": (dict(start_from_epoch=2), [1, 2, 3, 3], 4),
    "patience 1 is patience 0 (Keras 3)": (dict(patience=1), [3, 2, 2, 1], 3),
    "negative values, min": (dict(patience=2), [-1, -2, -1.5, -1.9, -1.95], 4),
    "negative values, max": (dict(patience=2, mode="max"), [-5, -4, -4.5, -4.2], 4),
    "baseline not beaten: wait keeps growing while improving": (
        dict(patience=2, baseline=0.5),
        [3, 2, 1, 1],
        4,
    ),
    "same values without a baseline": (dict(patience=2), [3, 2, 1, 1], None),
    "baseline beaten": (dict(patience=2, baseline=2.5), [3, 2, 1.9, 1.9, 1.9], 5),
    # Keras 3 takes the first monitored value as the first best, +inf or -inf included:
    # the first epoch is an improvement and does not count towards patience.
    "a first +inf is the first best, min": (dict(patience=2), [math.inf] * 5, 3),
    "a first -inf is the first best, max": (dict(patience=2, mode="max"), [-math.inf] * 5, 3),
    "a first +inf then finite values, min": (dict(patience=2), [math.inf, 5, 5, 5], 4),
    "a first -inf in min mode is never beaten": (dict(patience=2), [-math.inf, 1, 0], 3),
    "a first +inf, patience 1": (dict(patience=1), [math.inf, math.inf], 2),
    "a first +inf, start_from_epoch": (
        dict(patience=2, start_from_epoch=1),
        [1, math.inf, math.inf, math.inf],
        4,
    ),
    "a first +inf does not beat a baseline": (
        dict(patience=2, baseline=1.0),
        [math.inf, 2, 2],
        3,
    ),
}


@pytest.mark.parametrize("kwargs, values, stopped_at", TABLE.values(), ids=TABLE.keys())
def test_decision_table(kwargs, values, stopped_at):
    stop = EarlyStopping(**dict(dict(monitor="loss"), **kwargs))
    assert run_table(stop, values) == stopped_at
    if stopped_at:
        assert stop.stopped_epoch == stopped_at


def snapshots():
    """A callback keeping a host copy of the params at every epoch end."""
    kept = {}
    return kept, LambdaCallback(
        order=100, on_epoch_end=lambda t, logs: kept.__setitem__(t.epoch, leaves(t.params))
    )


def test_restore_best_puts_the_best_epochs_weights_back_after_an_early_stop():
    kept, snap = snapshots()
    trainer = make_trainer()
    # Training lowers val_loss every epoch: in "max" mode epoch 1 is the best.
    stop = EarlyStopping(monitor="val_loss", mode="max", patience=2, restore_best=True)
    history = trainer.fit(
        MLP(),
        tiny_data(),
        validation_data=tiny_data(16, seed=1),
        epochs=10,
        batch_size=16,
        callbacks=[stop, snap],
    )
    assert trainer.stop_reason == "early_stopping" and len(history.history["loss"]) == 3
    assert stop.best_epoch == 1
    for got, best, last in zip(leaves(trainer.params), kept[1], kept[3], strict=True):
        np.testing.assert_array_equal(got, best)
        assert not np.array_equal(got, last)


def test_restore_best_also_applies_when_all_epochs_ran():
    kept, snap = snapshots()
    trainer = make_trainer()
    stop = EarlyStopping(monitor="val_loss", mode="max", patience=10, restore_best=True)
    trainer.fit(
        MLP(),
        tiny_data(),
        validation_data=tiny_data(16, seed=1),
        epochs=3,
        batch_size=16,
        callbacks=[stop, snap],
    )
    assert trainer.stop_reason is None
    for got, best in zip(leaves(trainer.params), kept[1], strict=True):
        np.testing.assert_array_equal(got, best)


def test_without_restore_best_the_last_weights_stay():
    kept, snap = snapshots()
    trainer = make_trainer()
    trainer.fit(
        MLP(),
        tiny_data(),
        validation_data=tiny_data(16, seed=1),
        epochs=10,
        batch_size=16,
        callbacks=[EarlyStopping(monitor="val_loss", mode="max", patience=1), snap],
    )
    for got, last in zip(leaves(trainer.params), kept[2], strict=True):
        np.testing.assert_array_equal(got, last)


def test_state_with_best_weights_survives_a_resume():
    kept, snap = snapshots()
    trainer = make_trainer()
    stop = EarlyStopping(monitor="val_loss", mode="max", patience=3, restore_best=True)
    trainer.fit(
        MLP(),
        tiny_data(),
        validation_data=tiny_data(16, seed=1),
        epochs=2,
        batch_size=16,
        callbacks=[stop, snap],
    )
    resumed = resume(trainer)
    resumed.fit(epochs=10)
    stop2 = resumed.callbacks.find(EarlyStopping)[0]
    assert stop2 is not stop
    # wait carried over (1 after epoch 2): it reaches 3 at epoch 4; a fresh count would
    # have stopped at epoch 5.
    assert resumed.stop_reason == "early_stopping" and stop2.stopped_epoch == 4
    for got, best in zip(leaves(resumed.params), kept[1], strict=True):
        np.testing.assert_array_equal(got, best)


def test_state_dict_is_plain_data():
    stop = EarlyStopping(monitor="loss", patience=2)
    run_table(stop, [3, 2, 2])
    fresh = EarlyStopping(monitor="loss", patience=2)
    fresh.load_state_dict(stop.state_dict())
    assert fresh.state_dict() == {
        "best": 2.0,
        "has_best": True,
        "wait": 1,
        "best_epoch": 2,
        "stopped_epoch": 0,
        "best_step": 0,
        "stopped_step": 0,
        "best_weights": None,
    }


def test_a_first_inf_best_survives_a_resume():
    # best == +inf is also the start value: only has_best tells a resumed callback that the
    # first epoch was already taken as the best (and so does not count it again).
    stop = EarlyStopping(monitor="loss", patience=2)
    run_table(stop, [math.inf])
    fresh = EarlyStopping(monitor="loss", patience=2)
    fresh.load_state_dict(stop.state_dict())
    assert (fresh.best, fresh.has_best, fresh.wait) == (math.inf, True, 0)
    trainer = SimpleNamespace(epoch=2, step=0, stop_training=False, stop_reason=None)
    fresh.on_epoch_end(trainer, {"loss": math.inf})
    assert fresh.wait == 1 and not trainer.stop_training


def test_a_checkpoint_without_has_best_infers_it_from_best():
    fresh = EarlyStopping(monitor="loss", patience=2)
    old = {"best": 2.0, "wait": 1, "best_epoch": 2, "stopped_epoch": 0, "best_weights": None}
    fresh.load_state_dict(old)
    assert fresh.has_best
    fresh.load_state_dict(dict(old, best=math.inf))
    assert not fresh.has_best


def test_a_new_run_resets_the_state():
    stop = EarlyStopping(monitor="loss", patience=0)
    run_table(stop, [3, 2, 2])
    stop.on_fit_start(SimpleNamespace(step=0, check_monitor=lambda name, owner: None))
    assert (stop.best, stop.has_best, stop.wait, stop.stopped_epoch) == (math.inf, False, 0, 0)


def test_unknown_monitor_fails_at_fit_start():
    with pytest.raises(
        MonitorError, match="EarlyStopping monitors 'val_accuracy'.*validation_data"
    ):
        make_trainer().fit(
            MLP(), tiny_data(), epochs=1, callbacks=[EarlyStopping(monitor="val_accuracy")]
        )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(patience=-1), "patience must be an integer >= 0"),
        (dict(start_from_epoch=1.0), "start_from_epoch must be an integer >= 0"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        EarlyStopping(**kwargs)
