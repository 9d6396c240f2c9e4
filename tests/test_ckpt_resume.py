"""Exact resume across processes: SIGKILL / SIGTERM a run, load it in a new process, and
end bit-identical (params, batch statistics, history, the states of LRScheduler,
ReduceOnPlateau and EarlyStopping) to the uninterrupted run.

The worker's run (tests/ckpt_worker.py): 50 examples, batch 16, so 4 steps per epoch; a
Dropout + BatchNorm model; a checkpoint every 5 steps and at every epoch end; early stopping
ends it after epoch 3, at step 12."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

WORKER = str(Path(__file__).with_name("ckpt_worker.py"))
ROOT = str(Path(__file__).resolve().parents[1])


def _run(*args, check=True, devices=0, child_pid_file=None):
    env = {"PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin",
           "CKPT_WORKER_KILL": "0" if args[0] == "resume" else "1",
           "CKPT_WORKER_DEVICES": str(devices or ""),
           "CKPT_CHILD_PID_FILE": str(child_pid_file or os.devnull)}
    proc = subprocess.run([sys.executable, WORKER, *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"worker {args} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def _dies(pid, within=10.0):
    """Whether process ``pid`` is gone (or a zombie) within ``within`` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.02)
    return False


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "full.pkl"
    _run("full", "-", out)
    return pickle.loads(out.read_bytes())


def _assert_identical(a, b):
    assert (a["step"], a["epoch"]) == (b["step"], b["epoch"]) == (12, 3)
    assert a["history"] == b["history"]  # floats compared exactly
    assert a["callbacks"] == b["callbacks"]
    assert a["callbacks"]["ReduceOnPlateau"]["reductions"] == 2
    for key in ("params", "model_state"):
        leaves_a, tree_a = jax.tree_util.tree_flatten(a[key])
        leaves_b, tree_b = jax.tree_util.tree_flatten(b[key])
        assert tree_a == tree_b
        for x, y in zip(leaves_a, leaves_b):
            assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def _manifests(run):
    return [json.loads(p.read_text()) for p in sorted(run.glob("ckpt-*/manifest.json"))]


# every_n_steps=5 checkpoints mid-epoch 2.
@pytest.mark.parametrize("mode, kill_at, resume_from", [
    ("kill_epoch", 2, (8, 2, 0)),  # right after the end-of-epoch-2 checkpoint
    ("kill", 6, (5, 1, 1)),      # after the step-5 checkpoint, one batch into epoch 2
    ("race", 10, (8, 2, 0)),     # killed while step 10's checkpoint is being written
    ("race_thread", 10, (8, 2, 0)),  # the same, written by a thread of the trainer
])
def test_sigkill_then_load_and_fit_is_bit_identical(tmp_path, uninterrupted, mode, kill_at,
                                                    resume_from):
    run, out = tmp_path / "run", tmp_path / "resumed.pkl"
    child_pid_file = tmp_path / "child.pid"
    proc = _run(mode, run, out, kill_at, check=False, child_pid_file=child_pid_file)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    if mode == "race":  # the writer process, mid-write, died with its trainer
        assert _dies(int(child_pid_file.read_text()))
    newest = _manifests(run)[-1]
    assert (newest["step"], newest["epoch"], newest["batch_in_epoch"]) == resume_from
    if mode.startswith("race"):  # the write under way left only a temporary directory
        assert [p.name for p in run.iterdir() if p.name.startswith(".tmp-")]
    _run("resume", run, out)
    _assert_identical(pickle.loads(out.read_bytes()), uninterrupted)


def test_sigterm_exits_143_after_checkpoint_and_resumes_exactly(tmp_path, uninterrupted):
    run, out = tmp_path / "run", tmp_path / "resumed.pkl"
    proc = _run("term", run, out, 7, check=False)
    assert proc.returncode == 143, proc.stderr[-2000:]
    newest = _manifests(run)[-1]
    assert (newest["reason"], newest["step"], newest["batch_in_epoch"]) == ("preempted", 7, 3)
    _run("resume", run, out)
    _assert_identical(pickle.loads(out.read_bytes()), uninterrupted)


@pytest.fixture(scope="module")
def uninterrupted_on_a_mesh(tmp_path_factory):
    out = tmp_path_factory.mktemp("full_mesh") / "full.pkl"
    _run("full", "-", out, devices=2)
    return pickle.loads(out.read_bytes())


def test_data_parallel_run_resumes_exactly_on_its_mesh(tmp_path, uninterrupted_on_a_mesh):
    run, out = tmp_path / "run", tmp_path / "resumed.pkl"
    proc = _run("kill", run, out, 6, check=False, devices=2)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    _run("resume", run, out, devices=2)  # Trainer.load(run, mesh=...)
    _assert_identical(pickle.loads(out.read_bytes()), uninterrupted_on_a_mesh)
