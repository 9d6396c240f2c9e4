"""python -m jaxfit: info table and resume."""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MLP, make_trainer

from jaxfit.__main__ import COMMANDS, command, main
from jaxfit.callbacks import ModelCheckpoint

ROOT = str(Path(__file__).resolve().parents[1])


@pytest.fixture
def run(tmp_path, data):
    x, y = data
    run = tmp_path / "run"
    make_trainer().fit(MLP(), (x, y), validation_data=(x, y), epochs=3, batch_size=16,
                       callbacks=[ModelCheckpoint(run, monitor="val_loss", keep_last=3)])
    return run


def _info(run, capsys, monkeypatch, *extra):
    monkeypatch.setenv("COLUMNS", "200")
    status = main(["info", str(run), *extra])
    return status, capsys.readouterr().out


def test_info_lists_checkpoints_with_latest_and_best(run, capsys, monkeypatch):
    status, out = _info(run, capsys, monkeypatch)
    assert status == 0
    rows = [line for line in out.splitlines() if "ckpt-" in line]
    assert [r.split()[1] for r in rows] == ["ckpt-000001-step5", "ckpt-000002-step10",
                                            "ckpt-000003-step15"]
    assert all("yes" in r and "val_loss=" in r for r in rows)
    assert "●" in rows[-1] and sum("★" in r for r in rows) == 1
    assert "best by val_loss (min)" in out and f"python -m jaxfit resume {run}" in out


def test_info_marks_a_corrupt_checkpoint_invalid_and_moves_latest(run, capsys, monkeypatch):
    (run / "ckpt-000003-step15" / "state.msgpack").write_bytes(b"garbage")
    status, out = _info(run, capsys, monkeypatch)
    rows = {line.split()[1]: line for line in out.splitlines() if "ckpt-" in line}
    assert status == 0
    assert "no: state.msgpack has 7 bytes" in rows["ckpt-000003-step15"]
    assert "●" in rows["ckpt-000002-step10"]


def test_info_on_a_missing_directory_fails_with_status_2(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nope")]) == 2
    assert "is not a run directory" in capsys.readouterr().err


def test_a_subcommand_is_one_function(capsys):
    @command
    def echo_twice(word: str, times: int = 2, loud: bool = False) -> int:
        """Print a word."""
        print((word.upper() if loud else word) * times)
        return 0

    try:
        assert main(["echo-twice", "ab", "--times", "3", "--loud"]) == 0
        assert capsys.readouterr().out.strip() == "ABABAB"
    finally:
        COMMANDS.pop("echo-twice")


@pytest.mark.multiprocess
def test_resume_continues_the_run_in_a_new_process(run, data):
    proc = subprocess.run([sys.executable, "-m", "jaxfit", "resume", str(run), "--epochs", "4"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={"PYTHONPATH": f"{ROOT}:{ROOT}/tests", "JAX_PLATFORMS": "cpu",
                               "PATH": "/usr/bin"})
    assert proc.returncode == 0, proc.stderr
    assert "resuming" in proc.stderr and "epoch 3, step 15" in proc.stderr
    assert (run / "latest").read_text().strip() == "ckpt-000004-step20"


def test_resume_reports_errors_without_a_traceback(tmp_path, capsys):
    assert main(["resume", str(tmp_path / "nope")]) == 1
    assert "error: no checkpoint or run directory" in capsys.readouterr().err


@pytest.mark.multiprocess
def test_recipe_needing_a_module_missing_here_is_explained(run):
    proc = subprocess.run([sys.executable, "-m", "jaxfit", "resume", str(run)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={"PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin"})
    assert proc.returncode == 1
    assert "the recipe refers to code that cannot be loaded here" in proc.stderr
    assert "No module named 'conftest'" in proc.stderr and "Traceback" not in proc.stderr
