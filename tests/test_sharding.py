"""jaxfit.sharding: the 8-device cases in a subprocess, the docstring examples in-process."""

from __future__ import annotations

import doctest
import os
import subprocess
import sys

import pytest

import jaxfit._shards
import jaxfit.sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("module", [jaxfit.sharding, jaxfit._shards], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.multiprocess
@pytest.mark.slow
def test_sharding_cases_on_8_cpu_devices():
    # The device count is fixed when jax starts its backend, which this process has (or will)
    # with one device: the cases run in their own interpreter with 8.
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           os.path.join("tests", "sharding_cases.py")],
                          check=False, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout
