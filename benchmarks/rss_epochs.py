"""Resident memory at each epoch's end of one fit, with and without a checkpoint every epoch.

`benchmarks.scaling` reports how much a fit's RSS grows from its second epoch to its last;
this shows the course of it, and how much of the end's RSS is heap that glibc keeps after
it was freed (returned by ``malloc_trim(0)`` after the fit: not a leak).

    python -m benchmarks.rss_epochs                       # W3-p4, 20 epochs
    python -m benchmarks.rss_epochs --workload W3 --epochs 12
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import io
import os
import sys
import tempfile
from contextlib import redirect_stdout

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss_mib() -> float:
    """This process's resident set size in MiB (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run(name: str, epochs: int, checkpoint: bool) -> dict:
    """One fit with the everyday callbacks: RSS at each epoch's end, at the end, after
    ``malloc_trim(0)``."""
    sys.path.insert(0, REPO)
    from benchmarks.jaxfit_contender import everyday_callbacks
    from benchmarks.workloads import workload
    from jaxfit import Callback, Trainer

    w = workload(name)

    class Rss(Callback):
        order = 10_000

        def __init__(self) -> None:
            self.by_epoch: list[float] = []

        def on_epoch_end(self, trainer, logs) -> None:
            self.by_epoch.append(rss_mib())

    probe = Rss()
    with tempfile.TemporaryDirectory() as workdir:
        callbacks, _ = everyday_callbacks(w, epochs, workdir, checkpoint=checkpoint)
        trainer = Trainer(optimizer=w.make_optimizer(inject=True, constant=True),
                          loss="softmax_cross_entropy", seed=0)
        with redirect_stdout(io.StringIO()):  # RichProgress's lines
            trainer.fit(w.make_model(), w.data(), epochs=epochs, batch_size=w.batch_size,
                        callbacks=[*callbacks, probe], verbose=0)
    end = rss_mib()
    libc = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None
    if trim is not None:
        trim(0)
    return {"by_epoch": probe.by_epoch, "end": end,
            "trimmed": rss_mib() if trim is not None else None}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", default="W3-p4")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--child", choices=["with", "without"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:  # one fit in a fresh process: RSS is the process's
        got = run(args.workload, args.epochs, args.child == "with")
        print(" ".join(f"{v:.0f}" for v in got["by_epoch"]), f"{got['end']:.0f}",
              "-" if got["trimmed"] is None else f"{got['trimmed']:.0f}")
        return
    import subprocess

    print(f"`python -m benchmarks.rss_epochs --workload {args.workload} --epochs {args.epochs}`"
          ": RSS MiB at each epoch's end, at the fit's end, and after malloc_trim(0)\n")
    for kind in ("without", "with"):
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.rss_epochs", "--workload", args.workload,
             "--epochs", str(args.epochs), "--child", kind],
            cwd=REPO, check=True, capture_output=True, text=True).stdout.split()
        *epochs, end, trimmed = out
        print(f"- {kind} ModelCheckpoint: {', '.join(epochs)}; end {end}; "
              f"after malloc_trim {trimmed}")


if __name__ == "__main__":
    main()
