"""Exact resume across processes: SIGKILL / SIGTERM a run, load it in a new process, and
end bit-identical (params, batch statistics, history) to the uninterrupted run."""

import json
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

WORKER = str(Path(__file__).with_name("ckpt_worker.py"))
ROOT = str(Path(__file__).resolve().parents[1])


def _run(*args, check=True):
    env = {"PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin",
           "CKPT_WORKER_KILL": "0" if args[0] == "resume" else "1"}
    proc = subprocess.run([sys.executable, WORKER, *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"worker {args} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "full.pkl"
    _run("full", "-", out)
    return pickle.loads(out.read_bytes())


def _assert_identical(a, b):
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"]
    assert a["history"] == b["history"]  # floats compared exactly
    for key in ("params", "model_state"):
        leaves_a, tree_a = jax.tree_util.tree_flatten(a[key])
        leaves_b, tree_b = jax.tree_util.tree_flatten(b[key])
        assert tree_a == tree_b
        for x, y in zip(leaves_a, leaves_b):
            assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def _manifests(run):
    return [json.loads(p.read_text()) for p in sorted(run.glob("ckpt-*/manifest.json"))]


# 50 examples, batch 16: 4 steps per epoch; every_n_steps=5 checkpoints mid-epoch 2.
@pytest.mark.parametrize("mode, kill_at, resume_from", [
    ("kill_epoch", 2, (8, 2, 0)),  # right after the end-of-epoch-2 checkpoint
    ("kill", 6, (5, 1, 1)),      # after the step-5 checkpoint, one batch into epoch 2
    ("race", 10, None),          # step-10 write may be under way: whichever is valid
])
def test_sigkill_then_load_and_fit_is_bit_identical(tmp_path, uninterrupted, mode, kill_at,
                                                    resume_from):
    run, out = tmp_path / "run", tmp_path / "resumed.pkl"
    proc = _run(mode, run, out, kill_at, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    newest = _manifests(run)[-1]
    if resume_from is not None:
        assert (newest["step"], newest["epoch"], newest["batch_in_epoch"]) == resume_from
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
