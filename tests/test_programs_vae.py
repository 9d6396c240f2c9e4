"""flax examples/vae: the program's VAE (``tests/programs_models/vae.py``, verbatim; 4
latents) whose sampling key is a call argument ``model(x, z_rng)``, its loss BCE + KL with
the inputs as targets, trained by jaxfit in the full form against the source's
``train_step`` / ``eval_f``.

The source's loop splits one key per step; the hand loop is given jaxfit's key of stream
``"z"`` at each step instead (``ctx.rng("z")``), which is what makes a resumed run exact.

Glue beyond the program's model and loss: 2 lines — ``def loss(model, batch, ctx)`` and
passing ``ctx.rng("z")`` where the source passes ``z_rng`` (the returned metrics dict is the
source's ``compute_metrics``).

Engine bug this pinned (fixed in jaxfit/step.py ``LossStep._init_by_loss``): a linen model
called with an argument that is not in the batch (here ``z_rng``) could not be initialised —
``LossStep.init`` called ``module.init(batch)``: ``TypeError: VAE.__call__() missing 1
required positional argument: 'z_rng'``. The full form now initialises on the loss's
first model call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax.training import train_state

from jaxfit import Trainer
from jaxfit.step import stream_key
from tests.programs_models import vae as models
from tests.programs_support import assert_bitwise, assert_changed, batches, check_resume, eval_key, fit_args, rng

LATENTS = 4


# -- the source's loss pieces and hand-written steps (examples/vae/train.py) -------------
def kl_divergence(mean, logvar):
    return -0.5 * jnp.sum(1 + logvar - jnp.square(mean) - jnp.exp(logvar))


@jax.vmap
def binary_cross_entropy_with_logits(logits, labels):
    logits = nn.log_sigmoid(logits)
    return -jnp.sum(labels * logits + (1.0 - labels) * jnp.log(-jnp.expm1(logits)))


def compute_metrics(recon_x, x, mean, logvar):
    bce_loss = binary_cross_entropy_with_logits(recon_x, x).mean()
    kld_loss = kl_divergence(mean, logvar).mean()
    return {'bce': bce_loss, 'kld': kld_loss, 'loss': bce_loss + kld_loss}


@jax.jit
def train_step(state, batch, z_rng):
    def loss_fn(params):
        recon_x, mean, logvar = models.model(LATENTS).apply({'params': params}, batch, z_rng)
        bce_loss = binary_cross_entropy_with_logits(recon_x, batch).mean()
        kld_loss = kl_divergence(mean, logvar).mean()
        loss = bce_loss + kld_loss
        return loss

    grads = jax.grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads)


@jax.jit
def eval_f(params, images, z_rng):
    def eval_model(vae):
        recon_images, mean, logvar = vae(images, z_rng)
        return compute_metrics(recon_images, images, mean, logvar)

    return nn.apply(eval_model, models.model(LATENTS))({'params': params})


def loss(model, batch, ctx):  # the glue: the source's loss_fn in jaxfit's full form
    recon_x, mean, logvar = model(batch, ctx.rng("z"))
    metrics = compute_metrics(recon_x, batch, mean, logvar)
    return metrics.pop("loss"), metrics


def data(n, seed=0):
    return (np.random.default_rng(seed).random((n, 784)) > 0.5).astype(np.float32)  # binarized


def test_vae_matches_the_source_steps():
    ds, val, bs, epochs, seed = data(24), data(16, 1), 8, 2, 0
    params = models.model(LATENTS).init(jax.random.key(1), jnp.ones((bs, 784), jnp.float32),
                                        jax.random.key(2))["params"]
    trainer = Trainer(optimizer=optax.adam(1e-3), loss=loss, seed=seed)
    history = trainer.fit(models.model(LATENTS), ds, validation_data=val, epochs=epochs, batch_size=bs,
                          initial_params=params, **fit_args())
    assert list(history.history) == ["loss", "bce", "kld", "val_loss", "val_bce", "val_kld"]

    state = train_state.TrainState.create(apply_fn=None, params=params, tx=optax.adam(1e-3))
    k = 0
    for epoch in range(epochs):
        for b in batches(ds, bs):
            state = train_step(state, b, rng(seed, k, "z"))
            k += 1
        # Evaluation batch i gets stream "z" of jaxfit's evaluation key i.
        got = [eval_f(state.params, b, stream_key(eval_key(seed, i), "z")) for i, b in enumerate(batches(val, bs))]
        for name in ("loss", "bce", "kld"):
            # Two XLA programs (jaxfit's eval step also sums the epoch): float32 rounding of
            # the same reductions may differ in the last bit; equal batches, so 1e-6.
            want = np.mean([float(g[name]) for g in got])
            np.testing.assert_allclose(history.history[f"val_{name}"][epoch], want, rtol=1e-6)
    assert_changed(state.params, params)
    assert_bitwise(trainer.params, state.params)


@pytest.mark.slow
def test_vae_resumes_bit_for_bit():
    check_resume(Trainer(optimizer=optax.adam(1e-3), loss=loss), models.model(LATENTS), data(24),
                 epochs=2, batch_size=8)
