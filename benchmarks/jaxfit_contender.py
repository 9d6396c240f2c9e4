"""The jaxfit contenders: `Trainer.fit` with the everyday callbacks, and fused execution.

The everyday callbacks are History (always on), RichProgress writing plain lines (stdout is
a pipe here), ModelCheckpoint every epoch and LRScheduler (a cosine decay over the run; on
W4 the workload's own warmup schedule). A callback that this checkout does not have yet is
left out and named in the results.

W1-W3 train with the built-in loss `"softmax_cross_entropy"`, or with `full_form=True`
with `xent_full_form`, the same loss written by a user in the full form. W4 always trains
with lm1b's loss in the full form (`benchmarks.lm1b.lm1b_loss`) on `{"inputs": tokens}`.
"""

from __future__ import annotations

import os

import jax

from benchmarks.measure import Clock
from benchmarks.workloads import Workload

EVERYDAY = ("RichProgress", "ModelCheckpoint", "LRScheduler")


def everyday_callbacks(
    w: Workload, epochs: int, workdir: str, checkpoint: bool = True,
    background: bool | str = True,
) -> tuple[list, list[str]]:
    """The everyday callbacks this checkout has, and the names of those it lacks
    (``background``: ModelCheckpoint's writer)."""
    import optax

    import jaxfit.callbacks as cbs

    made, missing = [], []
    for name in EVERYDAY:
        cls = getattr(cbs, name, None)
        if name == "ModelCheckpoint" and not checkpoint:
            continue
        if cls is None:
            missing.append(name)
        elif name == "RichProgress":
            made.append(cls(live=False))
        elif name == "ModelCheckpoint":
            made.append(cls(os.path.join(workdir, "run"), background=background))
        else:
            total = epochs * w.batches
            made.append(cls(w.schedule() or optax.cosine_decay_schedule(w.learning_rate, total)))
    return made, missing


def xent_full_form(model, batch, ctx):
    """The built-in `"softmax_cross_entropy"` written as a full-form loss: the mean over the
    batch's real rows of the integer-label cross-entropy."""
    import jax.numpy as jnp
    import optax

    import jaxfit

    x, y = batch
    per = optax.softmax_cross_entropy_with_integer_labels(model(x), y)
    return jaxfit.Average(jnp.sum(per * ctx.mask), ctx.weight)


def run_jaxfit(
    w: Workload, epochs: int, clock: Clock, workdir: str, callbacks: bool = False,
    steps_per_execution: int = 1, checkpoint: bool = True, full_form: bool = False,
    scan_unroll: int | str = "auto", background: bool | str = True,
) -> dict:
    """Trains `w` with `jaxfit.Trainer.fit`, timing through a late-running callback."""
    from jaxfit import Callback, Trainer
    from jaxfit._allocator import allocator_status

    arrays = w.data()
    if w.family == "lm":
        from benchmarks.lm1b import lm1b_loss

        data, loss = {"inputs": arrays[0]}, lm1b_loss
    else:
        data, loss = arrays, xent_full_form if full_form else "softmax_cross_entropy"

    class Timing(Callback):
        order = 10_000  # after every other callback: epoch time includes their work

        def __init__(self):
            self.settled = steps_per_execution == 1  # else: once fused-or-single is chosen

        def wants_batch_hooks(self, trainer):
            return clock.t_first is None  # (the hand loop's probe is one test per step)

        def on_train_batch_end(self, trainer, logs):
            if clock.t_first is None:
                jax.block_until_ready(logs["loss"])
                clock.first_step()

        def on_epoch_end(self, trainer, logs):
            # An epoch in which steps_per_execution was still timing its two ways (and
            # compiling the second) is warm-up, like the first.
            clock.epoch_end(warming_up=not self.settled)
            self.settled = self.settled or "execution" in trainer.fit_config

    if steps_per_execution > 1:  # room for those trials (6 executions) before the steady epochs
        epochs += -(-6 * steps_per_execution // w.batches)

    clock.start()
    extra, missing = everyday_callbacks(w, epochs, workdir, checkpoint, background) if callbacks \
        else ([], [])
    scheduled = any(type(c).__name__ == "LRScheduler" for c in extra)
    trainer = Trainer(
        optimizer=w.make_optimizer(inject=True, constant=scheduled), loss=loss, seed=0,
        steps_per_execution=steps_per_execution, scan_unroll=scan_unroll,
    )
    history = trainer.fit(
        w.make_model(), data, epochs=epochs, batch_size=w.batch_size,
        callbacks=[*extra, Timing()],
        verbose=0,  # plain means plain: no default progress bar (the everyday set has its own)
    )
    return {
        "final_loss": history.history["loss"][-1],
        "missing_callbacks": missing,
        "allocator": allocator_status().reason,
        "scan_unroll": trainer.fit_config.get("scan_unroll"),
        "execution": trainer.fit_config.get("execution"),
    }
