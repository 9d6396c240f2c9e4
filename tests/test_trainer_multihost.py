"""Two JAX processes on localhost (4 CPU devices each) train one FSDP run with
Trainer(mesh=...) over all 8 devices and match a one-device run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from test_multihost import _free_port

from jaxfit.checkpoint import decode_state, list_checkpoints, read_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    pid, port = int(sys.argv[1]), sys.argv[2]
    if pid >= 0:
        jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, PartitionSpec as P
    sys.path.insert(0, "tests")
    from sharding_models import Block, adam, data
    from jaxfit import ConfigError, Trainer
    from jaxfit.sharding import per_device_bytes
    x, y = data(64)
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    layouts = {
        # FSDP inside each host, data-parallel across hosts: each process holds whole arrays.
        "within": ("logical", lambda: dict(mesh=Mesh(np.array(devices).reshape(2, 4), ("data", "fsdp")),
                                           rules=[("embed", "fsdp"), ("mlp", None)], data_axes=("data", "fsdp"))),
        # FSDP over all 8 devices: every kernel is split across the two processes.
        "across": ("plain", lambda: dict(mesh=Mesh(np.array(devices), ("fsdp",)),
                                         param_rules=[(r"(up|down)/kernel$", P("fsdp"))], data_axes=("fsdp",))),
    }
    out = {"devices": jax.device_count()}
    for name, (mode, layout) in layouts.items():
        t = Trainer(optimizer=adam(), loss="softmax_cross_entropy", seed=0, **(layout() if pid >= 0 else {}))
        t.fit(Block(mode), (x, y), validation_data=(x[:32], y[:32]), epochs=2, batch_size=16, verbose=0)
        kernel = t.params["up"]["kernel"]
        params = multihost_utils.process_allgather(t.params, tiled=True) if pid >= 0 else jax.device_get(t.params)
        res = {"history": t.history.history,
               "params": [np.asarray(a).ravel().tolist() for a in jax.tree_util.tree_leaves(params)],
               "spec": str(kernel.sharding.spec) if pid >= 0 else None,
               "kernel_bytes": sorted(set(per_device_bytes(kernel).values()))}
        try:
            sd = t.state_dict()
            res["saved_kernel"] = np.asarray(sd["train_state"]["state"]["params"]["up"]["kernel"]).ravel().tolist()
        except ConfigError as e:
            res["save_error"] = str(e)
        out[name] = res
    print(json.dumps(out))
""")


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_train_fsdp_with_the_trainer_and_match_one_device():
    port = str(_free_port())
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(i), port], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    env1 = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    single = subprocess.run([sys.executable, "-c", WORKER, "-1", port], check=False, cwd=ROOT, env=env1,
                            capture_output=True, text=True, timeout=900)
    assert single.returncode == 0, single.stderr[-3000:]
    ref = json.loads(single.stdout.strip().splitlines()[-1])
    for out in outs:
        assert out["devices"] == 8
        for name, kernel_bytes in (("within", 8 * 16 * 4 // 4), ("across", 8 * 16 * 4 // 8)):
            got, want = out[name], ref[name]
            for key in want["history"]:
                np.testing.assert_allclose(got["history"][key], want["history"][key], rtol=1e-5, atol=1e-5)
            for a, b in zip(got["params"], want["params"]):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
            assert got["kernel_bytes"] == [kernel_bytes]  # 1/4, 1/8 of the (8, 16) f32 kernel
        assert out["within"]["spec"] == "P('fsdp', None)"  # rules: ("embed", "mlp") -> fsdp, None
        assert out["across"]["spec"] == "P('fsdp',)"
        # A process holding whole arrays snapshots them; a split one is refused, by name.
        np.testing.assert_allclose(out["within"]["saved_kernel"], ref["within"]["saved_kernel"], rtol=1e-5, atol=1e-5)
        assert re.search(r"state leaf 'state/params/(up|down)/kernel'", out["across"]["save_error"])
        assert "split across processes" in out["across"]["save_error"]


KILL_WORKER = os.path.join(ROOT, "tests", "multihost_kill_worker.py")


def _two(mode, run, out, **env_extra):
    port = str(_free_port())
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", **env_extra}
    procs = [subprocess.Popen([sys.executable, KILL_WORKER, mode, str(i), port, str(run), str(out)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in (0, 1)]
    return [(p.communicate(timeout=900)[1], p.returncode)[::-1] for p in procs]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_process_fsdp_run_split_across_processes_sigkilled_mid_run_resumes_bit_for_bit(tmp_path):
    full = tmp_path / "full.json"
    for code, err in _two("full", tmp_path / "full-run", full):
        assert code == 0, err[-3000:]
    # One run: process 0's run id on both (each checks the run directory by it).
    assert (tmp_path / "full.json.run_id0").read_text() == (tmp_path / "full.json.run_id1").read_text()
    run, out = tmp_path / "run", tmp_path / "resumed.json"
    for code, err in _two("kill", run, out, MH_KILL="1"):
        assert code == -signal.SIGKILL, err[-3000:]
    assert (run / "latest").read_text().strip().endswith("step6")  # killed after step 7
    ckpt = run / (run / "latest").read_text().strip()
    manifest = json.loads((ckpt / "manifest.json").read_text())
    # Each process wrote its own slices: a kernel's 8 slices, 4 in each part.
    assert manifest["sharded"]["parts"] == ["shards-00000-of-00002.msgpack", "shards-00001-of-00002.msgpack"]
    for part in manifest["sharded"]["parts"]:
        records = decode_state((ckpt / part).read_bytes())["shards"]
        kernel = [r for r in records if r["path"] == "state/params/up/kernel"]
        assert len(kernel) == 4 and {r["data"].shape for r in kernel} == {(1, 16)}
    for code, err in _two("resume", run, out):
        assert code == 0, err[-3000:]
    want, got = json.loads(full.read_text()), json.loads(out.read_text())
    assert got["step"] == want["step"] == 12
    assert got["spec"] == want["spec"] == "P('fsdp',)"
    assert got["history"] == want["history"]
    for a, b in zip(got["params"], want["params"]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_one_process_killed_while_writing_a_checkpoint_leaves_the_previous_one_newest(tmp_path):
    run, port = tmp_path / "run", str(_free_port())
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    procs = [subprocess.Popen([sys.executable, KILL_WORKER, "killone", str(i), port, str(run), str(tmp_path / "x")],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in (0, 1)]
    try:
        _, err = procs[1].communicate(timeout=900)
        assert procs[1].returncode == -signal.SIGKILL, err[-3000:]  # after writing its step-6 part
        try:  # process 0 waits for the dead one's report; give it time to (wrongly) commit
            procs[0].communicate(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    finally:
        procs[0].kill()
        procs[0].communicate()
    # Saved: step 3 (every 3 steps), step 4 (the end of epoch 1); step 6 was being written.
    assert (run / "latest").read_text().strip() == "ckpt-000002-step4"
    assert [info.name for info in list_checkpoints(run)] == ["ckpt-000001-step3", "ckpt-000002-step4"]
    pending = [d for d in run.iterdir() if d.name.startswith(".tmp-") and d.name.endswith("ckpt-000003-step6")]
    assert len(pending) == 1 and (pending[0] / "shards-00001-of-00002.msgpack").is_file()
    assert not (pending[0] / "manifest.json").exists()
    assert read_checkpoint(run)[1]["step"] == 4
