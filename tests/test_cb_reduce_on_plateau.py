"""ReduceOnPlateau: Keras's decision table, composition with LRScheduler, checks, state."""

from __future__ import annotations

import math

import numpy as np
import optax
import pytest
from cb_helpers import ready_trainer, resume, tiny_data
from conftest import MLP, make_trainer

from jaxfit import ConfigError, HyperparamError, MonitorError
from jaxfit.callbacks import LambdaCallback, LRScheduler, ReduceOnPlateau


@pytest.fixture(scope="module")
def trainer():
    return ready_trainer()


def run_table(trainer, plateau, values):
    """Feed epoch values to the callback; the learning rate after each epoch."""
    trainer.hyperparams["learning_rate"] = 1.0
    plateau.on_fit_start(trainer)
    lrs = []
    for v in values:
        plateau.on_epoch_end(trainer, {"loss": v})
        lrs.append(trainer.hyperparams["learning_rate"])
    return lrs


# (kwargs, monitored values per epoch, reductions made by the end of each epoch)
TABLE = {
    "patience 2": (dict(patience=2), [1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 2, 2]),
    "patience 0 reduces at every non-improving epoch": (dict(patience=0), [1, 1, 1], [0, 1, 2]),
    "an improvement resets wait": (dict(patience=1), [3, 2, 2, 1, 1], [0, 0, 1, 1, 2]),
    "min_delta": (dict(patience=1, min_delta=0.5), [3, 2.6, 2.4, 1.0], [0, 1, 1, 1]),
    "cooldown": (dict(patience=1, cooldown=2), [1, 1, 1, 1, 1, 1], [0, 1, 1, 2, 2, 3]),
    "cooldown epochs still record a new best": (
        dict(patience=1, cooldown=1),
        [5, 5, 4, 4],
        [0, 1, 1, 2],
    ),
    "negative values, min": (dict(patience=1), [-1, -2, -2, -3], [0, 0, 1, 1]),
    "negative values, max": (dict(patience=1, mode="max"), [-5, -4, -4, -4], [0, 0, 1, 2]),
    "NaN is no improvement": (dict(patience=1), [1, math.nan, 0.5], [0, 1, 1]),
    # Keras's ReduceLROnPlateau starts from best = +inf / -inf (unlike its EarlyStopping):
    # a first value equal to it is no improvement and counts towards patience.
    "a first +inf counts towards patience, min": (
        dict(patience=2), [math.inf, math.inf, math.inf, math.inf], [0, 1, 1, 2]),
    "a first -inf counts towards patience, max": (
        dict(patience=2, mode="max"), [-math.inf, -math.inf, -math.inf], [0, 1, 1]),
    "a first +inf, then an improvement resets wait": (
        dict(patience=2), [math.inf, 5, 5, 5], [0, 0, 0, 1]),
    "a first -inf in min mode is never beaten": (
        dict(patience=1), [-math.inf, 1, 0], [0, 1, 2]),
}


@pytest.mark.parametrize("kwargs, values, reductions", TABLE.values(), ids=TABLE.keys())
def test_decision_table(trainer, kwargs, values, reductions):
    kwargs = dict(dict(monitor="loss", factor=0.5, min_delta=0.0), **kwargs)
    lrs = run_table(trainer, ReduceOnPlateau(**kwargs), values)
    assert lrs == [0.5**n for n in reductions]


def test_min_lr_clips_the_last_reduction_then_stops_reducing(trainer):
    plateau = ReduceOnPlateau(monitor="loss", factor=0.5, patience=0, min_lr=0.3)
    lrs = run_table(trainer, plateau, [1, 1, 1, 1, 1])
    np.testing.assert_allclose(lrs, [1.0, 0.5, 0.3, 0.3, 0.3], rtol=1e-6)
    assert plateau.reductions == 2
    # At min_lr no reduction happens, so wait is not reset (Keras): it keeps counting.
    assert plateau.wait == 2


def test_state_dict_round_trip_restores_the_counters(trainer):
    a = ReduceOnPlateau(monitor="loss", factor=0.5, patience=1, cooldown=3)
    run_table(trainer, a, [2, 2, 2])
    b = ReduceOnPlateau(monitor="loss", factor=0.5, patience=1, cooldown=3)
    b.load_state_dict(a.state_dict())
    assert (
        b.state_dict()
        == a.state_dict()
        == {
            "best": 2.0,
            "wait": 0,
            "cooldown_counter": 2,
            "reductions": 1,
            "total_factor": 0.5,
        }
    )


def record_lr(values):
    return LambdaCallback(
        on_train_batch_end=lambda t, logs: values.append(t.hyperparams["learning_rate"])
    )


def test_with_lrscheduler_every_step_uses_schedule_times_plateau_factor():
    x, y = tiny_data()
    schedule = optax.warmup_cosine_decay_schedule(0.0, 0.1, 3, 20, end_value=0.01)
    used = []
    trainer = make_trainer()
    # min_delta so large that nothing after the first epoch improves: a reduction at the
    # end of epochs 2, 3, 4 and 5.
    plateau = ReduceOnPlateau(monitor="loss", factor=0.5, patience=0, min_delta=1e9)
    trainer.fit(
        MLP(),
        (x, y),
        epochs=5,
        batch_size=16,
        shuffle=False,
        callbacks=[plateau, LRScheduler(schedule), record_lr(used)],
    )
    reductions = [0] * 4 + [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4  # per step, 4 steps an epoch
    expected = [np.float32(schedule(k)) * np.float32(0.5**n) for k, n in enumerate(reductions)]
    np.testing.assert_allclose(used, expected, rtol=1e-6)
    assert plateau.reductions == 4 and trainer.hyperparams.scale("learning_rate") == 0.0625


def test_with_lrscheduler_min_lr_bounds_the_reduction_at_the_time_it_is_made():
    x, y = tiny_data()
    used = []
    trainer = make_trainer()
    plateau = ReduceOnPlateau(monitor="loss", factor=0.1, patience=0, min_delta=1e9, min_lr=0.05)
    trainer.fit(
        MLP(),
        (x, y),
        epochs=3,
        batch_size=16,
        callbacks=[LRScheduler(optax.constant_schedule(0.2)), plateau, record_lr(used)],
    )
    # End of epoch 2: 0.2 * 0.1 would fall below 0.05, so the scale becomes 0.05 / 0.2.
    np.testing.assert_allclose(used, [0.2] * 8 + [0.05] * 4, rtol=1e-6)
    np.testing.assert_allclose(trainer.hyperparams.scale("learning_rate"), 0.25, rtol=1e-6)


def test_state_survives_a_resume_mid_plateau():
    x, y = tiny_data()

    def run(epochs_first):
        trainer = make_trainer()
        plateau = ReduceOnPlateau(monitor="loss", factor=0.5, patience=2, cooldown=1, min_delta=1e9)
        trainer.fit(MLP(), (x, y), epochs=epochs_first, batch_size=16, callbacks=[plateau])
        if epochs_first < 6:
            trainer = resume(trainer)
            trainer.fit(epochs=6)
        return trainer, trainer.callbacks.find(ReduceOnPlateau)[0]

    straight, p1 = run(6)
    resumed, p2 = run(3)
    assert p2 is not p1 and p2.state_dict() == p1.state_dict()
    # Reductions at the end of epochs 3 (the resume point) and 5.
    assert p2.reductions == 2 and p2.wait == 1 and p2.cooldown_counter == 0
    assert (
        resumed.hyperparams["learning_rate"]
        == straight.hyperparams["learning_rate"]
        == np.float32(0.025)
    )


def test_unknown_monitor_fails_at_fit_start_listing_the_logs():
    x, y = tiny_data()
    with pytest.raises(
        MonitorError,
        match="ReduceOnPlateau monitors 'val_loss'.*Available: loss, accuracy.*validation_data",
    ):
        make_trainer().fit(MLP(), (x, y), epochs=1, callbacks=[ReduceOnPlateau()])


def test_hyperparameter_that_is_not_injected_fails_at_fit_start():
    x, y = tiny_data()
    trainer = make_trainer(optimizer=optax.sgd(0.1))
    with pytest.raises(
        HyperparamError, match="'learning_rate' is not injected.*inject_hyperparams"
    ):
        trainer.fit(MLP(), (x, y), epochs=1, callbacks=[ReduceOnPlateau(monitor="loss")])
    assert trainer.step == 0


def test_hyperparameter_injected_as_a_schedule_fails_at_fit_start():
    x, y = tiny_data()
    trainer = make_trainer(
        optimizer=optax.inject_hyperparams(optax.sgd)(learning_rate=optax.constant_schedule(0.1))
    )
    with pytest.raises(
        HyperparamError, match="ReduceOnPlateau writes 'learning_rate'.*injected as a schedule"
    ):
        trainer.fit(MLP(), (x, y), epochs=1, callbacks=[ReduceOnPlateau(monitor="loss")])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(factor=1.0), r"factor must be in the range \(0, 1\), got factor = 1.0"),
        (dict(factor=0), r"factor must be in the range \(0, 1\), got factor = 0"),
        (dict(patience=-1), "patience must be an integer >= 0, got patience = -1"),
        (dict(cooldown=1.5), "cooldown must be an integer >= 0, got cooldown = 1.5"),
        (dict(min_lr=-1e-3), "min_lr must be a number >= 0.0, got min_lr = -0.001"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ReduceOnPlateau(**kwargs)
