"""Tiny annotated models and a hand-written train step for the sharding tests (not collected)."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import optax
from flax import nnx

from jaxfit.sharding import unbox

LECUN = nn.initializers.lecun_normal()


class Block(nn.Module):
    """A Transformer-ish MLP block, 8 -> 16 -> 8 (+ residual, LayerNorm) -> 3.

    ``mode`` picks the annotation: "physical" (mesh axis names), "logical" (names mapped by
    rules) or "plain" (none: the regex rules or replication decide).
    """

    mode: str = "physical"

    def _init(self, physical, logical, base=LECUN):
        if self.mode == "physical":
            return nn.with_partitioning(base, physical)
        if self.mode == "logical":
            return nn.with_logical_partitioning(base, logical)
        return base

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(16, name="up", kernel_init=self._init((None, "model"), ("embed", "mlp")),
                     bias_init=self._init(("model",), ("mlp",), nn.initializers.zeros))(x)
        h = nn.Dense(8, name="down", kernel_init=self._init(("model", None), ("mlp", "embed")))(nn.relu(h))
        x = nn.LayerNorm(name="norm")(x + h)
        return nn.Dense(3, name="head")(x)  # never annotated: replicated unless a regex rule hits


class NnxBlock(nnx.Module):
    """The nnx counterpart: one physical annotation, one logical, one unannotated layer."""

    def __init__(self, rngs: nnx.Rngs):
        self.up = nnx.Linear(8, 16, rngs=rngs, kernel_init=nnx.with_partitioning(LECUN, (None, "model")))
        self.down = nnx.Linear(16, 8, rngs=rngs, kernel_metadata={"out_sharding": ("mlp", "embed")})
        self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(self.down(nnx.relu(self.up(x))))


def data(n: int = 32, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype(np.float32)
    return x, (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0).astype(np.int32)


def adam():
    return optax.inject_hyperparams(optax.adam)(learning_rate=1e-2)


def state_fns(model: nn.Module, tx: optax.GradientTransformation):
    """(init(key, x) -> state, step(state, x, y) -> (state, loss)) with EMA params in the state."""

    def init(key, x):
        params = model.init(key, x)["params"]  # boxed: the plan reads the annotations
        plain = unbox(params)
        return {"params": params, "opt": tx.init(plain), "ema": plain, "step": np.int32(0)}

    def step(state, x, y):
        def loss_fn(p):
            logits = model.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        ema = jax.tree_util.tree_map(lambda e, p: 0.9 * e + 0.1 * p, state["ema"], params)
        return {"params": params, "opt": opt, "ema": ema, "step": state["step"] + 1}, loss

    return init, step
