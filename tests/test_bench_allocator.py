"""jaxfit's opt-in glibc malloc tuning: when it applies, and its effect on page faults."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import jaxfit._allocator as alloc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tuning")


def _python(code: str, **env: str) -> dict:
    full = {k: v for k, v in os.environ.items() if k not in ("JAXFIT_MALLOC_TUNING", "LD_PRELOAD")}
    full.update(env, PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, "-c", code], env=full, cwd=REPO, capture_output=True,
                         text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


_STATUS = (
    "import json, jaxfit._allocator as a; s = a.allocator_status();"
    "print(json.dumps({'applied': s.applied, 'reason': s.reason}))"
)


@pytest.mark.parametrize("value", ["", "0", "false", "OFF", "no", "maybe"])
def test_tuning_is_off_unless_opted_in(value):
    reason = alloc._why_not({"JAXFIT_MALLOC_TUNING": value})
    assert reason == "off (opt in with JAXFIT_MALLOC_TUNING=1)"


@pytest.mark.parametrize("value", ["1", "true", "ON", "yes"])
def test_opt_in_values_enable_the_tuning(value):
    reason = alloc._why_not({"JAXFIT_MALLOC_TUNING": value})
    assert reason is None or "backend had already started" in reason


def test_other_preloaded_malloc_is_left_alone():
    reason = alloc._why_not({"JAXFIT_MALLOC_TUNING": "1",
                             "LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"})
    assert reason is not None and "jemalloc is preloaded" in reason


def test_non_cpu_platform_is_left_alone():
    reason = alloc._why_not({"JAXFIT_MALLOC_TUNING": "1", "JAX_PLATFORMS": "cuda,cpu"})
    assert reason is not None and "targets the CPU backend" in reason


@pytest.mark.multiprocess
@linux_only
def test_import_applies_the_tuning_only_when_opted_in():
    assert _python(_STATUS) == {"applied": False,
                                "reason": "off (opt in with JAXFIT_MALLOC_TUNING=1)"}
    assert _python(_STATUS, JAXFIT_MALLOC_TUNING="1")["applied"] is True


@pytest.mark.multiprocess
@linux_only
def test_tuning_is_skipped_once_the_backend_has_started():
    late = _python("import jax.numpy as jnp; jnp.ones(2).block_until_ready();" + _STATUS,
                   JAXFIT_MALLOC_TUNING="1")
    assert late["applied"] is False
    assert "backend had already started" in late["reason"]


# 100 MB malloc'd, touched and freed by one thread, as XLA:CPU does with its scratch
# buffers each step; prints the minor page faults of the repeats after the first.
_FAULTS = """
import ctypes, json, os, resource, threading
if os.environ.get("TUNE") == "1":
    import jaxfit
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
faults = []
def work():
    for i in range(5):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        p = libc.malloc(100 << 20)
        ctypes.memset(p, 1, 100 << 20)
        libc.free(p)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
t = threading.Thread(target=work); t.start(); t.join()
print(json.dumps({"faults": sum(faults[1:])}))
"""


@pytest.mark.multiprocess
@linux_only
def test_tuned_allocator_reuses_freed_scratch_pages():
    untuned = _python(_FAULTS, TUNE="1", JAXFIT_MALLOC_TUNING="0")["faults"]
    tuned = _python(_FAULTS, TUNE="1", JAXFIT_MALLOC_TUNING="1")["faults"]
    # glibc's default maps and unmaps each 100 MB block (~25,000 faults per repeat);
    # tuned, the freed block stays in the heap and the repeats touch mapped pages.
    assert untuned > 4 * 20_000
    assert tuned < untuned / 10
