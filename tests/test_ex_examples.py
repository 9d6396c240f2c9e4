"""Every example owned here runs in smoke mode and prints and writes what it promises."""

import re

import pytest

from ex_support import png_size, run_example

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
    for name in SCHEDULES:
        row = re.search(rf"^[│|] {name}\s+[│|]\s+(\d\.\d{{4}})\s+[│|]", out, re.MULTILINE)
        assert row, f"no table row for {name}:\n{out}"
        assert 0.0 <= float(row.group(1)) <= 1.0
    # 14 learning-rate panels in two rows of 7, then the accuracy row: 7 x 3.0 by 3 x 2.6 in.
    assert png_size(tmp_path / "study.png") == (2100, 780)


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
