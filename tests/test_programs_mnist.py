"""flax examples/mnist (linen, before the NNX rewrite: flax 7e9bb761 examples/mnist/train.py).

The baseline: the program's CNN and its loss, trained by jaxfit in the simple form
``loss=fn(logits, labels)``, against the program's own ``apply_model`` / ``update_model``
jitted steps on ``flax.training.train_state.TrainState``. Shrunk: 8x8 images, 4/8 conv
features, a 16-unit dense layer.

Glue beyond the program's model and loss: 2 lines — the loss's signature
``def cross_entropy(logits, labels)`` (the source closes over ``images, labels`` inside
``apply_model``) and ``Trainer(optimizer=tx, loss=cross_entropy, metrics=["accuracy"])``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

from jaxfit import Trainer
from tests.programs_support import EpochMean, assert_bitwise, assert_changed, batches, check_resume, fit_args, host


class CNN(nn.Module):
    """The source's CNN, features shrunk (32/64/256 -> 4/8/16)."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(features=4, kernel_size=(3, 3))(x)
        x = nn.relu(x)
        x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = nn.Conv(features=8, kernel_size=(3, 3))(x)
        x = nn.relu(x)
        x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))  # flatten
        x = nn.Dense(features=16)(x)
        x = nn.relu(x)
        x = nn.Dense(features=10)(x)
        return x


def cross_entropy(logits, labels):
    """The source's loss, from its apply_model.loss_fn."""
    one_hot = jax.nn.one_hot(labels, 10)
    return jnp.mean(optax.softmax_cross_entropy(logits=logits, labels=one_hot))


# -- the source's hand-written steps ------------------------------------------------
@jax.jit
def apply_model(state, images, labels):
    """Computes gradients, loss and accuracy for a single batch."""

    def loss_fn(params):
        logits = state.apply_fn({'params': params}, images)
        one_hot = jax.nn.one_hot(labels, 10)
        loss = jnp.mean(optax.softmax_cross_entropy(logits=logits, labels=one_hot))
        return loss, logits

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, logits), grads = grad_fn(state.params)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return grads, loss, accuracy


@jax.jit
def update_model(state, grads):
    return state.apply_gradients(grads=grads)


def data(n=40):
    rng = np.random.default_rng(0)
    return {"image": rng.random((n, 8, 8, 1), dtype=np.float32),
            "label": rng.integers(0, 10, n).astype(np.int32)}


def tx():
    return optax.sgd(0.1, 0.9)  # the source's config: learning_rate 0.1, momentum 0.9


def test_mnist_linen_matches_the_source_step_bit_for_bit():
    ds, bs, epochs = data(), 10, 2
    params = CNN().init(jax.random.key(0), jnp.ones([1, 8, 8, 1]))["params"]  # create_train_state
    trainer = Trainer(optimizer=tx(), loss=cross_entropy, metrics=["accuracy"])
    history = trainer.fit(CNN(), ds, epochs=epochs, batch_size=bs, initial_params=params, **fit_args())

    state = train_state.TrainState.create(apply_fn=CNN().apply, params=params, tx=tx())
    for epoch in range(epochs):
        loss_m, acc_m = EpochMean(), EpochMean()
        for b in batches(ds, bs):
            grads, loss, accuracy = apply_model(state, b["image"], b["label"])
            state = update_model(state, grads)
            loss_m.add_scalar(loss, bs)
            acc_m.add_scalar(accuracy, bs)
        # jaxfit's epoch value sums loss * batch size in float32 (the same additions replayed).
        assert history.history["loss"][epoch] == loss_m.value
        assert history.history["accuracy"][epoch] == acc_m.value

    assert_changed(state.params, params)
    assert_bitwise(trainer.params, state.params)
    assert_bitwise(trainer.opt_state, state.opt_state, "opt_state")


@pytest.mark.slow
def test_mnist_linen_resumes_bit_for_bit():
    check_resume(Trainer(optimizer=tx(), loss=cross_entropy, metrics=["accuracy"]), CNN(), data(30),
                 epochs=2, batch_size=10)
