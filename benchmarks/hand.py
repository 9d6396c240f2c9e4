"""Contenders A (hand loop) and B (hand scan): idiomatic Flax linen + Optax, no library.

A: a `jax.jit` step with params and optimizer state donated, a numpy batch fed per step, the
loss fetched once per epoch. B: the same step, K of them fused in one jitted `lax.scan`
(`unroll=1`, rolled, or `unroll=K`, unrolled); the steps of an epoch that do not fill a
whole execution run through the single-step function.
"""

from __future__ import annotations

import jax
import numpy as np
import optax

from benchmarks.measure import Clock
from benchmarks.workloads import Workload


def _make_step(model, tx):
    def loss_fn(params, x, y):
        logits = model.apply(params, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def run_hand(w: Workload, epochs: int, clock: Clock, k: int = 1, unroll: bool = False) -> dict:
    """Trains `w` for `epochs` epochs with the hand loop (k=1) or the hand scan (k>1)."""
    x, y = w.data()
    clock.start()
    model, tx = w.make_model(), w.make_optimizer()
    params = model.init(jax.random.key(0), x[:1])
    opt_state = tx.init(params)
    raw_step = _make_step(model, tx)
    step = jax.jit(raw_step, donate_argnums=(0, 1))

    def multi(params, opt_state, xs, ys):
        def body(carry, batch):
            params, opt_state, loss = raw_step(*carry, *batch)
            return (params, opt_state), loss

        (params, opt_state), losses = jax.lax.scan(
            body, (params, opt_state), (xs, ys), unroll=k if unroll else 1
        )
        return params, opt_state, losses

    fused = jax.jit(multi, donate_argnums=(0, 1))
    b, n = w.batch_size, w.batches
    rng = np.random.default_rng(0)
    loss = None
    for _ in range(epochs):
        idx = rng.permutation(n * b)
        losses = []
        i = 0
        while i + k <= n and k > 1:
            sel = idx[i * b : (i + k) * b]
            xs = x[sel].reshape(k, b, *x.shape[1:])
            params, opt_state, out = fused(params, opt_state, xs, y[sel].reshape(k, b))
            losses.append(out)
            if clock.t_first is None:
                out.block_until_ready()
                clock.first_step()
            i += k
        for j in range(i, n):
            sel = idx[j * b : (j + 1) * b]
            params, opt_state, out = step(params, opt_state, x[sel], y[sel])
            losses.append(out)
            if clock.t_first is None:
                out.block_until_ready()
                clock.first_step()
        loss = float(np.mean(np.concatenate([np.ravel(v) for v in jax.device_get(losses)])))
        clock.epoch_end()
    return {"final_loss": loss}
