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
