"""What every contender reports, measured the same way in every subprocess.

A contender calls `Clock.start()` once its imports and data are ready, `Clock.first_step()`
once the result of its first training step (or first fused execution) is on the host, and
`Clock.epoch_end()` after each epoch's loss has been fetched. From those marks:

- steady steps/s: steps of epochs 2..E over the wall time from the end of epoch 1 to the end
  of epoch E, epoch boundaries included (compile and the first epoch are left out). A
  contender still warming up at an epoch's end (jaxfit's `steps_per_execution` timing its
  two ways, see `jaxfit/_fusion.py`) says so, and steady time starts after that epoch;
- time to first step: from `start()` to `first_step()` (model init, compile, one step);
- compile: the seconds JAX spent tracing, lowering and compiling during the run, summed from
  `jax.monitoring` duration events (so one-off compiles of init ops count too);
- peak RSS: the process's `ru_maxrss`, imports included;
- with `track_rss`, the resident set size at each epoch's end (`epoch_rss_mb`, from
  `/proc/self/statm`; Linux only), to show whether memory grows with steps and checkpoints.
"""

from __future__ import annotations

import os
import resource
import sys
import time

_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)


class Clock:
    """Timestamps of one contender's run, plus JAX compile time from monitoring events."""

    def __init__(self, track_rss: bool = False) -> None:
        self.track_rss = track_rss
        self.epoch_rss: list[float] = []
        self.t0: float | None = None
        self.t_first: float | None = None
        self.epoch_ends: list[float] = []
        self.steady_from = 0  # the epoch end steady time starts at
        self.compile_s = 0.0
        import jax.monitoring

        def on_duration(event: str, duration: float, **_: object) -> None:
            if event in _COMPILE_EVENTS:
                self.compile_s += duration

        jax.monitoring.register_event_duration_secs_listener(on_duration)

    def start(self) -> None:
        self.t0 = time.perf_counter()

    def first_step(self) -> None:
        if self.t_first is None:
            self.t_first = time.perf_counter()

    def epoch_end(self, warming_up: bool = False) -> None:
        """Marks an epoch's end; ``warming_up``: the epoch was not steady yet (steady time
        starts at this end)."""
        self.epoch_ends.append(time.perf_counter())
        if warming_up:
            self.steady_from = len(self.epoch_ends) - 1
        if self.track_rss:
            self.epoch_rss.append(current_rss_mb())

    def result(self, steps_per_epoch: int, batch_size: int, **extra: object) -> dict:
        """The JSON-able figures of this run; raises if the contender skipped a mark."""
        ends = self.epoch_ends[self.steady_from:]
        if self.t0 is None or self.t_first is None or len(ends) < 2:
            raise RuntimeError(
                f"incomplete timing: start={self.t0}, first_step={self.t_first}, "
                f"{len(self.epoch_ends)} epoch ends, {self.steady_from} of them warming up "
                "(need start, first step and >= 2 epoch ends from the first steady one on)"
            )
        measured_epochs = len(ends) - 1
        steady = ends[-1] - ends[0]
        steps = measured_epochs * steps_per_epoch
        epoch_s = [b - a for a, b in zip(ends, ends[1:])]
        return {
            "steps_per_s": steps / steady,
            "examples_per_s": steps * batch_size / steady,
            "steady_s": steady,
            "measured_steps": steps,
            "first_epoch_s": self.epoch_ends[0] - self.t0,
            "warmup_epochs": 1 + self.steady_from,
            "epoch_s": epoch_s,
            "ttfs_s": self.t_first - self.t0,
            "compile_s": self.compile_s,
            "peak_rss_mb": peak_rss_mb(),
            **({"epoch_rss_mb": self.epoch_rss} if self.track_rss else {}),
            **extra,
        }


def current_rss_mb() -> float:
    """Resident set size of this process now, in MiB (Linux: /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (ru_maxrss is KiB on Linux, B on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024
