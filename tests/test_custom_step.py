"""A custom jaxfit.Step keeps every engine feature: fusion, hyperparameters, checkpoints, resume."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import MLP

from jaxfit import Step, Trainer
from jaxfit.callbacks import LRScheduler


class TwoOptimizers(Step):
    """Two param groups, each with its own injected Adam: names qualified by state key."""

    def __init__(self) -> None:
        self.body, self.head = nn.Dense(8), nn.Dense(3)
        self.tx_body = optax.inject_hyperparams(optax.adam)(learning_rate=1e-2)
        self.tx_head = optax.inject_hyperparams(optax.sgd)(learning_rate=1e-1)

    def init(self, model, batch, key):
        x, _ = batch
        kb, kh = jax.random.split(key)
        body = self.body.init(kb, x)["params"]
        head = self.head.init(kh, jnp.zeros((1, 8)))["params"]
        return {"params": {"body": body, "head": head},
                "body_opt": self.tx_body.init(body), "head_opt": self.tx_head.init(head)}

    def _loss(self, params, batch):
        x, y = batch
        logits = self.head.apply({"params": params["head"]}, jnp.tanh(self.body.apply({"params": params["body"]}, x)))
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def train_step(self, state, batch, ctx):
        loss, g = jax.value_and_grad(self._loss)(state["params"], batch)
        ub, body_opt = self.tx_body.update(g["body"], state["body_opt"])
        uh, head_opt = self.tx_head.update(g["head"], state["head_opt"])
        params = {"body": optax.apply_updates(state["params"]["body"], ub),
                  "head": optax.apply_updates(state["params"]["head"], uh)}
        return {"params": params, "body_opt": body_opt, "head_opt": head_opt}, {"loss": loss}

    def eval_step(self, state, batch, ctx):
        return {"loss": self._loss(state["params"], batch)}


def test_every_injected_optimizer_is_a_hyperparameter_and_schedulable(data):
    trainer = Trainer(step=TwoOptimizers(), seed=0)
    trainer.fit(data=data, epochs=2, batch_size=16, verbose=0,
                callbacks=[LRScheduler(optax.linear_schedule(1e-1, 0.0, 10), hyperparam="head_opt.learning_rate")])
    names = trainer.hyperparams.names
    assert "body_opt.learning_rate" in names and "head_opt.learning_rate" in names
    # 10 updates of a linear decay to 0 over 10: the last update used the schedule's value at 9.
    assert trainer.hyperparams["head_opt.learning_rate"] == pytest.approx(1e-1 * (1 - 9 / 10), rel=1e-5)
    trainer.hyperparams["body_opt.learning_rate"] = 1e-3
    trainer.fit(epochs=3)
    assert trainer.hyperparams["body_opt.learning_rate"] == pytest.approx(1e-3)
    assert trainer.trace_counts["train"] == 2  # batches of 16 and the last of 6, never again


def test_fused_executions_equal_single_steps(data):
    runs = []
    for k in (1, 2):
        t = Trainer(step=TwoOptimizers(), seed=0, steps_per_execution=k, scan_unroll=1)
        t.fit(data=data, epochs=2, batch_size=8, verbose=0)
        runs.append((t.history.history["loss"], jax.device_get(t.params)))
    np.testing.assert_allclose(runs[0][0], runs[1][0], rtol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), runs[0][1], runs[1][1])


@pytest.mark.slow
def test_a_custom_step_resumes_bit_for_bit(data):
    report = Trainer(step=TwoOptimizers(), seed=0).verify_resume(
        None, data, epochs=2, batch_size=16, stop_at=[3, 7], verbose=0)
    assert report, report


def test_a_simple_loss_model_that_sows_compiles_once(data):
    class Sows(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(4)(x)
            self.sow("intermediates", "h", h)
            return nn.Dense(3)(h)

    x, y = data
    trainer = Trainer(optax.sgd(0.1), seed=0)
    trainer.fit(Sows(), (x[:64], y[:64]), epochs=3, batch_size=16, verbose=0)
    assert trainer.trace_counts["train"] == 1
    assert "intermediates" not in trainer.model_state


def test_the_default_built_in_step_is_unchanged_by_a_full_form_equivalent(data):
    """The simple form is the full form with a per-example loss: both give the same params."""
    x, y = data

    def full(model, batch, ctx):
        xb, yb = batch
        per = optax.softmax_cross_entropy_with_integer_labels(model(xb), yb)
        return jnp.sum(per * ctx.mask) / jnp.sum(ctx.mask)

    a = Trainer(optax.adam(1e-2), seed=0)
    b = Trainer(optax.adam(1e-2), loss=full, seed=0)
    a.fit(MLP(), (x, y), epochs=2, batch_size=16, verbose=0)
    b.fit(MLP(), (x, y), epochs=2, batch_size=16, verbose=0)
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(a.params), jax.device_get(b.params))
    np.testing.assert_allclose(a.history.history["loss"], b.history.history["loss"], rtol=1e-6)
