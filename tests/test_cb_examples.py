"""The callback examples run end to end (their --smoke size)."""

from __future__ import annotations

import pytest
from ex_support import run_example

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def test_custom_callback_example(tmp_path):
    out = run_example("custom_callback.py", "--smoke", cwd=tmp_path)
    assert "weight norm per epoch: [" in out and "stopped after epoch 2" in out


def test_lr_plateau_example_shows_schedule_times_plateau_factor(tmp_path):
    out = run_example("lr_plateau.py", "--smoke", cwd=tmp_path)
    assert "2 plateau reduction(s); total factor 0.25" in out
    assert out.splitlines()[-2].split()[-1] == "0.5"  # epoch 6 used half the schedule
