"""MoE auxiliary losses (google-research/t5x t5x/contrib/moe, flaxformer's routing):
a top-1 routed mixture of experts whose router ``self.sow``\\s the Switch Transformer
load-balancing loss (``_load_balancing_loss`` below, as in the source) into
``"intermediates"``; the full-form loss adds it from ``ctx.sown``, as t5x's MoE trainer
adds the sown ``auxiliary_loss``. Against a hand-written jitted step that applies the model
with ``mutable=["intermediates"]`` and adds the same values.

Also the trace-count test of issue 9: a sowing linen model compiles the train step once
(``trainer.trace_counts["train"] == 1`` over several epochs of evenly dividing data); it
used to recompile on every step because the sown values rode along as model state.

Glue beyond the program's model and loss: 2 lines — ``def loss(model, batch, ctx)`` and
reading the sown values from ``ctx.sown["intermediates"]`` instead of ``apply(...,
mutable=["intermediates"])``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxfit import Trainer
from tests.programs_support import EpochMean, assert_bitwise, assert_changed, batches, check_resume, fit_args

EXPERTS, AUX_WEIGHT = 4, 0.01


def _load_balancing_loss(router_probs, expert_indices):
    """Switch Transformer load-balancing loss, eq. (4)-(6), as in t5x/flaxformer."""
    num_experts = router_probs.shape[-1]
    expert_mask = jax.nn.one_hot(expert_indices, num_experts, dtype=jnp.int32)
    expert_mask = jnp.max(expert_mask, axis=-2)
    tokens_per_group_and_expert = jnp.mean(expert_mask, dtype=jnp.float32, axis=-2)
    router_prob_per_group_and_expert = jnp.mean(router_probs, dtype=jnp.float32, axis=-2)
    return jnp.mean(tokens_per_group_and_expert * router_prob_per_group_and_expert, dtype=jnp.float32) * num_experts**2


class MoE(nn.Module):
    """Top-1 routing over ``EXPERTS`` dense experts; tokens are (batch, tokens, features)."""

    @nn.compact
    def __call__(self, x):
        probs = jax.nn.softmax(nn.Dense(EXPERTS, name="router")(x), axis=-1)
        top = jnp.argmax(probs, axis=-1)
        self.sow("intermediates", "auxiliary_loss", _load_balancing_loss(probs, top[..., None]))
        experts = jnp.stack([nn.Dense(8, name=f"expert_{e}")(x) for e in range(EXPERTS)], axis=-2)
        gate = jax.nn.one_hot(top, EXPERTS) * probs
        return jnp.einsum("...e,...ef->...f", gate, experts)


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(MoE(name="moe")(x))
        return nn.Dense(3)(h.mean(axis=1))


def aux_losses(sown):
    return sum(jnp.sum(v) for v in jax.tree_util.tree_leaves(sown))


def loss(model, batch, ctx):  # the glue
    x, y = batch
    logits = model(x)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    aux = aux_losses(ctx.sown["intermediates"])
    return ce + AUX_WEIGHT * aux, {"aux": aux}


@jax.jit
def train_step(state, x, y):
    """The hand-written step: apply with the sown collection mutable, add its values."""
    params, opt = state

    def loss_fn(p):
        logits, sown = Net().apply({"params": p}, x, mutable=["intermediates"])
        aux = aux_losses(sown["intermediates"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean() + AUX_WEIGHT * aux, aux

    (value, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt = TX.update(g, opt, params)
    return (optax.apply_updates(params, updates), opt), value, aux


TX = optax.adam(1e-2)


def data(n=24, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5, 4)).astype(np.float32)
    return x, (x[:, 0, 0] > 0).astype(np.int32) + (x[:, 1, 1] > 0).astype(np.int32)


def test_moe_sown_aux_loss_is_added_and_matches_the_hand_step():
    ds, bs, epochs = data(), 6, 2
    params = Net().init(jax.random.key(3), ds[0][:1])["params"]
    trainer = Trainer(optimizer=TX, loss=loss)
    history = trainer.fit(Net(), ds, epochs=epochs, batch_size=bs, initial_params=params, **fit_args())

    state = (params, TX.init(params))
    for epoch in range(epochs):
        loss_m, aux_m = EpochMean(), EpochMean()
        for x, y in batches(ds, bs):
            state, value, aux = train_step(state, x, y)
            loss_m.add_scalar(value, bs)
            aux_m.add_scalar(aux, bs)
        assert aux_m.value > 1.0  # the load-balancing loss is >= 1: it reached the loss
        # Another XLA program than the hand step: the scalars may differ in the last bit.
        np.testing.assert_allclose(history.history["loss"][epoch], loss_m.value, rtol=1e-6)
        np.testing.assert_allclose(history.history["aux"][epoch], aux_m.value, rtol=1e-6)
    assert_changed(state[0], params)
    assert_bitwise(trainer.params, state[0])
    assert "intermediates" not in trainer.model_state  # sown values are not model state


def test_a_sowing_model_compiles_the_train_step_once():
    trainer = Trainer(optimizer=TX, loss=loss)
    trainer.fit(Net(), data(), epochs=3, batch_size=6, **fit_args())  # 4 steps per epoch, no partial batch
    assert trainer.step == 12
    assert trainer.trace_counts["train"] == 1


@pytest.mark.slow
def test_moe_resumes_bit_for_bit():
    check_resume(Trainer(optimizer=TX, loss=loss), Net(), data(), epochs=2, batch_size=6)
