"""The README's main job, examples/digits_cnn.py, trains, checkpoints and resumes."""

import json
import re

import pytest
from ex_support import run_example

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def test_digits_cnn_smoke_trains_checkpoints_and_resumes(tmp_path):
    out = run_example("digits_cnn.py", "--smoke", "--run-dir", "run", cwd=tmp_path)
    assert re.search(r"Epoch 2/2 .* val_accuracy \d\.\d{4}", out), out
    acc = float(re.search(r"validation: loss \d+\.\d+, accuracy (\d\.\d+)", out).group(1))
    assert acc > 0.25  # 2 epochs on 240 images of 10 digits: well above chance (0.1)
    latest = (tmp_path / "run" / "latest").read_text().strip()
    manifest = json.loads((tmp_path / "run" / latest / "manifest.json").read_text())
    assert manifest["epoch"] == 2

    out = run_example("digits_cnn.py", "--resume", "--epochs", "3", "--run-dir", "run", cwd=tmp_path)
    assert "resuming run at epoch 2" in out
    assert re.search(r"Epoch 3/3 ", out), out
