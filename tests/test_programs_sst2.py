"""flax examples/sst2: the program's TextClassifier (``tests/programs_models/sst2.py``,
verbatim; shrunk through its constructor) called as ``model(token_ids, lengths)`` with its
``deterministic`` flag filled in by jaxfit (False in training: dropout and word dropout on;
True in evaluation), on bucketed batches of different padded lengths given as an iterable;
its sigmoid cross-entropy and summed metrics; against the source's ``train_step`` and
``eval_step`` (verbatim).

Keys: the source folds the step into a per-epoch key (``fold_in(rng, state.step)``);
jaxfit's step key is ``fold_in(fold_in(key(seed), 1), step)``, so the hand loop passes
``rngs={"dropout": fold_in(key(seed), 1)}`` in every epoch (``state.step`` counts steps
over the whole run, so keys never repeat) and the source's derivation gives jaxfit's keys.

Glue beyond the program's model and loss: 3 lines — ``def loss(model, batch, ctx)``, the
model call on the batch's two inputs, and the accuracy as ``Average(sum, count)`` from the
source's ``compute_metrics``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct
from flax.training import train_state

from jaxfit import Average, Trainer
from tests.programs_models import sst2 as models
from tests.programs_support import EpochMean, assert_bitwise, assert_changed, check_resume, fit_args


def model():
    return models.TextClassifier(embedding_size=4, hidden_size=4, vocab_size=12, output_size=1,
                                 dropout_rate=0.5, word_dropout_rate=0.2, unk_idx=1)


# -- the source's loss, metrics and steps (examples/sst2/train.py) -------------------------
@struct.dataclass
class Metrics:
    loss: float
    accuracy: float
    count: int | None = None


def sigmoid_cross_entropy_with_logits(*, labels, logits):
    zeros = jnp.zeros_like(logits, dtype=logits.dtype)
    condition = logits >= zeros
    relu_logits = jnp.where(condition, logits, zeros)
    neg_abs_logits = jnp.where(condition, -logits, logits)
    return relu_logits - logits * labels + jnp.log1p(jnp.exp(neg_abs_logits))


def compute_metrics(*, labels, logits):
    if labels.ndim == 1:
        labels = jnp.expand_dims(labels, axis=1)
    loss = sigmoid_cross_entropy_with_logits(labels=labels, logits=logits)
    binary_predictions = logits >= 0.0
    binary_accuracy = jnp.equal(binary_predictions, labels)
    return Metrics(loss=jnp.sum(loss), accuracy=jnp.sum(binary_accuracy), count=logits.shape[0])


@jax.jit
def train_step(state, batch, rngs):
    step = state.step
    rngs = {name: jax.random.fold_in(rng, step) for name, rng in rngs.items()}

    def loss_fn(params):
        variables = {'params': params}
        logits = state.apply_fn(variables, batch['token_ids'], batch['length'], deterministic=False, rngs=rngs)
        labels = batch['label']
        if labels.ndim == 1:
            labels = jnp.expand_dims(labels, 1)
        loss = jnp.mean(sigmoid_cross_entropy_with_logits(labels=labels, logits=logits))
        return loss, logits

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    value, grads = grad_fn(state.params)
    (_, logits) = value
    new_state = state.apply_gradients(grads=grads)
    metrics = compute_metrics(labels=batch['label'], logits=logits)
    return new_state, metrics


@jax.jit
def eval_step(state, batch, rngs):
    variables = {'params': state.params}
    logits = state.apply_fn(variables, batch['token_ids'], batch['length'], deterministic=True, rngs=rngs)
    return compute_metrics(labels=batch['label'], logits=logits)


def loss(model, batch, ctx):  # the glue
    logits = model(batch['token_ids'], batch['length'])
    labels = jnp.expand_dims(batch['label'], 1)
    m = compute_metrics(labels=batch['label'], logits=logits)
    return jnp.mean(sigmoid_cross_entropy_with_logits(labels=labels, logits=logits)), {
        "accuracy": Average(m.accuracy, m.count)}


def tx():  # the source's create_train_state, its config's values
    return optax.chain(optax.sgd(learning_rate=0.1, momentum=0.9), optax.add_decayed_weights(weight_decay=3e-6))


def bucketed(seed=0, lengths=(4, 6, 4), rows=4):
    """Batches padded to their bucket's length (token 0 = padding, 1 = unknown)."""
    rng, out = np.random.default_rng(seed), []
    for L in lengths:
        length = rng.integers(1, L + 1, rows).astype(np.int32)
        ids = rng.integers(2, 12, (rows, L)).astype(np.int32) * (np.arange(L) < length[:, None])
        out.append({"token_ids": ids, "length": length, "label": rng.integers(0, 2, rows).astype(np.float32)})
    return out


def test_sst2_matches_the_source_steps_on_bucketed_batches():
    ds, val, epochs, seed = bucketed(), bucketed(1, (5, 5)), 2, 0
    params = model().init(jax.random.key(3), jnp.ones((2, 3), jnp.int32), jnp.ones((2,), jnp.int32),
                          deterministic=True)["params"]  # the source's get_initial_params
    trainer = Trainer(optimizer=tx(), loss=loss, seed=seed)
    history = trainer.fit(model(), ds, validation_data=val, epochs=epochs, initial_params=params, **fit_args())

    state = train_state.TrainState.create(apply_fn=model().apply, params=params, tx=tx())
    rngs = {"dropout": jax.random.fold_in(jax.random.key(seed), 1)}
    for epoch in range(epochs):
        loss_m, acc_m = EpochMean(), EpochMean()
        for b in ds:
            state, m = train_step(state, b, rngs)
            loss_m.add(m.loss, m.count)  # the source's normalize_batch_metrics: sums / count
            acc_m.add(m.accuracy, m.count)
        # jaxfit weighs each batch's mean loss by its rows; the source sums the loss: the same
        # value up to float32 rounding of (mean * rows) vs sum, and another XLA program: 1e-6.
        np.testing.assert_allclose(history.history["loss"][epoch], loss_m.value, rtol=1e-6)
        assert history.history["accuracy"][epoch] == acc_m.value
        ms = [eval_step(state, b, rngs) for b in val]
        np.testing.assert_allclose(history.history["val_loss"][epoch], sum(float(m.loss) for m in ms) / 8, rtol=1e-6)
        assert history.history["val_accuracy"][epoch] == sum(float(m.accuracy) for m in ms) / 8
    assert_changed(state.params, params)
    assert_bitwise(trainer.params, state.params)
    assert trainer.trace_counts["train"] == 2  # one compile per bucket length (4 and 6)


@pytest.mark.slow
def test_sst2_resumes_bit_for_bit():
    check_resume(Trainer(optimizer=tx(), loss=loss), model(), bucketed(), epochs=2)
