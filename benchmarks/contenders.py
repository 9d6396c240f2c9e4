"""The contenders the harness knows: how each one is run and in what environment."""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

from benchmarks.measure import Clock
from benchmarks.workloads import Workload

JEMALLOC_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/libjemalloc.so.2",
    "/usr/local/lib/libjemalloc.so.2",
)
# Never hand freed pages back to the OS: XLA:CPU's per-call scratch buffers are reused.
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1,retain:true"


def find_jemalloc() -> str | None:
    """Path of the system's libjemalloc.so.2, or None."""
    return next((p for p in JEMALLOC_PATHS if os.path.exists(p)), None)


@dataclasses.dataclass(frozen=True)
class Contender:
    """One way of training a workload.

    Attributes:
        name: short id used on the command line and in the table.
        label: what the table calls it.
        run: `(workload, epochs, clock, workdir) -> extra figures`.
        env: extra environment variables of its worker process.
        skip: workloads it does not run by default, with the reason.
        prepare: called in the worker before anything starts JAX's backend.
        needs: modules it imports (a contender whose module is missing is left out).
        default: part of a run that does not name its contenders.
    """

    name: str
    label: str
    run: Callable[[Workload, int, Clock, str], dict]
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    skip: dict[str, str] = dataclasses.field(default_factory=dict)
    prepare: Callable[[], None] = lambda: None
    needs: tuple[str, ...] = ()
    default: bool = True


def _hand(k: int = 1, unroll: bool = False, save: str | None = None):
    def run(w, epochs, clock, workdir):
        from benchmarks.hand import run_hand

        return run_hand(w, epochs, clock, k=k, unroll=unroll, save=save, workdir=workdir)

    return run


def _keras(**kwargs):
    def run(w, epochs, clock, workdir):
        from benchmarks.keras_contender import run_keras

        return run_keras(w, epochs, clock, workdir, **kwargs)

    return run


def _jaxfit(**kwargs):
    def run(w, epochs, clock, workdir):
        from benchmarks.jaxfit_contender import run_jaxfit

        return run_jaxfit(w, epochs, clock, workdir, **kwargs)

    return run


def _import_jaxfit() -> None:
    import jaxfit  # noqa: F401  (tunes the allocator before JAX's backend starts)


def _mallopt() -> None:
    # `import jaxfit` tunes glibc's allocator before the backend starts (the worker's
    # environment opts in); the hand loop itself does not use jaxfit.
    import jaxfit._allocator as alloc

    status = alloc.tune_allocator()
    if not status.applied:
        raise RuntimeError(f"allocator tuning not applied: {status.reason}")


_JEMALLOC = find_jemalloc()
_KERAS_ENV = {"KERAS_BACKEND": "jax"}
_NO_JEMALLOC = "libjemalloc.so.2 not found (apt-get install libjemalloc2)"
_W2_ONLY = "the allocator effect is W2's (--include-slow runs it here too)"
_ROLLED_W2 = "a rolled scan over convolutions runs ~0.02-0.04x of A on XLA:CPU (jax#12868)"
_LM_FULL_FORM = "W4's jaxfit contenders all train with a full-form loss (lm1b's)"

CONTENDERS: dict[str, Contender] = {
    c.name: c
    for c in [
        Contender("A", "A hand loop", _hand()),
        Contender("A-mallopt", "A + glibc mallopt (jaxfit's, opt-in)", _hand(),
                  env={"JAXFIT_MALLOC_TUNING": "1"}, prepare=_mallopt),
        Contender(
            "A-jemalloc", "A + jemalloc preload", _hand(),
            env={"LD_PRELOAD": _JEMALLOC or "", "MALLOC_CONF": JEMALLOC_CONF},
            skip={w: _NO_JEMALLOC if not _JEMALLOC else _W2_ONLY for w in ("W1", "W3", "W4")}
            | ({"W2": _NO_JEMALLOC} if not _JEMALLOC else {}),
        ),
        Contender("A-ckpt", "A + a hand-written checkpoint each epoch", _hand(save="hand"),
                  default=False),
        Contender("A-orbax", "A + Orbax CheckpointManager each epoch (async)",
                  _hand(save="orbax"), needs=("orbax.checkpoint",), default=False),
        Contender("B-rolled", "B hand scan K=16, rolled", _hand(16), skip={"W2": _ROLLED_W2}),
        Contender("B-unrolled", "B hand scan K=16, unrolled", _hand(16, unroll=True)),
        Contender("C", "C Keras fit", _keras(), env=_KERAS_ENV, needs=("keras",)),
        Contender(
            "C-callbacks", "C Keras fit + 3 callbacks", _keras(callbacks=True),
            env=_KERAS_ENV, needs=("keras",),
        ),
        Contender(
            "C-spe16", "C Keras steps_per_execution=16", _keras(steps_per_execution=16),
            env=_KERAS_ENV, needs=("keras",), default=False,
        ),
        Contender(
            "jaxfit-plain", "jaxfit fit, no callbacks", _jaxfit(), prepare=_import_jaxfit,
        ),
        Contender(
            "jaxfit-callbacks", "jaxfit fit + everyday callbacks", _jaxfit(callbacks=True),
            prepare=_import_jaxfit,
        ),
        Contender(
            "jaxfit-fullform", "jaxfit fit + everyday callbacks, full-form loss",
            _jaxfit(callbacks=True, full_form=True), skip={"W4": _LM_FULL_FORM},
            prepare=_import_jaxfit,
        ),
        Contender(
            "jaxfit-mallopt", "jaxfit fit + everyday callbacks, JAXFIT_MALLOC_TUNING=1",
            _jaxfit(callbacks=True), env={"JAXFIT_MALLOC_TUNING": "1"}, prepare=_import_jaxfit,
        ),
        Contender(
            "jaxfit-no-ckpt", "jaxfit fit + everyday callbacks but ModelCheckpoint",
            _jaxfit(callbacks=True, checkpoint=False), prepare=_import_jaxfit,
        ),
        Contender(
            "jaxfit-inline", "jaxfit fit + everyday callbacks, ModelCheckpoint(background=False)",
            _jaxfit(callbacks=True, background=False), prepare=_import_jaxfit, default=False,
        ),
        Contender(
            "jaxfit-process",
            "jaxfit fit + everyday callbacks, ModelCheckpoint(background=\"process\")",
            _jaxfit(callbacks=True, background="process"), prepare=_import_jaxfit, default=False,
        ),
        Contender(
            "jaxfit-spe", "jaxfit steps_per_execution=16", _jaxfit(steps_per_execution=16),
            prepare=_import_jaxfit,
        ),
        Contender(
            "jaxfit-spe-rolled", "jaxfit steps_per_execution=16, scan_unroll=1",
            _jaxfit(steps_per_execution=16, scan_unroll=1), skip={"W2": _ROLLED_W2},
            prepare=_import_jaxfit,
        ),
    ]
}
