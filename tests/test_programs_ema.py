"""EMA params for evaluation (flax ``flax/nnx/training/ema.py``'s update rule
``ema = decay * ema + (1 - decay) * params``, after every step) as a custom ``jaxfit.Step``
whose ``eval_step`` uses the EMA params; the EMA is part of the state, so it is saved and
resumed. Against a hand-written jitted loop from the same params on the same batches.

Glue beyond the program's model, loss and EMA update: 8 lines — the ``Step`` subclass,
``init``, ``train_step`` (grad, update, EMA) and ``eval_step`` on the EMA params.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxfit
from tests.programs_support import assert_bitwise, assert_changed, batches, check_resume, fit_args

DECAY = 0.9
TX = optax.sgd(0.5)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(nn.relu(nn.Dense(8)(x)))


def xent(params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(MLP().apply({"params": params}, x), y).mean()


def ema_update(ema, params):
    """nnx.training.EMA's rule: ema <- decay * ema + (1 - decay) * params."""
    return jax.tree_util.tree_map(lambda e, p: DECAY * e + (1 - DECAY) * p, ema, params)


def train_step(state, x, y):
    loss, g = jax.value_and_grad(xent)(state["params"], x, y)
    updates, opt = TX.update(g, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {"params": params, "ema": ema_update(state["ema"], params), "opt": opt}, loss


class EMAStep(jaxfit.Step):  # the glue
    def init(self, model, batch, key):
        params = MLP().init(key, batch[0][:1])["params"]
        return {"params": params, "ema": params, "opt": TX.init(params)}

    def train_step(self, state, batch, ctx):
        state, loss = train_step(state, *batch)
        return state, {"loss": loss}

    def eval_step(self, state, batch, ctx):
        return {"loss": xent(state["ema"], *batch)}


def data(n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    return x, (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0).astype(np.int32)


def test_ema_is_used_for_validation_and_matches_the_hand_loop():
    ds, val, bs, epochs = data(24), data(12, 1), 6, 2
    trainer = jaxfit.Trainer(step=EMAStep(), seed=0)
    history = trainer.fit(data=ds, validation_data=val, epochs=epochs, batch_size=bs, **fit_args())

    state = EMAStep().init(None, ds, jax.random.key(0))
    start = state["params"]
    step = jax.jit(train_step)
    for epoch in range(epochs):
        for x, y in batches(ds, bs):
            state, _ = step(state, x, y)
        ema_loss = np.mean([float(xent(state["ema"], x, y)) for x, y in batches(val, bs)])
        raw_loss = np.mean([float(xent(state["params"], x, y)) for x, y in batches(val, bs)])
        # Evaluated in jaxfit's eval program (which also sums the epoch) vs eagerly here:
        # the same float32 reductions may round differently in the last bit.
        np.testing.assert_allclose(history.history["val_loss"][epoch], ema_loss, rtol=1e-6)
        assert abs(raw_loss - ema_loss) > 1e-3  # the EMA params, not the trained ones, were evaluated
    assert_changed(state["ema"], start)
    assert_bitwise(trainer.state, state, "EMA state")
    assert trainer.trace_counts["train"] == 1  # a custom step compiles once over the run


@pytest.mark.slow
def test_ema_state_resumes_bit_for_bit():
    step = EMAStep()  # passed as the model too: see test_programs_gan.py
    check_resume(jaxfit.Trainer(step=step), step, data(24), validation_data=data(12, 1), epochs=2,
                 batch_size=6)
