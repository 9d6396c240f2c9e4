"""What a checkpoint every epoch costs on W1, and where: the writer thread's CPU per save.

W1's epoch lasts ~13 ms, so a ModelCheckpoint every epoch weighs on it more than on any other
workload. This runs W1 with the everyday callbacks, with and without ModelCheckpoint,
alternating in one process (``--reps`` pairs), and reports per epoch (medians over the
epochs after the first ``--skip``):

- ``epoch ms``: wall time from one epoch's end to the next;
- ``steps ms``: from the epoch's first to its last step callback (the steps' own pace, which
  the writer thread slows down when it holds the interpreter lock);
- ``boundary ms``: from an epoch's last step callback to the next epoch's first (metric
  fetch, epoch-end callbacks, the checkpoint's snapshot, one step);
- for the checkpoint run, ModelCheckpoint's ``stats`` (``blocking``, ``write``: medians) and
  the writer thread's user and system CPU per save (``getrusage(RUSAGE_THREAD)``, Linux:
  means, as the kernel counts them in clock ticks).

``inline`` writes on the training thread (``background=False``): the whole write then
lies in the boundary, and the steps run with no writer beside them. Two more writers take
parts of the save away, to find where its cost lies (diagnostics, not ways to run):
``no-fsync`` makes ``os.fsync`` a no-op during the fit, ``no-write`` skips the write and
retention (the writer thread still fetches the snapshot).

    python -m benchmarks.checkpoint_epoch                  # 3 pairs of 40 epochs
    python -m benchmarks.checkpoint_epoch --reps 5 --epochs 60
    python -m benchmarks.checkpoint_epoch --writers thread,no-fsync,no-write,inline
    python -m benchmarks.checkpoint_epoch --reps 1 --epochs 600 --late 35 --writers thread
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import statistics
import sys
import tempfile
import time
from contextlib import redirect_stdout

_WRITERS: dict[str, bool | str] = {"process": "process", "thread": True, "inline": False,
                                   "no-fsync": True, "no-write": True}


def _median_ms(values) -> float:
    return 1000 * statistics.median(values) if values else float("nan")


def _process_cpu(pid: int) -> tuple[float, float]:
    """User and system CPU seconds process ``pid`` has used (Linux ``/proc``)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def run_once(checkpoint: bool, epochs: int, skip: int, background: bool | str = True,
             spare: int | None = None, knockout: str | None = None,
             late: int | None = None) -> dict:
    import jaxfit.checkpoint._writer as writer_module
    from benchmarks.jaxfit_contender import everyday_callbacks
    from benchmarks.workloads import WORKLOADS
    from jaxfit import Callback, Trainer

    w = WORKLOADS["W1"]
    cpu: list[tuple[float, float]] = []
    real_run = writer_module.RunWriter._run

    def timed_run(self, *args):  # on the writer thread
        before = resource.getrusage(resource.RUSAGE_THREAD)
        try:
            return real_run(self, *args)
        finally:
            after = resource.getrusage(resource.RUSAGE_THREAD)
            cpu.append((after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime))

    class Marks(Callback):
        order = 10_000

        def __init__(self) -> None:
            self.ends: list[float] = []
            self.epochs: list[list[float]] = []
            self.current: list[float] = []
            self.child_cpu: list[tuple[float, float]] = []

        def on_train_batch_end(self, trainer, logs) -> None:
            self.current.append(time.perf_counter())

        def on_epoch_end(self, trainer, logs) -> None:
            self.ends.append(time.perf_counter())
            self.epochs.append(self.current)
            self.current = []
            if trainer.epoch in (skip, epochs):  # the writer process's CPU, if there is one
                saver = next((c for c in callbacks if type(c).__name__ == "ModelCheckpoint"),
                             None)
                child = getattr(getattr(saver, "_writer", None), "_child", None)
                if child is not None:
                    self.child_cpu.append(_process_cpu(child._proc.pid))
                    if spare is not None and trainer.epoch == skip:
                        os.sched_setaffinity(child._proc.pid, {spare})

    marks = Marks()
    with tempfile.TemporaryDirectory() as workdir:
        callbacks, _ = everyday_callbacks(w, epochs, workdir, checkpoint=checkpoint,
                                          background=background)
        trainer = Trainer(optimizer=w.make_optimizer(inject=True, constant=True),
                          loss="softmax_cross_entropy", seed=0)
        writer_module.RunWriter._run = timed_run
        real_fsync, real_perform = os.fsync, writer_module.perform
        if knockout == "no-fsync":
            os.fsync = lambda fd: None
        elif knockout == "no-write":
            writer_module.perform = lambda known, job: 0
        try:
            with redirect_stdout(io.StringIO()):  # RichProgress's lines
                trainer.fit(w.make_model(), w.data(), epochs=epochs, batch_size=w.batch_size,
                            callbacks=[*callbacks, marks], verbose=0)
        finally:
            writer_module.RunWriter._run = real_run
            os.fsync, writer_module.perform = real_fsync, real_perform
    ends, per = marks.ends[skip:], marks.epochs[skip:]
    out = {
        "epoch ms": _median_ms([b - a for a, b in zip(ends, ends[1:])]),
        "steps ms": _median_ms([e[-1] - e[0] for e in per[1:]]),
        "boundary ms": _median_ms([b[0] - a[-1] for a, b in zip(per, per[1:])]),
    }
    if late:  # the same over the fit's last epochs: does the boundary grow as the run does?
        tail = marks.epochs[-late:]
        out[f"boundary ms, last {late}"] = _median_ms([b[0] - a[-1]
                                                       for a, b in zip(tail, tail[1:])])
    saver = next((c for c in callbacks if type(c).__name__ == "ModelCheckpoint"), None)
    if saver is not None:
        out["blocking ms"] = _median_ms(saver.stats.blocking[skip:])
        out["write ms"] = _median_ms(saver.stats.write[skip:])
        # Means: the kernel counts a thread's CPU time in clock ticks, so single saves read
        # 0 or a whole tick; the mean over many saves is the cost per save.
        out["writer user ms"] = 1000 * statistics.fmean([u for u, _ in cpu[skip:]])
        out["writer sys ms"] = 1000 * statistics.fmean([s for _, s in cpu[skip:]])
        if len(marks.child_cpu) == 2:  # the writer process, per save (one an epoch)
            (u0, s0), (u1, s1) = marks.child_cpu
            out["process user ms"] = 1000 * (u1 - u0) / (epochs - skip)
            out["process sys ms"] = 1000 * (s1 - s0) / (epochs - skip)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3, help="pairs of runs (without, with)")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--skip", type=int, default=5, help="first epochs left out")
    p.add_argument("--writers", default="process,thread",
                   help="ModelCheckpoint's writers to compare: process "
                        "(background='process'), thread (the default background=True), "
                        "inline (background=False); "
                        "no-fsync and no-write: the thread with a part of the save left out")
    p.add_argument("--late", type=int, default=None,
                   help="also the boundary's median over the last LATE epochs (with a long "
                        "--epochs: whether a save costs more as the run's history grows)")
    p.add_argument("--spare-core", action="store_true",
                   help="train on one CPU and give the writer process another (Linux): what "
                        "the writer costs where training leaves a core free")
    args = p.parse_args(argv)
    spare = None
    if args.spare_core:  # training on the first CPU, the writer process alone on the last
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[0]})
        spare = cpus[-1]
    variants = {"without ModelCheckpoint": (False, True, None)}
    for writer in args.writers.split(","):
        if writer not in _WRITERS:
            p.error(f"--writers: {writer!r} is not one of {', '.join(_WRITERS)}")
        variants[f"with ModelCheckpoint ({writer})"] = (
            True, _WRITERS[writer], writer if writer.startswith("no-") else None)
    rows: dict[str, list[dict]] = {label: [] for label in variants}
    for rep in range(args.reps):
        for label, (checkpoint, background, knockout) in variants.items():
            got = run_once(checkpoint, args.epochs, args.skip, background, spare, knockout,
                           args.late)
            rows[label].append(got)
            print(f"rep {rep + 1} {label}: " + ", ".join(f"{k} {v:.2f}" for k, v in got.items()),
                  file=sys.stderr, flush=True)
    print(f"\n`python -m benchmarks.checkpoint_epoch --reps {args.reps} --epochs {args.epochs} "
          f"--writers {args.writers}{f' --late {args.late}' if args.late else ''}"
          f"{' --spare-core' if args.spare_core else ''}`: "
          "W1 with the everyday callbacks, medians over epochs, then over repetitions "
          "(min-max)\n")
    keys = list(dict.fromkeys(k for runs in rows.values() for k in runs[0]))
    print("| run | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for label, runs in rows.items():
        cells = []
        for k in keys:
            vals = [r[k] for r in runs if k in r]
            cells.append(f"{statistics.median(vals):.2f} ({min(vals):.2f}-{max(vals):.2f})"
                         if vals else "")
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
