"""Two processes on one run directory: one is refused before any work, nothing on disk is lost.

Each scenario starts the workers of tests/ckpt_worker.py; the worker's Hold callback keeps
the winner inside its fit (after its first step, printing each step) until the test lets it
go, so the loser meets a directory whose writer is alive at a known point. The loser must
fail at fit start naming the winner's pid and host, print no step (no work), and touch
nothing; the winner then finishes, and every checkpoint left verifies and loads.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxfit import Trainer
from jaxfit.checkpoint import list_checkpoints

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

WORKER = str(Path(__file__).with_name("ckpt_worker.py"))
ROOT = str(Path(__file__).resolve().parents[1])
PATIENCE = 240  # seconds before a rendezvous is declared broken (a hang guard, not a timing)


_STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_stray_workers():
    """A failed test leaves no worker behind (waiting in Hold for a release that never comes)."""
    yield
    while _STARTED:
        proc = _STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _start(mode, run, hold_dir, *extra):
    env = {"PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin",
           "CKPT_WORKER_KILL": "1" if mode == "kill" else "0", "CKPT_HOLD_DIR": str(hold_dir)}
    if mode == "kill":
        del env["CKPT_HOLD_DIR"]
    proc = subprocess.Popen([sys.executable, WORKER, mode, str(run), os.devnull,
                             *map(str, extra)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _STARTED.append(proc)
    return proc


def _wait_for(condition, what):
    deadline = time.monotonic() + PATIENCE
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


def _snapshot(run):
    """Every file under the run directory with its bytes (the state of the disk)."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name != "writer.lock"}


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """A run SIGKILLed at step 6 (checkpoints at steps 4 and 5): to be resumed."""
    run = tmp_path_factory.mktemp("killed") / "run"
    proc = _start("kill", run, None, 6)
    proc.communicate(timeout=PATIENCE)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    return run


def _race(run, hold_dir, together):
    """Runs two workers (resuming ``run`` if it exists, else fresh runs) on ``run``.

    Returns:
      ``(winner, loser)``, each ``(proc, stdout, stderr)``, and the files of the run
      directory while the winner was held inside its fit.
    """
    mode = "resume" if run.exists() else "hold"
    a = _start(mode, run, hold_dir)
    if not together:  # the second starts while the first is inside its fit
        _wait_for(lambda: (hold_dir / f"held-{a.pid}").exists(), "the first worker to hold")
        running = _snapshot(run)
    b = _start(mode, run, hold_dir)
    procs = [a, b]
    _wait_for(lambda: any(p.poll() is not None for p in procs), "one worker to be refused")
    loser = next(p for p in procs if p.poll() is not None)
    winner = b if loser is a else a
    _wait_for(lambda: (hold_dir / f"held-{winner.pid}").exists(), "the winner to hold")
    out, err = loser.communicate()
    held = _snapshot(run)
    if not together:
        assert winner is a and held == running  # the refused writer changed nothing
    (hold_dir / "release").touch()
    w_out, w_err = winner.communicate(timeout=PATIENCE)
    assert winner.returncode == 0, w_err[-3000:]
    return (winner, w_out, w_err), (loser, out, err), held


def _assert_refused_before_work(loser, winner):
    proc, out, err = loser
    assert proc.returncode == 1, err[-3000:]
    assert (f"is being written by another process (pid {winner[0].pid} on host "
            f"{socket.gethostname()}") in err, err[-3000:]
    assert "refused before any work" in err
    assert "step " not in out  # not one training step


def _assert_intact(run, before, held):
    """Nothing lost: what was on disk before is still there while the winner holds the
    directory; at the end every checkpoint verifies, names an existing recipe, belongs to
    one run, and the run loads where the winner left it."""
    assert {k: v for k, v in held.items() if k in before} == before
    infos = list_checkpoints(run)
    assert infos and all(i.verify() for i in infos)
    assert len({i.manifest["run_id"] for i in infos}) == 1
    recipes = {i.manifest["recipe"]["file"] for i in infos}
    assert {p.name for p in run.glob("recipe-*.pkl")} == recipes
    assert not [p for p in run.iterdir() if p.name.startswith(".tmp-")]
    loaded = Trainer.load(run)
    assert (loaded.step, loaded.epoch) == (12, 3)


@pytest.fixture
def dirs(tmp_path):
    hold = tmp_path / "hold"
    hold.mkdir()
    return tmp_path / "run", hold


def test_two_fresh_runs_started_together(dirs):
    run, hold = dirs
    winner, loser, held = _race(run, hold, together=True)
    _assert_refused_before_work(loser, winner)
    _assert_intact(run, {}, held)


def test_resume_while_the_run_is_still_running(dirs, killed_run):
    run, hold = dirs
    shutil.copytree(killed_run, run)
    before = _snapshot(run)
    winner, loser, held = _race(run, hold, together=False)
    assert "step 6" in winner[1]  # the winner resumed after the step-5 checkpoint
    _assert_refused_before_work(loser, winner)
    _assert_intact(run, before, held)


def test_two_resumes_started_together(dirs, killed_run):
    run, hold = dirs
    shutil.copytree(killed_run, run)
    before = _snapshot(run)
    winner, loser, held = _race(run, hold, together=True)
    _assert_refused_before_work(loser, winner)
    _assert_intact(run, before, held)
