"""The overheads the speed issue names, measured on the benchmark workloads.

- **checkpoint**: how long a ModelCheckpoint save blocks training with its background writer,
  against writing the same state inline (``background=False``). The steps still under way are
  waited for first by a probe running just before the checkpoint, so neither figure counts
  training work.
- **epoch gap**: the time from the end of an epoch's last step to the dispatch of the next
  epoch's first step, with every built-in callback on, against History alone (validation
  left out: there is no validation data).
- **resume**: from ``Trainer.load(run)`` to the end of the first resumed step, against a fresh
  start's time from ``Trainer(...)`` to the end of its first step; each in a new process.
- **fit again**: from a second ``fit`` call of a trained run (``fit(epochs=2)`` in the process
  that trained the first epoch, with ModelCheckpoint) to the end of its first step: what a
  user who calls ``fit`` an epoch at a time pays per call.

    python -m benchmarks.overheads                 # W1-W3, 3 repetitions
    python -m benchmarks.overheads --workloads W1 --reps 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax

from jaxfit import Callback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T0 = [0.0]  # set by the measuring process before it builds or loads a trainer


class FirstStep(Callback):
    """Records when the first step of a fit (fresh or resumed) is done, relative to T0."""

    order = 10_000

    def __init__(self) -> None:
        self.seconds: float | None = None

    def on_fit_start(self, trainer) -> None:
        self.seconds = None

    def on_train_batch_end(self, trainer, logs) -> None:
        if self.seconds is None:
            jax.block_until_ready(logs["loss"])
            self.seconds = time.perf_counter() - T0[0]
            print(f"FIRST_STEP {self.seconds}", flush=True)

    def state_dict(self) -> dict:
        return {}


class EpochGap(Callback):
    """Host time from the end of an epoch's last step to the dispatch of the next epoch's first.

    The probe waits for the last step of each epoch (the device is idle from then on), then
    stamps the start of the next epoch's first step: everything the engine and the callbacks do
    at the boundary lies in between, training work does not. It runs last (order 10000), so
    the other callbacks' batch hooks fall inside the interval too.
    """

    order = 10_000

    def __init__(self, steps_per_epoch: int) -> None:
        self.n = steps_per_epoch
        self.last_done: float | None = None
        self.gaps: list[float] = []

    def on_train_batch_start(self, trainer) -> None:
        if trainer.batch_in_epoch == 0 and self.last_done is not None:
            self.gaps.append(time.perf_counter() - self.last_done)
            self.last_done = None

    def on_train_batch_end(self, trainer, logs) -> None:
        if trainer.batch_in_epoch == self.n:
            jax.block_until_ready(logs["loss"])
            self.last_done = time.perf_counter()


def _wait_first() -> type:
    class WaitForSteps(Callback):
        """Waits for the steps under way just before the checkpoint saves (order 99 < 100)."""

        order = 99

        def on_epoch_end(self, trainer, logs) -> None:
            jax.block_until_ready(trainer.engine_state)

    return WaitForSteps


def _timed_checkpoint(cls: type, blocked: list[float]) -> type:
    class TimedCheckpoint(cls):
        def on_epoch_end(self, trainer, logs) -> None:
            t = time.perf_counter()
            super().on_epoch_end(trainer, logs)
            blocked.append(time.perf_counter() - t)

        def on_epoch_start(self, trainer) -> None:
            # A background save taken at an epoch's end is handed to its writer here.
            t = time.perf_counter()
            super().on_epoch_start(trainer)
            if blocked:
                blocked[-1] += time.perf_counter() - t

    return TimedCheckpoint


def _trainer(w, **kwargs):
    from jaxfit import Trainer

    return Trainer(optimizer=w.make_optimizer(inject=True), loss="softmax_cross_entropy", seed=0,
                   **kwargs)


def all_builtin_callbacks(w, epochs: int, workdir: str) -> list:
    """One of each built-in callback this checkout has, configured for a run without validation."""
    import optax

    import jaxfit.callbacks as cbs

    made = []
    factories = {
        "LRScheduler": lambda c: c(
            optax.cosine_decay_schedule(w.learning_rate, epochs * w.batches)),
        "ReduceOnPlateau": lambda c: c(monitor="loss", patience=100),
        "EarlyStopping": lambda c: c(monitor="loss", patience=100),
        "ModelCheckpoint": lambda c: c(os.path.join(workdir, "run")),
        "RichProgress": lambda c: c(live=False),
        "CSVLogger": lambda c: c(os.path.join(workdir, "log.csv")),
        "TerminateOnNaN": lambda c: c(),
        "LearningRateMonitor": lambda c: c(),
        "Timer": lambda c: c(3600.0),
        "TensorBoard": lambda c: c(os.path.join(workdir, "tb")),
    }
    for name, make in factories.items():
        cls = getattr(cbs, name, None)
        if cls is not None:
            try:
                made.append(make(cls))
            except ImportError:  # TensorBoard without tensorboardX
                pass
    return made


def probe(kind: str, workload: str, workdir: str, epochs: int) -> dict:
    """Runs one measurement in this process; `kind` is checkpoint, gap, fresh or resume."""
    import jaxfit.callbacks as cbs
    from benchmarks.workloads import WORKLOADS
    from jaxfit import Trainer

    w = WORKLOADS[workload]
    x, y = w.data()
    if kind == "checkpoint":
        out = {}
        for background in (True, False):
            blocked: list[float] = []
            ckpt = _timed_checkpoint(cbs.ModelCheckpoint, blocked)(
                os.path.join(workdir, f"bg{background}"), background=background)
            _trainer(w).fit(w.make_model(), (x, y), epochs=epochs, batch_size=w.batch_size,
                            callbacks=[_wait_first()(), ckpt], verbose=0)
            out["background" if background else "inline"] = statistics.median(blocked[1:])
        return out
    if kind == "gap":
        out = {}
        for label, extra in (("history_only", []),
                             ("all_builtin", all_builtin_callbacks(w, epochs, workdir))):
            gap = EpochGap(w.batches)
            _trainer(w).fit(w.make_model(), (x, y), epochs=epochs, batch_size=w.batch_size,
                            callbacks=[*extra, gap], verbose=0)
            out[label] = statistics.median(gap.gaps[1:] or gap.gaps)
            out[f"{label}_callbacks"] = [type(c).__name__ for c in extra]
        return out
    run_dir = os.path.join(workdir, "run")
    first = FirstStep()
    if kind == "refit":
        trainer = _trainer(w)
        trainer.fit(w.make_model(), (x, y), epochs=epochs, batch_size=w.batch_size,
                    callbacks=[cbs.ModelCheckpoint(run_dir), first], verbose=0)
        T0[0] = time.perf_counter()
        trainer.fit(epochs=epochs + 1, verbose=0)
        return {"first_step_s": first.seconds}
    T0[0] = time.perf_counter()
    if kind == "fresh":
        _trainer(w).fit(w.make_model(), (x, y), epochs=epochs, batch_size=w.batch_size,
                        callbacks=[cbs.ModelCheckpoint(run_dir), first], verbose=0)
        return {"first_step_s": first.seconds}
    trainer = Trainer.load(run_dir)  # its callbacks, FirstStep included, come from the run
    trainer.fit(epochs=epochs + 1)
    stamps = [c for c in trainer.callbacks if isinstance(c, FirstStep)]
    return {"first_step_s": stamps[0].seconds if stamps else None}


def _run(kind: str, workload: str, epochs: int, workdir: str) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.overheads", "--probe", kind, "--workloads", workload,
           "--epochs", str(epochs), "--workdir", workdir]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"exit {proc.returncode}: {tail}"}


EPOCHS = {"W1": 12, "W2": 3, "W3": 6}


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", default="W1,W2,W3")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    p.add_argument("--probe", help=argparse.SUPPRESS)
    p.add_argument("--epochs", type=int, help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe:  # a child process: one measurement
        # Through the importable module, not __main__: the resumed run unpickles FirstStep
        # by reference and must see the same T0.
        from benchmarks import overheads

        res = overheads.probe(args.probe, args.workloads, args.workdir, args.epochs)
        print("RESULT " + json.dumps(res), flush=True)
        return ""
    rows = []
    for w in args.workloads.split(","):
        runs: dict[str, list] = {"checkpoint": [], "gap": [], "fresh": [], "resume": [],
                                 "refit": []}
        for _ in range(args.reps):
            for kind in ("checkpoint", "gap"):
                with tempfile.TemporaryDirectory(prefix="jaxfit-oh-") as d:
                    runs[kind].append(_run(kind, w, EPOCHS[w], d))
            with tempfile.TemporaryDirectory(prefix="jaxfit-oh-") as d:
                runs["fresh"].append(_run("fresh", w, 1, d))
                runs["resume"].append(_run("resume", w, 1, d))
            with tempfile.TemporaryDirectory(prefix="jaxfit-oh-") as d:
                runs["refit"].append(_run("refit", w, 1, d))
        rows.append((w, runs))
        print(f"{w}: {json.dumps(runs)}", file=sys.stderr, flush=True)
    text = _table(rows, args.reps)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "overheads.md"), "w") as f:
        f.write(text)
    return text


def _med(values: list) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "–"
    return f"{statistics.median(vals) * 1e3:.1f} ({min(vals) * 1e3:.1f}–{max(vals) * 1e3:.1f})"


def _table(rows, reps: int) -> str:
    lines = [
        f"### Overheads, milliseconds: median (min–max) over {reps} repetition(s)", "",
        "| workload | checkpoint blocks (background) | inline write | ratio | epoch gap, History "
        "only | epoch gap, all built-ins | fresh: first step | Trainer.load: first step "
        "| fit again: first step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    errors = []
    for w, runs in rows:
        for kind, rs in runs.items():
            errors += [f"{w} {kind}: {r['error']}" for r in rs if "error" in r]
        ok = {k: [r for r in rs if "error" not in r] for k, rs in runs.items()}
        ratios = [r["background"] / r["inline"] for r in ok["checkpoint"]]
        ratio = f"{statistics.median(ratios):.3f}" if ratios else "–"
        lines.append(
            f"| {w} | {_med([r['background'] for r in ok['checkpoint']])} "
            f"| {_med([r['inline'] for r in ok['checkpoint']])} | {ratio} "
            f"| {_med([r['history_only'] for r in ok['gap']])} "
            f"| {_med([r['all_builtin'] for r in ok['gap']])} "
            f"| {_med([r['first_step_s'] for r in ok['fresh']])} "
            f"| {_med([r['first_step_s'] for r in ok['resume']])} "
            f"| {_med([r['first_step_s'] for r in ok['refit']])} |"
        )
    for _, runs in rows[:1]:
        names = next((r.get("all_builtin_callbacks") for r in runs["gap"] if "error" not in r),
                     None)
        if names:
            lines += ["", "All built-ins: " + ", ".join(names) + " (and History)."]
    if errors:
        lines += ["", "Failed:"] + [f"- {e}" for e in errors]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
