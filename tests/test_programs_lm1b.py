"""flax examples/lm1b: the program's TransformerLM (``tests/programs_models/lm1b.py``,
verbatim; shrunk through its TransformerConfig) on packed batches — inputs plus positions
and segmentation, 0 = padding — with its token-weighted loss sum(weighted CE) / sum(weights)
as ``jaxfit.Average`` and accuracy as a ratio of sums, trained by jaxfit in the full form
against the source's ``train_step`` (verbatim but for ``lax.pmean``/``pmap``).

Keys: the source derives each step's dropout key as ``fold_in(dropout_rng, state.step)``;
jaxfit's step key is ``fold_in(fold_in(key(seed), 1), step)``, so the hand loop passes
``dropout_rng = fold_in(key(seed), 1)`` and the source's own derivation gives the same keys.

Glue beyond the program's model and loss: 4 lines — ``def loss(model, batch, ctx)``, the
model call with the batch's keys, and ``return Average(loss, weight_sum), {"accuracy":
Average(acc, weight_sum)}`` (the source returns the sums and divides them itself).

Falls short: the program's dropout switch lives in its config (``deterministic``), not in
``__call__``; evaluating it needs a second module (``config.replace(deterministic=True)``),
which a loss cannot swap, so no validation here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax.training import common_utils, train_state

from jaxfit import Average, Trainer
from tests.programs_models import lm1b as models
from tests.programs_support import EpochMean, assert_bitwise, assert_changed, batches, check_resume, fit_args

CONFIG = models.TransformerConfig(vocab_size=16, output_vocab_size=16, emb_dim=8, num_heads=2, num_layers=1,
                                  qkv_dim=8, mlp_dim=16, max_len=8, dropout_rate=0.1, attention_dropout_rate=0.1)


# -- the source's loss pieces (examples/lm1b/train.py, verbatim) -----------------------
def compute_weighted_cross_entropy(logits, targets, weights=None, label_smoothing=0.0):
    vocab_size = logits.shape[-1]
    confidence = 1.0 - label_smoothing
    low_confidence = (1.0 - confidence) / (vocab_size - 1)
    normalizing_constant = -(
        confidence * jnp.log(confidence) + (vocab_size - 1) * low_confidence * jnp.log(low_confidence + 1e-20))
    soft_targets = common_utils.onehot(targets, vocab_size, on_value=confidence, off_value=low_confidence)
    loss = -jnp.sum(soft_targets * nn.log_softmax(logits), axis=-1)
    loss = loss - normalizing_constant
    normalizing_factor = np.prod(targets.shape)
    if weights is not None:
        loss = loss * weights
        normalizing_factor = weights.sum()
    return loss.sum(), normalizing_factor


def compute_weighted_accuracy(logits, targets, weights=None):
    loss = jnp.equal(jnp.argmax(logits, axis=-1), targets)
    normalizing_factor = np.prod(logits.shape[:-1])
    if weights is not None:
        loss = loss * weights
        normalizing_factor = weights.sum()
    return loss.sum(), normalizing_factor


def compute_metrics(logits, labels, weights, label_smoothing=0.0):
    loss, weight_sum = compute_weighted_cross_entropy(logits, labels, weights, label_smoothing)
    acc, _ = compute_weighted_accuracy(logits, labels, weights)
    return {"loss": loss, "accuracy": acc, "denominator": weight_sum}


def train_step(state, batch, config, learning_rate_fn, label_smoothing=0.0, dropout_rng=None):
    """The source's train_step (without its pmap collectives)."""
    train_keys = ["inputs", "inputs_position", "inputs_segmentation"]
    (inputs, inputs_positions, inputs_segmentation) = (batch.get(k, None) for k in train_keys)
    weights = jnp.where(inputs > 0, 1, 0).astype(jnp.float32)
    dropout_rng = jax.random.fold_in(dropout_rng, state.step)

    def loss_fn(params):
        logits = models.TransformerLM(config).apply(
            {"params": params}, inputs, inputs_positions=inputs_positions,
            inputs_segmentation=inputs_segmentation, rngs={"dropout": dropout_rng})
        loss, weight_sum = compute_weighted_cross_entropy(logits, inputs, weights, label_smoothing)
        mean_loss = loss / weight_sum
        return mean_loss, logits

    step = state.step
    lr = learning_rate_fn(step)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (_, logits), grads = grad_fn(state.params)
    new_state = state.apply_gradients(grads=grads)
    metrics = compute_metrics(logits, inputs, weights)
    metrics["learning_rate"] = lr
    return new_state, metrics


def loss(model, batch, ctx):  # the glue: the source's loss_fn in jaxfit's full form
    inputs = batch["inputs"]
    weights = jnp.where(inputs > 0, 1, 0).astype(jnp.float32)
    logits = model(inputs, inputs_positions=batch["inputs_position"], inputs_segmentation=batch["inputs_segmentation"])
    total, weight_sum = compute_weighted_cross_entropy(logits, inputs, weights)
    acc, _ = compute_weighted_accuracy(logits, inputs, weights)
    return Average(total, weight_sum), {"accuracy": Average(acc, weight_sum)}


def learning_rate_fn(step):
    return 3e-3 * jnp.minimum(1.0, (step + 1) / 4)  # a short warmup, as the source's rsqrt schedule


def tx():
    return optax.adamw(learning_rate_fn, b1=0.9, b2=0.98, eps=1e-9, weight_decay=0.1)  # the source's


def data(n=12, length=8, seed=0):
    """Packed rows: two sequences of random lengths, then padding (token 0)."""
    rng = np.random.default_rng(seed)
    inputs = np.zeros((n, length), np.int32)
    position, segmentation = np.zeros_like(inputs), np.zeros_like(inputs)
    for r in range(n):
        at = 0
        sizes = (1, 1) if r < 4 else rng.integers(1, 5, 2)  # the first batch has few tokens
        for seg, size in enumerate(sizes, start=1):
            inputs[r, at:at + size] = rng.integers(1, 16, size)
            position[r, at:at + size] = np.arange(size)
            segmentation[r, at:at + size] = seg
            at += size
    return {"inputs": inputs, "inputs_position": position, "inputs_segmentation": segmentation}


def test_lm1b_matches_the_source_step_with_token_weighted_metrics():
    ds, bs, epochs, seed = data(), 4, 2, 0
    params = models.TransformerLM(CONFIG.replace(deterministic=True)).init(
        jax.random.key(1), jnp.ones((1, 8), jnp.int32))["params"]  # the source's initialize
    trainer = Trainer(optimizer=tx(), loss=loss, seed=seed)
    history = trainer.fit(models.TransformerLM(CONFIG), ds, epochs=epochs, batch_size=bs, initial_params=params,
                          **fit_args())

    step = jax.jit(functools.partial(train_step, config=CONFIG, learning_rate_fn=learning_rate_fn))
    state = train_state.TrainState.create(apply_fn=None, params=params, tx=tx())
    dropout_rng = jax.random.fold_in(jax.random.key(seed), 1)
    for epoch in range(epochs):
        loss_m, acc_m, batch_means = EpochMean(), EpochMean(), []
        for b in batches(ds, bs):
            state, m = step(state, b, dropout_rng=dropout_rng)
            loss_m.add(m["loss"], m["denominator"])
            acc_m.add(m["accuracy"], m["denominator"])
            batch_means.append(float(m["loss"] / m["denominator"]))
        # The epoch values are ratios of sums over every token of the epoch; jaxfit adds the
        # same float32 sums in the same order (bit-identical when XLA rounds the train step's
        # sums alike; 1e-6 leaves room for another fusion of the same sums).
        np.testing.assert_allclose(history.history["loss"][epoch], loss_m.value, rtol=1e-6)
        np.testing.assert_allclose(history.history["accuracy"][epoch], acc_m.value, rtol=1e-6)
        # ... which is not the mean of the batch means (what a per-example average gives).
        assert abs(np.mean(batch_means) - loss_m.value) > 1e-4
    assert_changed(state.params, params)
    assert_bitwise(trainer.params, state.params)


@pytest.mark.slow
def test_lm1b_resumes_bit_for_bit():
    check_resume(Trainer(optimizer=tx(), loss=loss), models.TransformerLM(CONFIG), data(), epochs=2, batch_size=4)
