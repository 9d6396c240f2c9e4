"""float16 training with dynamic loss scaling (the imagenet example's ``--half_precision``
path on GPU: flax ``DynamicScale`` / ``jmp.DynamicLossScale``; neither is used here — jmp
is not installed — so a 12-line dynamic loss scale with jmp's rule is written out): float32
master params, float16 compute, a float32 loss scaled before the backward pass; a step whose
gradients are not finite is skipped and halves the scale, ``PERIOD`` finite steps in a row
double it. A custom ``jaxfit.Step`` whose state holds the scale; against the same step in a
hand-written jitted loop.

Glue beyond the program's model, loss and loss-scale step: 7 lines — the ``Step``
subclass, ``init`` and ``train_step`` / ``eval_step`` calling the program's functions.
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

TX = optax.sgd(0.1)
PERIOD = 3


class MLP(nn.Module):
    dtype: jnp.dtype = jnp.float16

    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, dtype=self.dtype)(nn.relu(nn.Dense(8, dtype=self.dtype)(x)))


def half(tree):
    return jax.tree_util.tree_map(lambda a: a.astype(jnp.float16), tree)


def xent(params, x, y):
    logits = MLP().apply({"params": half(params)}, x.astype(jnp.float16))
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y).mean()


def adjust(scale, good, finite):
    """jmp.DynamicLossScale.adjust: halve on overflow, double after PERIOD finite steps."""
    good = jnp.where(finite, good + 1, 0)
    grow = good >= PERIOD
    scale = jnp.where(finite, jnp.where(grow, scale * 2, scale), jnp.maximum(scale / 2, 1.0))
    return scale, jnp.where(grow, 0, good)


def train_step(state, x, y):
    def scaled(p):
        loss = xent(p, x, y)
        return loss * state["scale"], loss

    (_, loss), g = jax.value_and_grad(scaled, has_aux=True)(state["params"])
    g = jax.tree_util.tree_map(lambda a: a / state["scale"], g)
    finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(a)) for a in jax.tree_util.tree_leaves(g)]))
    updates, opt = TX.update(g, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
    scale, good = adjust(state["scale"], state["good"], finite)
    new = {"params": keep(params, state["params"]), "opt": keep(opt, state["opt"]), "scale": scale, "good": good}
    return new, {"loss": loss, "scale": state["scale"], "skipped": 1.0 - finite.astype(jnp.float32)}


def init_state(key, x):
    params = MLP(dtype=jnp.float32).init(key, x[:1])["params"]  # float32 master params
    # 2**20 overflows float16 in the backward pass: the first steps are skipped.
    return {"params": params, "opt": TX.init(params), "scale": jnp.float32(2.0**20), "good": jnp.int32(0)}


class LossScaleStep(jaxfit.Step):  # the glue
    def init(self, model, batch, key):
        return init_state(key, batch[0])

    def train_step(self, state, batch, ctx):
        return train_step(state, *batch)

    def eval_step(self, state, batch, ctx):
        return {"loss": xent(state["params"], *batch)}


def data(n=36, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    return x, (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0).astype(np.int32)


def test_float16_dynamic_loss_scale_skips_overflows_and_matches_the_hand_loop():
    ds, bs, epochs = data(), 6, 2
    trainer = jaxfit.Trainer(step=LossScaleStep(), seed=0)
    history = trainer.fit(data=ds, epochs=epochs, batch_size=bs, **fit_args())

    state = init_state(jax.random.key(0), ds[0])
    start, step, skipped, scales, per_epoch = state["params"], jax.jit(train_step), [], [], []
    for _ in range(epochs):
        for x, y in batches(ds, bs):
            state, logs = step(state, x, y)
            skipped.append(float(logs["skipped"]))
            scales.append(float(logs["scale"]))
            if len(skipped) == 1:
                assert_bitwise(state["params"], start)  # the overflowing first step changed nothing
        per_epoch.append(np.mean(skipped[-(len(ds[0]) // bs):]))
    assert skipped[0] == 1.0 and 0.0 in skipped
    for i in range(len(scales) - 1):  # every overflow halved the scale
        if skipped[i]:
            assert scales[i + 1] == scales[i] / 2
    np.testing.assert_allclose(history.history["skipped"], per_epoch, rtol=1e-6)
    assert_changed(state["params"], start)
    assert_bitwise(trainer.state, state, "loss-scaled state")


@pytest.mark.slow
def test_float16_loss_scale_resumes_bit_for_bit():
    step = LossScaleStep()  # passed as the model too: see test_programs_gan.py
    check_resume(jaxfit.Trainer(step=step), step, data(), epochs=2, batch_size=6)
