"""The README's "A run, from start to resume" snippet, as written, trains well and resumes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

REPO = Path(__file__).resolve().parent.parent


def snippet() -> str:
    """The first python block of the README section "A run, from start to resume"."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## A run, from start to resume\n", 1)
    assert len(section) == 2, "README.md has no section '## A run, from start to resume'"
    block = re.search(r"```python\n(.*?)\n```", section[1], re.S)
    assert block, "the section has no ```python block"
    return block.group(1)


def test_the_snippet_is_the_whole_story():
    code = snippet()
    # The data loading is shown: nothing the reader has to guess.
    assert "load_digits_images(" in code and "x_train, y_train, x_val, y_val =" in code
    compile(code, "README.md", "exec")


def test_the_readme_snippet_trains_well_and_resumes(tmp_path):
    report = """
import json
print("REPORT" + json.dumps({
    "val_accuracy": history.history["val_accuracy"],  # the first fit's History
    "learning_rate": history.history["learning_rate"],
    "epoch": trainer.epoch,
    "evaluate": trainer.evaluate((x_val, y_val)),
}))
"""
    script = tmp_path / "snippet.py"
    script.write_text(snippet() + "\n" + report, encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    # cwd is the temp dir: the snippet's "runs/cnn" is written there.
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT"))
    got = json.loads(line[len("REPORT"):])
    # The first fit: 10 epochs, trained well (the old snippet reached 0.275).
    assert len(got["val_accuracy"]) == 10
    assert got["val_accuracy"][-1] >= 0.95, got["val_accuracy"]
    # The applied rate is in the History: warmed up by the end of epoch 1, then decaying
    # (a plateau reduction may take it below the schedule's floor), never 0.
    lr = got["learning_rate"]
    assert len(lr) == 10 and 0.04 < lr[0] <= 0.05 and 0 < lr[-1] < lr[0], lr
    # Loaded in a new trainer, trained further to 15 epochs in all, still good.
    assert got["epoch"] == 15
    assert got["evaluate"]["accuracy"] >= 0.95, got["evaluate"]
    assert (tmp_path / "runs" / "cnn" / "latest").exists()
