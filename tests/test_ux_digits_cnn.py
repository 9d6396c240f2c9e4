"""examples/digits_cnn.py runs again and again (a new version_N each time), refuses a run
directory that holds a run before any work, and ``--resume --epochs N`` trains a finished
run further: patience starts over and the learning rate decays from where it was to 0."""

from __future__ import annotations

import math
import re
import subprocess
import sys

import pytest
from ex_support import REPO, run_example

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def lrs(out: str) -> dict[int, float]:
    """Epoch -> the learning rate of its plain progress line."""
    found = re.findall(r"^Epoch (\d+)/\d+ .* learning_rate (\S+)$", out, re.M)
    return {int(e): float(v) for e, v in found}


def test_runs_again_and_again_then_trains_the_newest_further(tmp_path):
    first = run_example("digits_cnn.py", "--smoke", cwd=tmp_path)
    second = run_example("digits_cnn.py", "--smoke", cwd=tmp_path)
    runs = tmp_path / "runs" / "digits_cnn"
    assert sorted(p.name for p in runs.iterdir()) == ["version_0", "version_1"]
    hint = ("checkpoints in runs/digits_cnn/version_0; train further with: python "
            "examples/digits_cnn.py --resume --run-dir runs/digits_cnn/version_0 --epochs 30")
    assert hint in first
    assert "--resume --run-dir runs/digits_cnn/version_1 --epochs 30" in second
    # The smoke schedule is sized for 2 epochs (8 steps): from step 8 on it gives 0, so
    # without a new schedule epochs 3 and 4 would not train at all.
    before = lrs(second)
    assert set(before) == {1, 2}

    out = run_example("digits_cnn.py", "--resume", "--epochs", "4", cwd=tmp_path)
    resumed = "resuming runs/digits_cnn/version_1 at epoch 2, step 8 (finished: all epochs done)"
    assert resumed in out
    assert "training further to epoch 4: EarlyStopping's patience starts over" in out
    after = lrs(out)
    assert set(after) == {3, 4}
    # The new cosine starts at the rate the last step used and decays towards 0 at epoch 4.
    assert 0 < after[4] < after[3] <= before[2] * (1 + 1e-3)
    assert sorted(p.name for p in runs.iterdir()) == ["version_0", "version_1"]  # no new run


def test_a_run_dir_that_holds_a_run_is_refused_before_any_work(tmp_path):
    run_example("digits_cnn.py", "--smoke", "--run-dir", "mine", cwd=tmp_path)
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "digits_cnn.py"), "--smoke", "--run-dir", "mine"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert proc.returncode == 1
    err = proc.stderr.strip()
    assert err.startswith("error: mine already holds a run. Continue it with "
                          "`python examples/digits_cnn.py --resume --run-dir mine`"), err
    assert "`--run-dir NEW`" in err and "Trainer.load('mine').fit()" in err
    assert "Epoch" not in proc.stdout  # nothing trained


def test_resume_with_nothing_to_resume_says_how_to_start(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "digits_cnn.py"), "--resume"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert proc.returncode == 1
    assert "error: --resume: no run under runs/digits_cnn yet. Train one first" in proc.stderr


@pytest.fixture
def example(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "examples"))
    import digits_cnn

    return digits_cnn


def test_train_further_resets_patience_keeps_the_best_and_extends_the_schedule(example, data):
    import optax
    from conftest import MLP, make_trainer

    from jaxfit.callbacks import EarlyStopping, LRScheduler

    # mode="max" on the falling loss: epoch 1 stays the best, patience 2 stops at epoch 3.
    stop = EarlyStopping(monitor="loss", mode="max", patience=2)
    sched = LRScheduler(optax.linear_schedule(0.1, 0.0, 100))
    trainer = make_trainer()
    trainer.fit(MLP(), data, epochs=20, batch_size=16, callbacks=[sched, stop])
    assert trainer.stop_reason == "early_stopping" and trainer.epoch == 3
    best, lr_now, step = stop.best, trainer.hyperparams["learning_rate"], trainer.step
    assert lr_now == pytest.approx(0.1 * (1 - 14 / 100))  # the 15th step's rate

    example.train_further(trainer, 8)
    assert (stop.wait, stop.stopped_epoch, stop.best) == (0, 0, best)
    # 70 examples, batch 16: 5 steps an epoch; 5 epochs to go.
    assert math.isclose(float(sched.schedule(step)), lr_now, rel_tol=1e-5)
    assert float(sched.schedule(step + 25)) == pytest.approx(0.0, abs=1e-9)
    trainer.fit(epochs=8)
    # Patience counts anew: two more epochs without beating epoch 1, then a stop at 5.
    assert trainer.stop_reason == "early_stopping" and trainer.epoch == 5
