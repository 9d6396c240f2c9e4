"""The jaxfit contenders: `Trainer.fit` with the everyday callbacks, and fused execution.

The everyday callbacks are History (always on), RichProgress writing plain lines (stdout is
a pipe here), ModelCheckpoint every epoch and LRScheduler (a cosine decay over the run). A
callback that this checkout does not have yet is left out and named in the results.
"""

from __future__ import annotations

import os

import jax

from benchmarks.measure import Clock
from benchmarks.workloads import Workload

EVERYDAY = ("RichProgress", "ModelCheckpoint", "LRScheduler")


def everyday_callbacks(
    w: Workload, epochs: int, workdir: str, checkpoint: bool = True
) -> tuple[list, list[str]]:
    """The everyday callbacks this checkout has, and the names of those it lacks."""
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
            made.append(cls(os.path.join(workdir, "run")))
        else:
            total = epochs * w.batches
            made.append(cls(optax.cosine_decay_schedule(w.learning_rate, total)))
    return made, missing


def run_jaxfit(
    w: Workload, epochs: int, clock: Clock, workdir: str, callbacks: bool = False,
    steps_per_execution: int = 1, checkpoint: bool = True,
) -> dict:
    """Trains `w` with `jaxfit.Trainer.fit`, timing through a late-running callback."""
    from jaxfit import Callback, Trainer
    from jaxfit._allocator import allocator_status

    x, y = w.data()

    class Timing(Callback):
        order = 10_000  # after every other callback: epoch time includes their work

        def on_train_batch_end(self, trainer, logs):
            if clock.t_first is None:
                jax.block_until_ready(logs["loss"])
                clock.first_step()

        def on_epoch_end(self, trainer, logs):
            clock.epoch_end()

    clock.start()
    extra, missing = everyday_callbacks(w, epochs, workdir, checkpoint) if callbacks else ([], [])
    trainer = Trainer(
        optimizer=w.make_optimizer(inject=True), loss="softmax_cross_entropy", seed=0,
        steps_per_execution=steps_per_execution,
    )
    history = trainer.fit(
        w.make_model(), (x, y), epochs=epochs, batch_size=w.batch_size,
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
