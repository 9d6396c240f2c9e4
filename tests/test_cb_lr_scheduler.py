"""LRScheduler: the same training as optax-native scheduling, on the device, no recompiles."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from cb_helpers import compile_count, leaves, resume, tiny_data
from conftest import MLP, make_trainer

from jaxfit import ConfigError, HyperparamError
from jaxfit.callbacks import LambdaCallback, LRScheduler, ReduceOnPlateau

# The 13 schedules of the Flax learning-rate-schedules tutorial, sized for a 20-step run.
SCHEDULES = {
    "constant": optax.constant_schedule(0.05),
    "cosine_decay": optax.cosine_decay_schedule(0.1, decay_steps=16, alpha=0.1),
    "cosine_onecycle": optax.cosine_onecycle_schedule(transition_steps=20, peak_value=0.1),
    "exponential_decay": optax.exponential_decay(
        0.1, transition_steps=4, decay_rate=0.5, transition_begin=2, staircase=True
    ),
    "linear_onecycle": optax.linear_onecycle_schedule(transition_steps=20, peak_value=0.1),
    "linear": optax.linear_schedule(0.1, 0.01, transition_steps=16),
    "piecewise_constant": optax.piecewise_constant_schedule(0.1, {4: 0.5, 10: 0.2}),
    "piecewise_interpolate": optax.piecewise_interpolate_schedule("cosine", 0.1, {4: 0.5, 10: 0.2}),
    "polynomial": optax.polynomial_schedule(0.1, 0.01, power=2, transition_steps=16),
    "warmup_cosine_decay": optax.warmup_cosine_decay_schedule(0.0, 0.1, 4, 20, end_value=0.01),
    "warmup_exponential_decay": optax.warmup_exponential_decay_schedule(
        0.0, 0.1, 4, transition_steps=4, decay_rate=0.5
    ),
    "join_schedules": optax.join_schedules(
        [optax.linear_schedule(0.0, 0.1, 4), optax.cosine_decay_schedule(0.1, 16)], [4]
    ),
    "sgdr": optax.sgdr_schedule(
        [
            dict(init_value=0.0, peak_value=0.1, warmup_steps=2, decay_steps=10),
            dict(init_value=0.0, peak_value=0.05, warmup_steps=2, decay_steps=10),
        ]
    ),
}


def train(optimizer, callbacks=(), epochs=5, **fit):
    trainer = make_trainer(optimizer=optimizer, **fit.pop("trainer", {}))
    trainer.fit(
        MLP(),
        tiny_data(),
        epochs=epochs,
        batch_size=16,
        shuffle=False,
        callbacks=list(callbacks),
        **fit,
    )
    return trainer


def record_lr(values, name="learning_rate"):
    return LambdaCallback(on_train_batch_end=lambda t, logs: values.append(t.hyperparams[name]))


@pytest.mark.slow
@pytest.mark.parametrize("name", SCHEDULES)
def test_matches_optax_native_scheduling(name):
    schedule = SCHEDULES[name]
    native = train(optax.inject_hyperparams(optax.adam)(learning_rate=schedule))
    ours = train(optax.inject_hyperparams(optax.adam)(learning_rate=0.0), [LRScheduler(schedule)])
    for a, b in zip(leaves(native.params), leaves(ours.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # Both hold the value the last step (step 19) used.
    np.testing.assert_allclose(
        ours.hyperparams["learning_rate"], native.hyperparams["learning_rate"], rtol=1e-6
    )
    np.testing.assert_allclose(ours.hyperparams["learning_rate"], schedule(19), rtol=1e-5)


def test_step_k_uses_schedule_of_k_with_steps_per_execution():
    schedule = SCHEDULES["warmup_cosine_decay"]
    used = []
    train(
        optax.inject_hyperparams(optax.sgd)(learning_rate=0.0),
        [LRScheduler(schedule), record_lr(used)],
        trainer=dict(steps_per_execution=2),
    )
    # One batch-end per execution of 2 steps: the value stored is the one of its last step.
    np.testing.assert_allclose(used, [schedule(k) for k in range(1, 20, 2)], rtol=1e-6)


def test_schedules_any_injected_hyperparameter():
    b1 = optax.linear_schedule(0.5, 0.9, 10)
    used = []
    train(
        optax.inject_hyperparams(optax.adam)(learning_rate=0.01, b1=0.9),
        [LRScheduler(b1, hyperparam="b1"), record_lr(used, "b1")],
        epochs=3,
    )
    np.testing.assert_allclose(used, [b1(k) for k in range(12)], rtol=1e-6)


def test_by_epoch_uses_the_zero_based_epoch_index_and_stays_exact_on_resume():
    per_epoch = optax.piecewise_constant_schedule(0.1, {2: 0.5, 4: 0.1})  # over epochs
    used = []
    first = train(
        optax.inject_hyperparams(optax.sgd)(learning_rate=0.0),
        [LRScheduler(per_epoch, by="epoch"), record_lr(used)],
        epochs=3,
    )
    resumed = resume(first)
    resumed.fit(epochs=5, callbacks=[LRScheduler(per_epoch, by="epoch"), record_lr(used)])
    expected = [float(np.float32(per_epoch(e))) for e in range(5) for _ in range(4)]
    assert used == expected


def test_by_epoch_needs_the_number_of_steps_per_epoch():
    x, y = tiny_data()
    trainer = make_trainer()

    class Batches:  # an iterable without len(): its number of batches is unknown
        def __iter__(self):
            return iter([(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)])

    with pytest.raises(
        ConfigError, match=r"by='epoch'\) needs the number of steps per epoch.*__len__"
    ):
        trainer.fit(
            MLP(),
            Batches(),
            epochs=1,
            callbacks=[LRScheduler(optax.constant_schedule(0.1), by="epoch")],
        )


def test_plateau_reductions_and_the_schedule_never_recompile_the_step():
    counts = {}

    def snapshot(t, logs):
        counts.setdefault("after_epoch_1", compile_count())

    train(
        optax.inject_hyperparams(optax.sgd)(learning_rate=0.0),
        [
            LRScheduler(SCHEDULES["sgdr"]),
            ReduceOnPlateau(monitor="val_loss", patience=0, min_delta=1e9),
            LambdaCallback(on_epoch_end=snapshot),
        ],
        validation_data=tiny_data(16, seed=1),
    )
    # Train and eval steps compiled in epoch 1; four plateau reductions later, nothing new.
    assert compile_count() == counts["after_epoch_1"]


def test_schedule_is_detached_after_fit_so_the_value_can_be_written():
    trainer = train(
        optax.inject_hyperparams(optax.sgd)(learning_rate=0.0),
        [LRScheduler(SCHEDULES["linear"])],
        epochs=1,
    )
    assert trainer.hyperparams.schedule_of("learning_rate") is None
    trainer.hyperparams["learning_rate"] = 0.5
    assert trainer.hyperparams["learning_rate"] == 0.5


def test_hyperparameter_injected_as_schedule_is_refused_at_fit_start():
    opt = optax.inject_hyperparams(optax.sgd)(learning_rate=SCHEDULES["linear"])
    with pytest.raises(
        HyperparamError, match="LRScheduler writes 'learning_rate'.*injected as a schedule"
    ):
        train(opt, [LRScheduler(SCHEDULES["linear"])], epochs=1)


def test_not_injected_hyperparameter_is_refused_at_fit_start():
    with pytest.raises(HyperparamError, match="'b2' is not injected.*injected: learning_rate"):
        train(
            optax.inject_hyperparams(optax.sgd)(learning_rate=0.1),
            [LRScheduler(SCHEDULES["linear"], "b2")],
        )


def test_untraceable_schedule_is_refused_at_fit_start_with_the_fix():
    def python_if(count):
        return 0.1 if count < 10 else 0.01

    with pytest.raises(ConfigError, match="cannot run inside the jitted step.*jnp.where"):
        train(optax.inject_hyperparams(optax.sgd)(learning_rate=0.1), [LRScheduler(python_if)])


def test_non_scalar_schedule_is_refused():
    with pytest.raises(ConfigError, match=r"must return a scalar, got shape \(2,\)"):
        train(
            optax.inject_hyperparams(optax.sgd)(learning_rate=0.1),
            [LRScheduler(lambda c: jnp.ones(2) * 0.1)],
        )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(schedule=0.1), "schedule must be an optax schedule or fn"),
        (dict(by="batch"), "by must be one of"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    kwargs.setdefault("schedule", SCHEDULES["linear"])
    with pytest.raises(ConfigError, match=match):
        LRScheduler(**kwargs)


def test_second_scheduler_gets_its_own_state_key():
    assert LRScheduler(SCHEDULES["linear"]).state_key == "LRScheduler"
    assert LRScheduler(SCHEDULES["linear"], hyperparam="b1").state_key == "LRScheduler[b1]"
