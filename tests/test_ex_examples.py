"""Every example owned here runs in smoke mode and prints and writes what it promises."""

import re

import pytest
from ex_support import REPO, png_size, run_example

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

SCHEDULES = [
    "constant", "cosine_decay", "cosine_onecycle", "exponential_decay", "linear_onecycle",
    "linear", "piecewise_constant", "piecewise_interpolate_linear",
    "piecewise_interpolate_cosine", "polynomial", "warmup_cosine_decay",
    "warmup_exponential_decay", "join_schedules", "sgdr",
]  # fmt: skip


def test_schedules_smoke_prints_a_row_per_schedule_and_writes_the_figure(tmp_path):
    out = run_example("schedules.py", "--smoke", "--out", "study.png", cwd=tmp_path)
    # No Fashion-MNIST in the (empty) cache and no download in smoke mode: it says so.
    assert "using scikit-learn digits 8x8x1 instead" in out
    assert "smoke run: 4 of the 14 schedules" in out
    for name in ["constant", "cosine_onecycle", "join_schedules", "sgdr"]:
        row = re.search(rf"^[│|] {name}\s+[│|]\s+(\d\.\d{{4}})\s+[│|]", out, re.MULTILINE)
        assert row, f"no table row for {name}:\n{out}"
        assert 0.0 <= float(row.group(1)) <= 1.0
    assert "linear_onecycle" not in out
    # 4 learning-rate panels in a row, then the accuracy panel two rows tall: 4 x 3.0 by
    # 3 x 2.6 inches.
    assert png_size(tmp_path / "study.png") == (1200, 780)


@pytest.fixture
def schedules_module(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "examples"))
    import schedules

    return schedules


def test_the_study_has_the_fourteen_schedules_of_the_tutorial(schedules_module):
    made = schedules_module.make_schedules(0.1, steps_per_epoch=10, epochs=10)
    assert list(made) == SCHEDULES
    assert set(schedules_module.SMOKE) < set(made)


@pytest.mark.parametrize("name", SCHEDULES)
def test_each_schedule_stays_within_the_base_rate_and_runs_under_jit(schedules_module, name):
    import jax
    import numpy as np

    schedule = schedules_module.make_schedules(0.1, steps_per_epoch=10, epochs=10)[name]
    values = np.asarray(jax.jit(jax.vmap(schedule))(np.arange(101)))
    assert np.all(np.isfinite(values)) and values.min() >= 0.0
    assert values.max() <= 0.1 * (1 + 1e-6) and values.max() >= 0.1 * (1 - 1e-6)


def test_schedule_shapes_match_their_names(schedules_module):
    import numpy as np

    made = schedules_module.make_schedules(0.1, steps_per_epoch=10, epochs=10)
    at = {name: np.asarray([float(s(k)) for k in range(100)]) for name, s in made.items()}
    assert np.ptp(at["constant"]) == 0
    assert at["warmup_cosine_decay"][0] == 0 and at["warmup_cosine_decay"].argmax() == 10
    assert at["join_schedules"][10:50].min() == np.float32(0.1)  # the constant middle piece
    s = at["sgdr"]
    peaks = (s[1:-1] >= s[:-2]) & (s[1:-1] > s[2:]) & (s[1:-1] > 0.09)
    assert np.count_nonzero(peaks) == 3  # three warm restarts
    assert len(np.unique(at["piecewise_constant"])) == 4  # three halvings


def test_lr_on_the_fly_smoke_shows_no_recompilation(tmp_path):
    out = run_example("lr_on_the_fly.py", "--smoke", "--out", "otf.png", cwd=tmp_path)
    assert out.count("train step traced 1 time(s): no recompilation") == 2
    assert "train step traced 1 and 1 time(s)" in out
    # The hand-made changes are used from the very next step.
    change = re.search(r"step (\d+) used 0\.001, step (\d+) used 0\.0001", out)
    assert change and int(change.group(2)) == int(change.group(1)) + 1
    assert re.search(r"the callback set 3e-05, step \d+ used 3e-05", out)
    assert "writing a scheduled b1 is refused" in out
    assert "b1 went 0.100 -> " in out
    diff = float(re.search(r"weights differ by at most (\S+)", out).group(1))
    assert diff < 1e-6
    err = float(re.search(r"max relative error (\S+)\)", out).group(1))
    assert err < 1e-5
    assert png_size(tmp_path / "otf.png") == (1500, 360)


def test_nnx_example_smoke_trains_and_gives_the_module_back(tmp_path):
    out = run_example("nnx_example.py", "--smoke", "--out", "nnx.png", cwd=tmp_path)
    assert len(re.findall(r"^epoch +\d+ +val_loss", out, re.MULTILINE)) == 2
    assert "BatchStat" in out and "RngKey" in out
    acc = re.search(r"val accuracy (\S+) \(trainer.evaluate: (\S+)\); .*predict: True", out)
    assert acc and acc.group(1) == acc.group(2)
    assert png_size(tmp_path / "nnx.png") == (1500, 360)  # loss, accuracy, learning rate


@pytest.mark.parametrize("signal_name, status", [("int", 130), ("term", 143)])
def test_resume_smoke_stops_resumes_and_matches_the_uninterrupted_run(
    tmp_path, signal_name, status
):
    out = run_example("resume.py", "--smoke", "--signal", signal_name, "--run-dir", "run",
                      "--out", "resume.png", cwd=tmp_path)  # fmt: skip
    assert f"child exit status {status}" in out
    # Stopped mid-epoch: the checkpoint is of step 24, 8 batches into epoch 2.
    assert "step 24, epoch 1 done, batch 8 of the next" in out
    assert re.search(r"opt_state: \d+ arrays: Adam's step count 24, its moments mu and nu", out)
    assert "params restored bit for bit: True; optimizer state restored bit for bit: True" in out
    assert "resumed run finished: step 48" in out
    assert "train state identical True, history identical True" in out
    assert png_size(tmp_path / "resume.png") == (1500, 360)  # loss, accuracy, learning rate


def test_resume_refuses_a_non_empty_run_dir(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("mine")
    with pytest.raises(AssertionError, match="is not empty: pass a new --run-dir"):
        run_example("resume.py", "--smoke", "--run-dir", "run", cwd=tmp_path)
    assert (tmp_path / "run" / "keep.txt").read_text() == "mine"
