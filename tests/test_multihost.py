"""Two JAX processes on localhost train one data-parallel run that matches one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    pid, port = int(sys.argv[1]), sys.argv[2]
    if pid >= 0:
        jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
    import numpy as np, optax
    sys.path.insert(0, "tests")
    from conftest import MLP, make_trainer
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 4)).astype(np.float32); y = (x[:, 0] > 0).astype(np.int32)
    mesh = jax.make_mesh((4,), ("data",)) if pid >= 0 else None
    t = make_trainer(mesh=mesh, optimizer=optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9))
    t.fit(MLP(), (x, y), validation_data=(x, y), epochs=2, batch_size=16)
    # Params are replicated: every process holds a full copy on each of its devices.
    params = [np.asarray(l.addressable_data(0)).ravel().tolist() for l in jax.tree_util.tree_leaves(t.params)]
    print(json.dumps({"history": t.history.history, "params": params, "devices": jax.device_count()}))
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_match_one():
    port = str(_free_port())
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(i), port], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    single = subprocess.run([sys.executable, "-c", WORKER, "-1", port], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert single.returncode == 0, single.stderr[-3000:]
    ref = json.loads(single.stdout.strip().splitlines()[-1])
    assert outs[0]["devices"] == 4
    for out in outs:
        for key in ref["history"]:
            atol = 0.011 if "accuracy" in key else 2e-6
            np.testing.assert_allclose(out["history"][key], ref["history"][key], rtol=2e-5, atol=atol)
        for a, b in zip(out["params"], ref["params"]):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
