"""A grain pipeline (2 worker processes, a shuffling sampler, a random augmentation) killed
with SIGKILL mid-epoch and resumed in a new process ends bit for bit where the uninterrupted
run ends, and the resumed process reads only the records after the checkpoint: the
pipeline's own state (grain's get_state) is in the checkpoint, nothing is replayed.

The run (tests/data_worker.py): 24 records, batches of 4, the sampler's 2 passes trained
as 2 epochs of steps_per_epoch=6; a checkpoint every 5 steps; killed after step 11, so the
newest checkpoint is step 10, 4 batches into epoch 2."""

import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

pytest.importorskip("grain")
pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

WORKER = str(Path(__file__).with_name("data_worker.py"))
ROOT = str(Path(__file__).resolve().parents[1])


def _run(mode, run, out, reads, *extra):
    env = {"PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin",
           "DATA_WORKER_KILL": "1" if mode == "kill" else "0", "DATA_WORKER_READS": str(reads)}
    proc = subprocess.Popen([sys.executable, WORKER, mode, str(run), str(out), *map(str, extra)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=400)
    finally:
        try:  # the grain workers of a killed run: end the process group this test started
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return proc.returncode, err


def _reads(path):
    return [int(line) for line in Path(path).read_text().split()]


def test_grain_dataloader_with_workers_killed_mid_epoch_resumes_bit_for_bit(tmp_path):
    code, err = _run("full", "-", tmp_path / "full.pkl", tmp_path / "full.reads")
    assert code == 0, err[-3000:]
    full = pickle.loads((tmp_path / "full.pkl").read_bytes())
    assert full["step"] == 12 and len(_reads(tmp_path / "full.reads")) == 48  # 2 passes of 24

    run = tmp_path / "run"
    code, err = _run("kill", run, tmp_path / "x.pkl", tmp_path / "killed.reads", 11)
    assert code == -signal.SIGKILL, err[-3000:]
    newest = [json.loads(p.read_text()) for p in run.glob("ckpt-*/manifest.json")]
    newest = max(newest, key=lambda m: m["step"])
    assert (newest["step"], newest["epoch"], newest["batch_in_epoch"]) == (10, 1, 4)

    code, err = _run("resume", run, tmp_path / "resumed.pkl", tmp_path / "resumed.reads")
    assert code == 0, err[-3000:]
    resumed = pickle.loads((tmp_path / "resumed.pkl").read_bytes())
    # Nothing before the checkpoint was produced again: the resumed process read exactly the
    # 8 records of steps 11 and 12, positions 40-47 of the sampler's order (the killed run,
    # whose workers read ahead, had read more than the checkpoint's 40).
    import grain

    sampler = grain.samplers.IndexSampler(24, shuffle=True, num_epochs=2, seed=7)
    after_checkpoint = sorted(sampler[i].record_key for i in range(40, 48))
    assert sorted(_reads(tmp_path / "resumed.reads")) == after_checkpoint
    assert len(_reads(tmp_path / "killed.reads")) > 40
    assert resumed["step"] == 12
    assert resumed["history"] == full["history"]
    for key in ("params", "model_state"):
        a, b = jax.tree_util.tree_leaves(full[key]), jax.tree_util.tree_leaves(resumed[key])
        assert len(a) == len(b) > 0
        assert all(np.asarray(u).tobytes() == np.asarray(v).tobytes() for u, v in zip(a, b))
