"""flax docs_nnx/mnist_tutorial.md: the NNX CNN with ``__call__(x, rngs)``, Dropout built
without rngs, BatchNorm; trained by jaxfit with the tutorial's own ``loss_fn(model, batch,
rngs)`` in the full form, against the tutorial's ``nnx.jit`` train and eval steps on
``nnx.view`` train/eval models and an ``nnx.Optimizer``. Shrunk: 8x8 images, 4/8 conv
features, a 16-unit hidden layer.

One deliberate difference from the tutorial's loop: it draws every step's dropout from one
``nnx.Rngs(0)`` that advances; jaxfit derives each step's key from (seed, step) so that a
resumed run draws the same masks, and the hand loop is given that key as ``nnx.Rngs(key)``.

Glue beyond the program's model and loss: 3 lines — ``def loss(model, batch, ctx)``, the
call ``loss_fn(model, batch, ctx.rngs)``, and returning the accuracy from the logits (the
tutorial's ``MultiMetric`` computes it outside the loss).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxfit import Trainer
from tests.programs_support import (EpochMean, assert_bitwise, assert_changed, batches, check_resume, fit_args,
                                    host, rng)


class CNN(nnx.Module):
    """The tutorial's CNN, sizes shrunk (32/64/3136/256 -> 4/8/32/16)."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 4, kernel_size=(3, 3), rngs=rngs)
        self.batch_norm1 = nnx.BatchNorm(4, rngs=rngs)
        self.dropout1 = nnx.Dropout(rate=0.025)
        self.conv2 = nnx.Conv(4, 8, kernel_size=(3, 3), rngs=rngs)
        self.batch_norm2 = nnx.BatchNorm(8, rngs=rngs)
        self.avg_pool = partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
        self.linear1 = nnx.Linear(32, 16, rngs=rngs)
        self.dropout2 = nnx.Dropout(rate=0.025)
        self.linear2 = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x, rngs: nnx.Rngs | None = None):
        x = self.avg_pool(nnx.relu(self.batch_norm1(self.dropout1(self.conv1(x), rngs=rngs))))
        x = self.avg_pool(nnx.relu(self.batch_norm2(self.conv2(x))))
        x = x.reshape(x.shape[0], -1)  # flatten
        x = nnx.relu(self.dropout2(self.linear1(x), rngs=rngs))
        x = self.linear2(x)
        return x


def loss_fn(model: CNN, batch, rngs: nnx.Rngs | None = None):
    """The tutorial's loss, verbatim."""
    logits = model(batch['image'], rngs)
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits=logits, labels=batch['label']
    ).mean()
    return loss, logits


def loss(model, batch, ctx):  # the glue: jaxfit's full form around the tutorial's loss_fn
    value, logits = loss_fn(model, batch, ctx.rngs)
    return value, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}


# -- the tutorial's hand-written steps ----------------------------------------------
@nnx.jit
def train_step(model: CNN, optimizer: nnx.Optimizer, metrics: nnx.MultiMetric, rngs: nnx.Rngs, batch):
    """Train for a single step."""
    grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
    (loss, logits), grads = grad_fn(model, batch, rngs)
    metrics.update(loss=loss, logits=logits, labels=batch['label'])  # In-place updates.
    optimizer.update(model, grads)  # In-place updates.
    return loss, jnp.mean(jnp.argmax(logits, -1) == batch["label"])  # for the epoch replay


@nnx.jit
def eval_step(model: CNN, metrics: nnx.MultiMetric, batch):
    loss, logits = loss_fn(model, batch)
    metrics.update(loss=loss, logits=logits, labels=batch['label'])  # In-place updates.


def data(n, seed=0):
    rng_ = np.random.default_rng(seed)
    return {"image": rng_.random((n, 8, 8, 1), dtype=np.float32),
            "label": rng_.integers(0, 10, n).astype(np.int32)}


def tx():
    return optax.adamw(0.005, 0.9)  # the tutorial's learning_rate and momentum


def test_nnx_tutorial_matches_its_hand_steps_bit_for_bit():
    ds, val, bs, epochs, seed = data(40), data(20, 1), 10, 2, 0
    model = CNN(rngs=nnx.Rngs(0))
    hand = nnx.clone(model)  # fit writes the trained state back into `model`
    before = host(nnx.state(hand, nnx.Param))
    trainer = Trainer(optimizer=tx(), loss=loss, seed=seed)
    history = trainer.fit(model, ds, validation_data=val, epochs=epochs, batch_size=bs, **fit_args())

    optimizer = nnx.Optimizer(hand, tx(), wrt=nnx.Param)
    metrics = nnx.MultiMetric(accuracy=nnx.metrics.Accuracy(), loss=nnx.metrics.Average('loss'))
    train_model = nnx.view(hand, deterministic=False, use_running_average=False)
    eval_model = nnx.view(hand, deterministic=True, use_running_average=True)
    k = 0
    for epoch in range(epochs):
        loss_m, acc_m = EpochMean(), EpochMean()
        for b in batches(ds, bs):
            value, acc = train_step(train_model, optimizer, metrics, nnx.Rngs(rng(seed, k)), b)
            loss_m.add_scalar(value, bs)
            acc_m.add_scalar(acc, bs)
            k += 1
        # The params below are bit-identical; the loss scalar is computed in another XLA
        # program (fused with jaxfit's epoch sums), whose float32 rounding of the batch mean
        # can differ in the last bit (measured: 2e-7 relative), so the epoch loss gets 1e-6.
        np.testing.assert_allclose(history.history["loss"][epoch], loss_m.value, rtol=1e-6)
        assert history.history["accuracy"][epoch] == acc_m.value
        metrics.reset()
        for b in batches(val, bs):
            eval_step(eval_model, metrics, b)
        # The tutorial's Average('loss') weights each batch once; jaxfit weights a batch by
        # its examples. Batches are equal here, so the two differ only in float32 rounding
        # of the sums (sum of means / 2 vs sum of 10 * means / 20).
        np.testing.assert_allclose(history.history["val_loss"][epoch], float(metrics.compute()["loss"]), rtol=1e-6)
        np.testing.assert_allclose(history.history["val_accuracy"][epoch], float(metrics.compute()["accuracy"]),
                                   rtol=1e-6)
        metrics.reset()

    assert_changed(nnx.state(hand, nnx.Param), before)
    # fit wrote params, BatchNorm statistics (and its RNG state) back into `model`.
    assert_bitwise(nnx.state(model, nnx.Param), nnx.state(hand, nnx.Param))
    assert_bitwise(nnx.state(model, nnx.BatchStat), nnx.state(hand, nnx.BatchStat), "batch_stats")
    # nnx.Optimizer wraps its optax state in Variables: compare the arrays in order.
    assert_bitwise(jax.tree_util.tree_leaves(trainer.opt_state), jax.tree_util.tree_leaves(optimizer.opt_state),
                   "opt_state")


@pytest.mark.slow
def test_nnx_tutorial_resumes_bit_for_bit():
    check_resume(Trainer(optimizer=tx(), loss=loss), CNN(rngs=nnx.Rngs(0)), data(30), epochs=2, batch_size=10)
