"""TerminateOnNaN: detection from the on-device loss sum, no per-step sync, unsavable weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from cb_helpers import tiny_data
from conftest import MLP, make_trainer

from jaxfit import ConfigError
from jaxfit.callbacks import LambdaCallback, TerminateOnNaN


def poison(step: int) -> LambdaCallback:
    """Turns the weights to NaN after ``step``: the loss of the next step is NaN."""

    def hook(trainer, logs):
        if trainer.step == step:
            trainer.params = jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), trainer.params)

    return LambdaCallback(on_train_batch_end=hook)


@pytest.mark.parametrize("every, stops_at", [(3, 12), (5, 10), (None, 16)])
def test_stops_at_the_first_check_after_a_nan_loss(every, stops_at):
    # The NaN is in step 10, the second batch of epoch 2 (8 batches an epoch).
    trainer = make_trainer()
    guard = TerminateOnNaN(every_n_steps=every)
    history = trainer.fit(
        MLP(), tiny_data(128), epochs=3, batch_size=16, callbacks=[poison(9), guard]
    )
    assert trainer.stop_reason == "terminate_on_nan"
    assert guard.detected and guard.detected_at_step == stops_at == trainer.step
    # Epoch 1 was clean and is the only one recorded when the stop fell inside epoch 2.
    assert len(history.history["loss"]) == (1 if stops_at < 16 else 2)
    assert guard.check(trainer) is False


def test_clean_run_is_not_stopped_and_may_be_saved():
    trainer = make_trainer()
    guard = TerminateOnNaN(every_n_steps=1)
    trainer.fit(MLP(), tiny_data(), epochs=2, batch_size=16, callbacks=[guard])
    assert trainer.stop_reason is None and not guard.detected
    assert guard.check(trainer) is True


def test_check_finds_nan_weights_even_with_a_finite_loss_so_far():
    trainer = make_trainer()
    guard = TerminateOnNaN()
    trainer.fit(MLP(), tiny_data(), epochs=1, batch_size=16, callbacks=[guard])
    trainer.params = jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), trainer.params)
    assert guard.check(trainer) is False
    assert trainer.stop_training and trainer.stop_reason == "terminate_on_nan"


def test_no_device_sync_between_checks():
    fetched = []
    trainer = make_trainer()
    real = trainer.running_logs

    def spy():
        fetched.append(trainer.step)
        return real()

    trainer.running_logs = spy
    trainer.fit(
        MLP(), tiny_data(128), epochs=2, batch_size=16, callbacks=[TerminateOnNaN(every_n_steps=5)]
    )
    assert fetched == [5, 10, 15]


def test_runs_before_checkpoint_writers_at_epoch_end():
    seen = []
    trainer = make_trainer()
    late = LambdaCallback(order=100, on_epoch_end=lambda t, logs: seen.append(t.stop_reason))
    trainer.fit(
        MLP(),
        tiny_data(128),
        epochs=3,
        batch_size=16,
        callbacks=[late, poison(3), TerminateOnNaN(every_n_steps=None)],
    )
    # A ModelCheckpoint (order 100) at the end of the poisoned epoch already sees the verdict.
    assert seen == ["terminate_on_nan"]


def test_every_n_steps_must_be_positive():
    with pytest.raises(
        ConfigError, match="every_n_steps must be an integer >= 1, got every_n_steps = 0"
    ):
        TerminateOnNaN(every_n_steps=0)
