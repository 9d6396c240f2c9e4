"""Behaviours found missing while writing docs/custom_training.md and the open-step
examples, each pinned once fixed: aliased arrays in a custom step's initial state, the
caller's initial params kept intact, a linen model initialised by the full-form loss's own
call (a VAE's ``__call__(x, z_rng)``), and verify_resume of a step holding its modules."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import jaxfit
from jaxfit import Trainer


def _data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(32, 4)).astype("float32"), rng.integers(0, 3, size=32).astype("int32")


def test_a_custom_step_may_return_one_array_under_two_keys_of_its_initial_state():
    module, tx = nn.Dense(3), optax.sgd(0.1)

    class EMAStep(jaxfit.Step):
        def init(self, model, batch, key):
            params = module.init(key, batch[0])["params"]
            return {"params": params, "ema": params, "opt": tx.init(params)}

        def train_step(self, state, batch, ctx):
            x, y = batch
            loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(
                module.apply({"params": p}, x), y).mean()
            loss, grads = jax.value_and_grad(loss_fn)(state["params"])
            updates, opt = tx.update(grads, state["opt"], state["params"])
            params = optax.apply_updates(state["params"], updates)
            ema = optax.incremental_update(params, state["ema"], 0.1)
            return {"params": params, "ema": ema, "opt": opt}, {"loss": loss}

        def eval_step(self, state, batch, ctx):
            return {}

    trainer = Trainer(step=EMAStep(), seed=0)
    trainer.fit(data=_data(), epochs=1, batch_size=16, verbose=0)
    assert trainer.step == 2


def test_initial_params_leave_the_callers_arrays_intact():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, name="head")(nn.relu(nn.Dense(8, name="backbone")(x)))

    x, y = _data()
    pretrained = nn.Dense(8).init(jax.random.key(1), x)["params"]  # device arrays
    trainer = Trainer(optax.sgd(0.1), loss="softmax_cross_entropy", seed=0)
    trainer.fit(Net(), (x, y), epochs=1, batch_size=16, verbose=0,
                initial_params={"backbone": pretrained})
    assert not pretrained["kernel"].is_deleted()


def test_the_full_form_initialises_a_model_whose_call_takes_a_key_argument():
    class VAE(nn.Module):
        @nn.compact
        def __call__(self, x, z_rng):
            mean = nn.Dense(2)(x)
            return nn.Dense(4)(mean + jax.random.normal(z_rng, mean.shape)), mean

    def loss(model, x, ctx):
        recon, mean = model(x, ctx.rng("z"))
        return jnp.mean((recon - x) ** 2) + jnp.mean(mean**2)

    trainer = Trainer(optax.adam(1e-3), loss=loss, seed=0)
    trainer.fit(VAE(), _data()[0], epochs=1, batch_size=16, verbose=0)
    assert trainer.step == 2


def test_verify_resume_of_a_custom_step_that_holds_its_modules():
    module, tx = nn.Dense(3), optax.sgd(0.1)

    class PlainStep(jaxfit.Step):
        def init(self, model, batch, key):
            params = module.init(key, batch[0])["params"]
            return {"params": params, "opt": tx.init(params)}

        def train_step(self, state, batch, ctx):
            x, y = batch
            loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(
                module.apply({"params": p}, x), y).mean()
            loss, grads = jax.value_and_grad(loss_fn)(state["params"])
            updates, opt = tx.update(grads, state["opt"], state["params"])
            return {"params": optax.apply_updates(state["params"], updates), "opt": opt}, {"loss": loss}

        def eval_step(self, state, batch, ctx):
            return {}

    report = Trainer(step=PlainStep(), seed=0).verify_resume(None, _data(), epochs=2, batch_size=16)
    assert report, report
