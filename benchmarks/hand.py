"""Contenders A (hand loop) and B (hand scan): idiomatic Flax linen + Optax, no library.

A: a `jax.jit` step with its state (params and optimizer state) donated, a numpy batch fed
per step, the loss fetched once per epoch. B: the same step, K of them fused in one jitted
`lax.scan` (`unroll=1`, rolled, or `unroll=K`, unrolled); the steps of an epoch that do not
fill a whole execution run through the single-step function.

W1-W3's step is the classifier's `value_and_grad` of the mean cross-entropy; W4's is flax
lm1b's `train_step` (`benchmarks/lm1b.py`) over a flax `TrainState`, its metrics sums
divided at the epoch's end.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import optax
from flax import serialization

from benchmarks.measure import Clock
from benchmarks.workloads import Workload


def _classifier(w: Workload, arrays: tuple):
    """`(state, step(state, x, y) -> (state, loss), epoch_loss(fetched))` for W1-W3."""
    model, tx = w.make_model(), w.make_optimizer()
    params = model.init(jax.random.key(0), arrays[0][:1])
    state = (params, tx.init(params))

    def loss_fn(params, x, y):
        logits = model.apply(params, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def step(state, x, y):
        params, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    def epoch_loss(losses):
        return float(np.mean(np.concatenate([np.ravel(v) for v in losses])))

    return state, step, epoch_loss


def lm_state(w: Workload, tokens: np.ndarray, seed: int = 0):
    """W4's initial flax `TrainState` (params from lm1b's init on one row, evaluation mode)."""
    from flax.training import train_state

    model = w.make_model()
    params = model.init(jax.random.key(seed), tokens[:1], deterministic=True)["params"]
    return train_state.TrainState.create(apply_fn=model.apply, params=params,
                                         tx=w.make_optimizer())


def _lm(w: Workload, arrays: tuple):
    """W4: lm1b's train step; the epoch's loss is its summed loss over its summed weights."""
    from benchmarks.lm1b import make_train_step

    state = lm_state(w, arrays[0])
    # lm1b folds the step into its dropout key; key(seed) folded with 1 is jaxfit's stream.
    dropout_rng = jax.random.fold_in(jax.random.key(0), 1)
    step = make_train_step(w.make_model(), w.schedule(), dropout_rng)

    def epoch_loss(metrics):
        total = sum(float(np.sum(m["loss"])) for m in metrics)
        return total / sum(float(np.sum(m["denominator"])) for m in metrics)

    return state, step, epoch_loss


KEEP = 3  # checkpoints kept, as ModelCheckpoint's keep_last


class HandSave:
    """A checkpoint each epoch written as a hand loop does, inline: the state fetched and
    serialized with `flax.serialization.to_bytes`, written to a temporary file, fsynced and
    renamed into place (then the directory fsynced); the one `KEEP` epochs back deleted."""

    def __init__(self, workdir: str) -> None:
        self.dir = os.path.join(workdir, "hand-ckpt")
        os.makedirs(self.dir, exist_ok=True)

    def __call__(self, state, epoch: int) -> None:
        data = serialization.to_bytes(jax.device_get(state))
        path = os.path.join(self.dir, f"checkpoint_{epoch}")
        with open(path + ".tmp", "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        old = os.path.join(self.dir, f"checkpoint_{epoch - KEEP}")
        if os.path.exists(old):
            os.remove(old)

    def close(self) -> None:
        pass


class OrbaxSave:
    """A checkpoint each epoch with Orbax's `CheckpointManager` (asynchronous saves, the
    `KEEP` newest kept), as the flax examples save now."""

    def __init__(self, workdir: str) -> None:
        import orbax.checkpoint as ocp

        self.ocp = ocp
        self.manager = ocp.CheckpointManager(
            os.path.join(os.path.abspath(workdir), "orbax-ckpt"),
            options=ocp.CheckpointManagerOptions(max_to_keep=KEEP,
                                                 enable_async_checkpointing=True))

    def __call__(self, state, epoch: int) -> None:
        self.manager.save(epoch, args=self.ocp.args.StandardSave(state))

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def run_hand(w: Workload, epochs: int, clock: Clock, k: int = 1, unroll: bool = False,
             save: str | None = None, workdir: str | None = None) -> dict:
    """Trains `w` for `epochs` epochs with the hand loop (k=1) or the hand scan (k>1);
    `save`: "hand" or "orbax" writes a checkpoint at each epoch's end (in `workdir`)."""
    arrays = w.data()
    clock.start()
    saver = None if save is None else (HandSave if save == "hand" else OrbaxSave)(workdir or ".")
    state, raw_step, epoch_loss = (_lm if w.family == "lm" else _classifier)(w, arrays)
    step = jax.jit(raw_step, donate_argnums=(0,))

    def multi(state, *stacked):
        return jax.lax.scan(lambda s, batch: raw_step(s, *batch), state, stacked,
                            unroll=k if unroll else 1)

    fused = jax.jit(multi, donate_argnums=(0,))
    b, n = w.batch_size, w.batches
    rng = np.random.default_rng(0)
    loss = None
    for epoch in range(1, epochs + 1):
        idx = rng.permutation(n * b)
        outs = []
        i = 0
        while i + k <= n and k > 1:
            sel = idx[i * b : (i + k) * b]
            state, out = fused(state, *[a[sel].reshape(k, b, *a.shape[1:]) for a in arrays])
            outs.append(out)
            if clock.t_first is None:
                jax.block_until_ready(out)
                clock.first_step()
            i += k
        for j in range(i, n):
            sel = idx[j * b : (j + 1) * b]
            state, out = step(state, *[a[sel] for a in arrays])
            outs.append(out)
            if clock.t_first is None:
                jax.block_until_ready(out)
                clock.first_step()
        loss = epoch_loss(jax.device_get(outs))
        if saver is not None:
            saver(state, epoch)
        clock.epoch_end()
    if saver is not None:
        saver.close()
    return {"final_loss": loss}
