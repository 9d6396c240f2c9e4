"""The system calls of one W1 checkpoint save, counted with ``strace -f`` (Linux).

Each system call of a background writer is a point where the training thread may have to
wait for the interpreter lock, so the count is a measure of what a save costs W1. This
trains W1 for an epoch with ``ModelCheckpoint(background=False)``, saves three more times
(warm-up), then once between two marks written to stderr; the parent runs it under
``strace -f`` and counts the calls between the marks by name. Lock hand-offs and memory
management (futex, sched_yield, madvise, mprotect, mmap, munmap, clock_gettime) are counted
apart: they depend on the threads' timing, not on the save.

    python -m benchmarks.save_syscalls
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_APART = frozenset(["futex", "sched_yield", "madvise", "mprotect", "mmap", "munmap",
                    "clock_gettime"])
_CALL = re.compile(r"^\d+\s+(?:<\.\.\. )?([a-z_0-9]+)[( ]")


def child() -> None:
    """The traced process: one epoch of W1, warm-up saves, then the save counted."""
    sys.path.insert(0, REPO)
    from benchmarks.workloads import WORKLOADS
    from jaxfit import Trainer
    from jaxfit.callbacks import ModelCheckpoint

    w = WORKLOADS["W1"]
    with tempfile.TemporaryDirectory() as workdir:
        saver = ModelCheckpoint(os.path.join(workdir, "run"), background=False)
        trainer = Trainer(optimizer=w.make_optimizer(inject=True),
                          loss="softmax_cross_entropy", seed=0)
        trainer.fit(w.make_model(), w.data(), epochs=1, batch_size=w.batch_size,
                    callbacks=[saver], verbose=0)
        saver.setup(trainer)  # a fit of its own, driven by hand: the saves below
        saver.on_fit_start(trainer)
        for _ in range(4):
            trainer._step += 1  # each save a new step (a checkpoint name of its own)
            if _ == 3:
                os.write(2, b"=====MARK=====\n")
            saver._save(trainer, "epoch")
        os.write(2, b"=====END=====\n")
        saver.on_fit_end(trainer, {})


def count(lines) -> tuple[collections.Counter[str], collections.Counter[str]]:
    """The system calls between the marks of an ``strace -f`` log, by name: those counted,
    and the lock hand-offs and memory mappings counted apart."""
    counted: collections.Counter[str] = collections.Counter()
    apart: collections.Counter[str] = collections.Counter()
    inside = False
    for line in lines:
        if "=====MARK=====" in line:
            inside = True
            continue
        if "=====END=====" in line:
            break
        match = _CALL.match(line)
        if not inside or match is None or "resumed>" in line:
            continue  # a call interrupted by another thread's is counted once
        (apart if match.group(1) in _APART else counted)[match.group(1)] += 1
    return counted, apart


def main() -> None:
    if shutil.which("strace") is None:
        sys.exit("save_syscalls needs strace (Linux): apt-get install strace")
    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "strace.log")
        subprocess.run(["strace", "-f", "-o", log, sys.executable, "-m",
                        "benchmarks.save_syscalls", "--child"], cwd=REPO, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with open(log) as f:
            counted, apart = count(f)
    print(f"one W1 save: {sum(counted.values())} system calls "
          f"(and {sum(apart.values())} lock hand-offs and memory mappings)")
    for name, n in counted.most_common():
        print(f"  {name:12s} {n}")


if __name__ == "__main__":
    child() if "--child" in sys.argv else main()
