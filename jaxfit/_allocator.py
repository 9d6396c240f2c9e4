"""Opt-in glibc malloc settings that make convolution-heavy XLA:CPU training faster.

Why: on every call XLA:CPU allocates its scratch buffers (about 100 MB per step for a small
CNN at batch 256) with ``malloc`` from one of its threads. glibc serves a request that size
from a fresh ``mmap`` (thread arenas cannot grow past 64 MB) and unmaps it on ``free``, so
every step touches brand-new pages: ~25,000 minor page faults per step. With one arena (the
main heap grows with ``brk``), an mmap threshold and a trim threshold of 1 GiB, the freed
scratch stays in the heap and the next step reuses pages that are already mapped: the
benchmark's CNN (W2) trains ~1.2x faster.

Why it is off by default: the single arena is shared by every thread, and on a small,
dispatch-bound model (W1, ~0.15 ms per step) the dispatching thread and XLA's threads then
contend for its lock: the same hand-written loop ran ~0.67x as fast. Memory freed below
1 GiB also stays in the process instead of going back to the OS (peak RSS on W2: 1.05-1.2x).
So the setting is for large-activation CPU training (convolutions, big batches); measure it
on yours with ``python -m benchmarks.run``.

Turn it on with ``JAXFIT_MALLOC_TUNING=1`` in the environment before ``import jaxfit``:
the settings only help when made before JAX's CPU backend starts (arenas that XLA's threads
already hold stay in use), so jaxfit applies them from its import, and only when all of
these hold:

- the process runs on Linux with glibc, and no other malloc (jemalloc, tcmalloc, mimalloc)
  is preloaded (jemalloc preloaded with
  ``MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1,retain:true`` removes the faults too,
  without the shared arena);
- JAX's backend has not started yet;
- the process trains on the CPU: ``JAX_PLATFORMS`` is unset or starts with ``cpu``, and no
  GPU/TPU plugin is installed.

``allocator_status()`` says whether the settings were applied, and why not.

Example:
    >>> import jaxfit._allocator as alloc
    >>> status = alloc.allocator_status()
    >>> isinstance(status.applied, bool) and isinstance(status.reason, str)
    True
"""

from __future__ import annotations

import ctypes
import dataclasses
import importlib.util
import os
import sys

ENV_VAR = "JAXFIT_MALLOC_TUNING"
# glibc's mallopt parameter numbers (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
THRESHOLD_BYTES = 1 << 30
_ON = ("1", "true", "yes", "on")
_OTHER_MALLOCS = ("jemalloc", "tcmalloc", "mimalloc")
_ACCELERATOR_PLUGINS = (
    "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin", "libtpu",
)


@dataclasses.dataclass(frozen=True)
class AllocatorStatus:
    """Whether jaxfit's malloc settings are in force in this process.

    Attributes:
        applied: True when ``mallopt`` accepted all three settings.
        reason: what was done, or why nothing was.
    """

    applied: bool
    reason: str


_status: AllocatorStatus | None = None


def allocator_status() -> AllocatorStatus:
    """The outcome of the tuning done at import (or ``not attempted`` before it ran)."""
    return _status or AllocatorStatus(False, "not attempted")


def _backend_started() -> bool:
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge
    except ImportError:  # a JAX without that module: cannot tell, so assume the worst
        return True
    return bool(getattr(xla_bridge, "_backends", {1: None}))


def _why_not(environ: dict[str, str]) -> str | None:
    if environ.get(ENV_VAR, "").strip().lower() not in _ON:
        return f"off (opt in with {ENV_VAR}=1)"
    if not sys.platform.startswith("linux"):
        return f"glibc malloc tuning applies to Linux only (platform {sys.platform})"
    preload = environ.get("LD_PRELOAD", "")
    other = next((m for m in _OTHER_MALLOCS if m in preload), None)
    if other:
        return f"{other} is preloaded (LD_PRELOAD), glibc malloc is not in use"
    platforms = environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms and not platforms.startswith("cpu"):
        return f"JAX_PLATFORMS={platforms}: the tuning targets the CPU backend"
    if not platforms:
        plugin = next((p for p in _ACCELERATOR_PLUGINS if importlib.util.find_spec(p)), None)
        if plugin:
            return f"{plugin} is installed, so JAX may not train on the CPU"
    if _backend_started():
        return (
            "JAX's backend had already started (import jaxfit before the first JAX "
            "computation for the tuning to take effect)"
        )
    return None


def tune_allocator(environ: dict[str, str] | None = None) -> AllocatorStatus:
    """Applies the malloc settings once per process if it is safe and useful to do so.

    Args:
        environ: the environment to read the opt-out and platform from (default
            ``os.environ``).

    Returns:
        The new status, also kept for ``allocator_status()``. A second call after a
        successful one does nothing and returns the same status.
    """
    global _status
    if _status is not None and _status.applied:
        return _status
    reason = _why_not(dict(os.environ if environ is None else environ))
    if reason is None:
        try:
            libc = ctypes.CDLL("libc.so.6")
            ok = hasattr(libc, "gnu_get_libc_version") and all(
                libc.mallopt(param, value) == 1
                for param, value in (
                    (M_ARENA_MAX, 1),
                    (M_MMAP_THRESHOLD, THRESHOLD_BYTES),
                    (M_TRIM_THRESHOLD, THRESHOLD_BYTES),
                )
            )
        except OSError:
            ok = False
        reason = (
            "mallopt: one arena, mmap and trim thresholds of 1 GiB"
            if ok else "glibc's mallopt is not available or refused the settings"
        )
        _status = AllocatorStatus(ok, reason)
    else:
        _status = AllocatorStatus(False, reason)
    return _status
