"""Sharded checkpoints (each process writes its own slices; any mesh loads them): the
8-device cases of ckpt_sharded_cases.py, in a subprocess with 8 fake CPU devices."""

from __future__ import annotations

import pytest
from ckpt_helpers import run_cases_on_8_devices


@pytest.mark.multiprocess
@pytest.mark.slow
def test_sharded_checkpoint_cases_on_8_cpu_devices():
    run_cases_on_8_devices("ckpt_sharded_cases.py")
