"""The precision, counting and refusal cases of issue 9 that the program ports rely on:
built-in losses reduce in float32 for bf16 logits; bf16 params keep their injected
hyperparameters (and LRScheduler); bf16 input arrays are accepted; ``optax.MultiSteps`` +
LRScheduler equals the schedule injected inside MultiSteps; a loss of the wrong signature
and ``metrics=`` with a full-form loss are refused when the Trainer is built."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

from jaxfit import ConfigError, Trainer
from jaxfit.losses import LOSSES
from tests.programs_support import assert_bitwise, fit_args


def logits_and_labels():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(0, 4, (64, 10)), jnp.bfloat16)
    return logits, jnp.asarray(rng.integers(0, 10, 64), jnp.int32)


def test_softmax_cross_entropy_on_bf16_logits_is_the_float32_computation():
    logits, labels = logits_and_labels()
    got = LOSSES["softmax_cross_entropy"](logits, labels)
    want = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    assert got.dtype == jnp.float32
    assert_bitwise(got, want, "per-example loss")
    in_bf16 = optax.softmax_cross_entropy_with_integer_labels(logits, labels)  # what it must not be
    assert abs(float(in_bf16.astype(jnp.float32).mean()) - float(want.mean())) > 1e-4


class BF16Head(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(10, dtype=jnp.bfloat16)(x)  # bf16 logits


def test_the_epoch_loss_of_bf16_logits_is_reduced_in_float32():
    rng = np.random.default_rng(1)
    x, y = rng.normal(0, 3, (32, 6)).astype(np.float32), rng.integers(0, 10, 32).astype(np.int32)
    trainer = Trainer(optimizer=optax.sgd(0.0), loss="softmax_cross_entropy")
    trainer.fit(BF16Head(), (x, y), epochs=1, batch_size=32, **fit_args())
    logits = BF16Head().apply({"params": trainer.params}, x)
    want = float(jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)))
    # One batch: sum of 32 float32 values / 32, in jaxfit's eval program vs eagerly: 1e-6.
    np.testing.assert_allclose(trainer.evaluate((x, y))["loss"], want, rtol=1e-6)


class BF16Params(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)(x)


def data(n=24, dtype=np.float32):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    return x.astype(dtype), (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0).astype(np.int32)


def test_bf16_params_keep_injected_hyperparams_and_lr_scheduler_drives_them():
    from jaxfit.callbacks import LRScheduler

    schedule = lambda count: 0.1 * 0.5**count  # noqa: E731
    trainer = Trainer(optimizer=optax.inject_hyperparams(optax.sgd)(learning_rate=0.1), loss="softmax_cross_entropy")
    history = trainer.fit(BF16Params(), data(), epochs=2, batch_size=8, callbacks=[LRScheduler(schedule)],
                          **fit_args())
    assert trainer.hyperparams.names == ["learning_rate"]
    assert jax.tree_util.tree_leaves(trainer.params)[0].dtype == jnp.bfloat16
    # The last step of each epoch applied schedule(update count before it): 2, then 5. 1e-2:
    # with bf16 params optax may keep the injected value in bf16 (3 significant digits).
    np.testing.assert_allclose(history.history["learning_rate"], [schedule(2), schedule(5)], rtol=1e-2)


def test_bf16_input_arrays_are_accepted():
    x, y = data(dtype=ml_dtypes.bfloat16)
    trainer = Trainer(optimizer=optax.sgd(0.1), loss="softmax_cross_entropy")
    history = trainer.fit(BF16Params(), (x, y), epochs=1, batch_size=8, **fit_args())
    assert np.isfinite(history.history["loss"][0])


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(nn.relu(nn.Dense(8)(x)))


def test_multisteps_with_lr_scheduler_equals_the_schedule_injected_inside_multisteps():
    from jaxfit.callbacks import LRScheduler

    schedule = optax.linear_schedule(0.2, 0.02, 4)
    ds, params = data(), MLP().init(jax.random.key(0), jnp.ones((1, 4)))["params"]
    scheduled = Trainer(optimizer=optax.MultiSteps(optax.inject_hyperparams(optax.sgd)(learning_rate=0.2), 2),
                        loss="softmax_cross_entropy")
    scheduled.fit(MLP(), ds, epochs=2, batch_size=4, initial_params=params, callbacks=[LRScheduler(schedule)],
                  **fit_args())
    injected = Trainer(optimizer=optax.MultiSteps(optax.inject_hyperparams(optax.sgd)(learning_rate=schedule), 2),
                       loss="softmax_cross_entropy")
    injected.fit(MLP(), ds, epochs=2, batch_size=4, initial_params=params, **fit_args())
    assert scheduled.step == 12  # micro-batches; the optimizer made 6 updates
    assert_bitwise(scheduled.params, injected.params)


def test_a_loss_of_the_wrong_signature_is_refused_naming_the_forms():
    def one_arg(outputs):
        return outputs

    with pytest.raises(ConfigError) as e:
        Trainer(optimizer=optax.sgd(0.1), loss=one_arg)
    msg = str(e.value)
    assert "one_arg takes 1 required positional" in msg
    assert "fn(outputs, targets)" in msg and "fn(model, batch, ctx)" in msg and "jaxfit.Step" in msg


def test_metrics_with_a_full_form_loss_are_refused():
    def full(model, batch, ctx):
        return 0.0

    with pytest.raises(ConfigError, match=r"full-form loss fn\(model, batch, ctx\) returns its metrics itself"):
        Trainer(optimizer=optax.sgd(0.1), loss=full, metrics=["accuracy"])
