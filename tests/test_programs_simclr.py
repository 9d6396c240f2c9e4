"""SimCLR (phlippe/uvadlc_notebooks, JAX tutorial 17): no labels, two augmented views of
each image drawn with a per-step key, and the InfoNCE loss over the whole batch — every
example's positive is its other view, every other row a negative, so padded rows would
change it. Ported from the tutorial's ``info_nce_loss`` (cosine similarity, self-mask at
-9e15, positives on the rolled diagonal, temperature, mean NLL); the ResNet encoder is
shrunk to an MLP and the augmentations to a random flip and noise.

The data has 20 rows in batches of 8: the last batch of 4 must reach the loss as 4 rows,
unpadded; the hand loop runs the same batches 8, 8, 4.

Glue beyond the program's model and loss: 3 lines — ``def loss(model, batch, ctx)``, the
augmentation key ``ctx.rng("aug")`` where the tutorial splits its own, and the model call
on both views.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxfit import Trainer
from tests.programs_support import EpochMean, assert_bitwise, assert_changed, batches, check_resume, fit_args, rng

TEMPERATURE = 0.1


class Encoder(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4)(nn.relu(nn.Dense(16)(x.reshape(x.shape[0], -1))))


def augment(key, imgs):
    """Two views: a random horizontal flip and Gaussian noise per image."""
    flip_key, noise_key = jax.random.split(key)
    flip = jax.random.bernoulli(flip_key, 0.5, (imgs.shape[0], 1, 1))
    views = jnp.where(flip, imgs[:, :, ::-1], imgs)
    return views + 0.1 * jax.random.normal(noise_key, imgs.shape)


def info_nce_loss(feats):
    """The tutorial's InfoNCE over 2N features (views i and i + N are positives)."""
    feats = feats / jnp.linalg.norm(feats, axis=-1, keepdims=True)
    cos_sim = feats @ feats.T
    self_mask = jnp.eye(cos_sim.shape[0], dtype=bool)
    cos_sim = jnp.where(self_mask, -9e15, cos_sim)
    pos_mask = jnp.roll(self_mask, shift=cos_sim.shape[0] // 2, axis=0)
    cos_sim = cos_sim / TEMPERATURE
    nll = -(cos_sim * pos_mask).sum(axis=-1) + jax.nn.logsumexp(cos_sim, axis=-1)
    return nll.mean()


def two_views(key, imgs):
    k1, k2 = jax.random.split(key)
    return jnp.concatenate([augment(k1, imgs), augment(k2, imgs)], axis=0)


def loss(model, batch, ctx):  # the glue
    return info_nce_loss(model(two_views(ctx.rng("aug"), batch)))


TX = optax.adam(1e-2)


@jax.jit
def train_step(state, imgs, key):
    params, opt = state
    value, g = jax.value_and_grad(lambda p: info_nce_loss(Encoder().apply({"params": p}, two_views(key, imgs))))(params)
    updates, opt = TX.update(g, opt, params)
    return (optax.apply_updates(params, updates), opt), value


def data(n=20):
    return np.random.default_rng(0).normal(size=(n, 3, 3)).astype(np.float32)


def hand_run(ds, bs, epochs, params, seed, pad_last=False):
    state, k, epoch_losses = (params, TX.init(params)), 0, []
    for _ in range(epochs):
        m = EpochMean()
        for b in batches(ds, bs):
            n = b.shape[0]
            if pad_last and n < bs:
                b = np.concatenate([b, np.zeros((bs - n, *b.shape[1:]), b.dtype)])
            state, value = train_step(state, b, rng(seed, k, "aug"))
            m.add_scalar(value, n)  # jaxfit weights a batch's scalar loss by its real rows
            k += 1
        epoch_losses.append(m.value)
    return state[0], epoch_losses


def test_simclr_whole_batch_loss_on_a_ragged_dataset_is_not_padded():
    ds, bs, epochs, seed = data(), 8, 2, 0
    params = Encoder().init(jax.random.key(5), ds[:1])["params"]
    trainer = Trainer(optimizer=TX, loss=loss, seed=seed)
    history = trainer.fit(Encoder(), ds, epochs=epochs, batch_size=bs, initial_params=params, **fit_args())

    want, losses = hand_run(ds, bs, epochs, params, seed)
    assert_changed(want, params)
    assert_bitwise(trainer.params, want)
    # Another XLA program than the hand step: the loss scalar may differ in the last bit.
    np.testing.assert_allclose(history.history["loss"], losses, rtol=1e-6)
    padded, _ = hand_run(ds, bs, epochs, params, seed, pad_last=True)
    with pytest.raises(AssertionError):  # padding the last batch would have changed the run
        assert_bitwise(trainer.params, padded)


@pytest.mark.slow
def test_simclr_resumes_bit_for_bit():
    check_resume(Trainer(optimizer=TX, loss=loss), Encoder(), data(), epochs=2, batch_size=8)
