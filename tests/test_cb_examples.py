"""The callback examples run end to end (their --smoke size)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, str(ROOT / "examples" / name), "--smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.slow
@pytest.mark.multiprocess
def test_custom_callback_example():
    out = run_example("custom_callback.py")
    assert "weight norm per epoch: [" in out and "stopped after epoch 2" in out


@pytest.mark.slow
@pytest.mark.multiprocess
def test_lr_plateau_example_shows_schedule_times_plateau_factor():
    out = run_example("lr_plateau.py")
    assert "2 plateau reduction(s); total factor 0.25" in out
    assert out.splitlines()[-2].split()[-1] == "0.5"  # epoch 6 used half the schedule
