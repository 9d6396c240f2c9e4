"""Issue 12, points 1-2: any batch pytree, and padding that never leaks.

The proofs are hand-written loops on ragged data (70 samples, batches of 16: the last
batch has 6): a BatchNorm model and a batch-wide (contrastive) loss end where the loop
ends, and the same loop with a padded last batch ends measurably elsewhere, so the
comparison would catch a leak."""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxfit import Trainer
from jaxfit.errors import ConfigError, DataError

N, B, SEED = 70, 16, 3


class BNNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(8)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)
        return nn.Dense(3)(nn.relu(x))


def _ragged():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(N, 4)) * 3 + 2).astype(np.float32)
    return x, ((x[:, 0] > 2).astype(np.int32) + (x[:, 1] > 2))


def _batches(epoch, pad):
    perm = np.random.default_rng([SEED, epoch]).permutation(N)
    for i in range(0, N, B):
        idx = perm[i:i + B]
        if pad and len(idx) < B:  # what a padding trainer would feed: zero rows appended
            yield idx, len(idx)
            continue
        yield idx, None


def _close(a, b):
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=2e-5, atol=2e-6)


def _far(a, b, at_least):
    return max(float(np.max(np.abs(np.asarray(u) - np.asarray(v))))
               for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))) > at_least


def test_batchnorm_on_ragged_data_matches_the_hand_loop_params_and_statistics():
    x, y = _ragged()
    model, tx = BNNet(), optax.sgd(0.1)
    variables = jax.device_get(model.init(jax.random.key(7), x[:B]))  # host copies: fit donates
    trainer = Trainer(optimizer=tx, loss="softmax_cross_entropy", seed=SEED)
    trainer.fit(model, (x, y), epochs=2, batch_size=B, verbose=0, initial_params=variables["params"])

    @jax.jit
    def step(params, stats, opt_state, xb, yb, mask):
        def loss_fn(p):
            logits, upd = model.apply({"params": p, "batch_stats": stats}, xb, train=True,
                                      mutable=["batch_stats"])
            per = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
            return jnp.sum(per * mask) / jnp.sum(mask), upd["batch_stats"]

        grads, stats = jax.grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state

    def hand(pad):
        params, stats = variables["params"], variables["batch_stats"]
        opt_state = tx.init(params)
        for epoch in (1, 2):
            for idx, real in _batches(epoch, pad):
                xb, yb, mask = x[idx], y[idx], np.ones(len(idx), np.float32)
                if real is not None:  # padded to B with zero rows, masked out of the loss only
                    xb = np.concatenate([xb, np.zeros((B - real, 4), np.float32)])
                    yb = np.concatenate([yb, np.zeros(B - real, yb.dtype)])
                    mask = (np.arange(B) < real).astype(np.float32)
                params, stats, opt_state = step(params, stats, opt_state, xb, yb, mask)
        return params, stats

    params, stats = hand(pad=False)
    _close(trainer.params, params)
    _close(trainer.model_state["batch_stats"], stats)
    padded_params, padded_stats = hand(pad=True)
    assert _far(padded_stats, stats, 0.05) and _far(padded_params, params, 1e-3)
    assert trainer.trace_counts["train"] == 2  # full batches and the 6-row batch: one more compile


def _contrastive(model, batch, ctx):
    """InfoNCE over the batch: every row is scored against every other row, so a zero row
    would change every term."""
    x, _ = batch
    z = model(x)
    z = z / jnp.linalg.norm(z, axis=-1, keepdims=True)
    logits = z @ z.T / 0.5
    logits = jnp.where(jnp.eye(len(z), dtype=bool), -1e9, logits)
    return -jnp.mean(jax.nn.log_softmax(logits)[:, ::-1].diagonal())


class Embed(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(5)(jnp.tanh(nn.Dense(8)(x)))


def test_a_batch_wide_loss_on_ragged_data_matches_the_hand_loop():
    x, y = _ragged()
    model, tx = Embed(), optax.sgd(0.05)
    params0 = jax.device_get(model.init(jax.random.key(1), x[:B])["params"])
    trainer = Trainer(optimizer=tx, loss=_contrastive, seed=SEED)
    history = trainer.fit(model, (x, y), epochs=2, batch_size=B, verbose=0, initial_params=params0)

    def loss_of(p, xb):
        return _contrastive(lambda v: model.apply({"params": p}, v), (xb, None), None)

    @jax.jit
    def step(params, opt_state, xb):
        loss, grads = jax.value_and_grad(loss_of)(params, xb)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def hand(pad):
        params, opt_state, losses = params0, tx.init(params0), []
        for epoch in (1, 2):
            for idx, real in _batches(epoch, pad):
                xb = x[idx]
                if real is not None:
                    xb = np.concatenate([xb, np.zeros((B - real, 4), np.float32)])
                params, opt_state, loss = step(params, opt_state, xb)
                losses.append(float(loss))
        return params, losses

    params, losses = hand(pad=False)
    _close(trainer.params, params)
    padded_params, padded_losses = hand(pad=True)
    assert abs(padded_losses[4] - losses[4]) > 0.05  # the last batch's loss, padded or not
    assert _far(padded_params, params, 1e-4)
    assert np.isfinite(history.history["loss"]).all()


def test_drop_remainder_leaves_the_last_partial_batch_out():
    x, y = _ragged()
    trainer = Trainer(optimizer=optax.sgd(0.1), seed=0)
    trainer.fit(BNNet(), (x, y), epochs=2, batch_size=B, drop_remainder=True, verbose=0)
    assert trainer.step == 2 * (N // B)
    assert trainer.trace_counts["train"] == 1


# ------------------------------------------------------------------ graph-style batches
class Graph(NamedTuple):
    """A jraph-style batch: nodes, edges and graphs have different leading sizes."""

    nodes: np.ndarray      # (n_nodes, 3)
    senders: np.ndarray    # (n_edges,)
    receivers: np.ndarray  # (n_edges,)
    graph_of: np.ndarray   # (n_nodes,) which graph a node belongs to
    labels: np.ndarray     # (n_graphs,)


N_GRAPHS = 2


def _graph(i):
    rng = np.random.default_rng(i)
    nodes, edges = 5 + i % 3, 7 + i % 4
    return Graph(rng.normal(size=(nodes, 3)).astype(np.float32),
                 rng.integers(0, nodes, edges).astype(np.int32),
                 rng.integers(0, nodes, edges).astype(np.int32),
                 (np.arange(nodes) % N_GRAPHS).astype(np.int32),
                 rng.integers(0, 2, N_GRAPHS).astype(np.int32))


class GraphNet(nn.Module):
    @nn.compact
    def __call__(self, g: Graph):
        h = nn.Dense(4)(g.nodes)
        messages = jax.ops.segment_sum(h[g.senders], g.receivers, num_segments=g.nodes.shape[0])
        h = nn.relu(h + messages)
        pooled = jax.ops.segment_sum(h, g.graph_of, num_segments=N_GRAPHS)
        return nn.Dense(2)(pooled)


def _graph_loss(model, batch, ctx):
    logits = model(batch)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch.labels).mean()
    return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch.labels)}


def test_graph_batches_go_through_fit_evaluate_and_predict_whole():
    graphs = [_graph(i) for i in range(6)]
    trainer = Trainer(optimizer=optax.adam(0.01), loss=_graph_loss, seed=0)
    history = trainer.fit(GraphNet(), graphs, epochs=3, verbose=0)
    assert trainer.step == 18 and len(history.history["accuracy"]) == 3
    logs = trainer.evaluate(graphs)
    assert set(logs) == {"loss", "accuracy"}
    # the evaluation is the mean over graph batches, each a whole batch
    per = []
    for g in graphs:
        logits = GraphNet().apply({"params": trainer.params}, g)
        per.append(float(optax.softmax_cross_entropy_with_integer_labels(logits, g.labels).mean()))
    assert logs["loss"] == pytest.approx(np.mean(per), rel=1e-5)
    out = trainer.predict(graphs)
    assert out.shape == (6 * N_GRAPHS, 2)
    np.testing.assert_allclose(out[:2], GraphNet().apply({"params": trainer.params}, graphs[0]),
                               rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ which batches are (inputs, targets)
class TwoInputs(nn.Module):
    @nn.compact
    def __call__(self, a, b):
        return nn.Dense(3)(jnp.concatenate([a, b], -1))


def test_a_dict_is_split_by_target_key_and_a_pair_is_inputs_targets():
    x, y = _ragged()
    t = Trainer(optimizer=optax.sgd(0.1), seed=0)
    t.fit(TwoInputs(), {"a": x[:, :2], "b": x[:, 2:], "label": y}, epochs=1, batch_size=B, verbose=0)
    assert t.step == 5
    # a 2-tuple is (inputs, targets); several inputs go in a tuple inside the pair
    t2 = Trainer(optimizer=optax.sgd(0.1), seed=0)
    t2.fit(TwoInputs(), ((x[:, :2], x[:, 2:]), y), epochs=1, batch_size=B, verbose=0)
    _close(t.params, t2.params)


def test_targets_are_optional_for_the_full_form():
    x, _ = _ragged()
    t = Trainer(optimizer=optax.sgd(0.05), loss=_contrastive_x, seed=0)
    t.fit(Embed(), x, epochs=1, batch_size=B, verbose=0)
    assert t.step == 5


def _contrastive_x(model, batch, ctx):
    return _contrastive(model, (batch, None), ctx)


def test_batch_size_for_an_iterable_of_batches_is_an_error_before_any_work():
    x, y = _ragged()
    batches = [(x[i:i + 10], y[i:i + 10]) for i in range(0, N, 10)]
    t = Trainer(optimizer=optax.sgd(0.1), seed=0)
    with pytest.raises(DataError, match="batch_size=8 was given, but the training data is an iterable"):
        t.fit(BNNet(), batches, batch_size=8, verbose=0)
    assert t._es is None  # nothing was initialised


def test_steps_per_epoch_for_arrays_is_an_error():
    x, y = _ragged()
    with pytest.raises(ConfigError, match="steps_per_epoch=3 is for an iterable"):
        Trainer(optimizer=optax.sgd(0.1)).fit(BNNet(), (x, y), steps_per_epoch=3, verbose=0)


def test_an_epochs_order_drawn_ahead_is_the_one_it_would_draw_itself():
    # The next epoch's permutation is drawn while the last steps of an epoch run: whichever
    # epoch is asked for next, its batches are those a fresh source gives for it.
    from jaxfit.data import ArrayData

    x = np.arange(50, dtype=np.float32)[:, None]
    data = (x, np.arange(50))

    def batches(source, epoch, **kw):
        return [np.asarray(ex.batch[1]).tolist() for ex in source.executions(epoch, **kw)]

    ahead = ArrayData(data, 8, shuffle=True, seed=3)
    batches(ahead, 1)  # the whole epoch: epoch 2's order is drawn ahead
    assert batches(ahead, 2) == batches(ArrayData(data, 8, shuffle=True, seed=3), 2)
    batches(ahead, 3, limit=2)  # a partial epoch (max_steps) draws nothing ahead
    batches(ahead, 2)
    assert batches(ahead, 5) == batches(ArrayData(data, 8, shuffle=True, seed=3), 5)
    assert batches(ahead, 2) != batches(ahead, 3)
