"""Helpers of the checkpoint tests: one small written run, shared by a module's tests."""

import shutil

import numpy as np
import pytest
from conftest import MLP, make_trainer

from jaxfit.callbacks import ModelCheckpoint


def tiny_data():
    """The suite's 70 x 4 classification data (as the ``data`` fixture of conftest)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(70, 4)).astype(np.float32)
    return x, (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0).astype(np.int32)


def written_run(parent, epochs):
    """A run of ``epochs`` epochs (5 steps each) in ``parent / "run"``, one checkpoint per
    epoch; returns the run directory and its data."""
    data = tiny_data()
    run = parent / "run"
    make_trainer().fit(MLP(), data, epochs=epochs, batch_size=16,
                       callbacks=[ModelCheckpoint(run, background=False)])
    return run, data


def copy_run(run, parent):
    """A copy of ``run`` to damage (links copied as links)."""
    copy = parent / "run"
    shutil.copytree(run, copy, symlinks=True)
    return copy


def run_fixtures(epochs):
    """The fixtures ``base_run`` (a run written once per module: directory and data) and
    ``run`` (a fresh copy of it per test). Use: ``base_run, run = run_fixtures(epochs=2)``."""
    @pytest.fixture(scope="module")
    def base_run(tmp_path_factory):
        return written_run(tmp_path_factory.mktemp("base"), epochs=epochs)

    @pytest.fixture
    def run(base_run, tmp_path):
        return copy_run(base_run[0], tmp_path)

    return base_run, run


def run_cases_on_8_devices(cases: str, timeout: int = 1500) -> None:
    """Runs the pytest file ``tests/<cases>`` in its own interpreter with 8 fake CPU devices
    (the device count is fixed when jax starts its backend) and asserts it passed."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           os.path.join("tests", cases)],
                          check=False, capture_output=True, text=True, cwd=root, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout
