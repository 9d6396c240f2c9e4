"""Two JAX processes on localhost train FSDP over both, each writes only its own shards, and
one single-device process reassembles them into the state a one-device run computes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from test_multihost import _free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = textwrap.dedent("""
    import json, os, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    pid, port, out_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    if pid >= 0:
        jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
    import numpy as np
    sys.path.insert(0, "tests")
    from sharding_models import Block, adam, data, state_fns
    from jaxfit.sharding import ShardingPlan, assemble_tree, local_shards, pack_shards, per_device_bytes, unbox, unpack_shards
    x, y = data(32)
    init, step = state_fns(Block("logical"), adam())
    if pid >= 0:
        plan = ShardingPlan(jax.make_mesh((2, 4), ("data", "fsdp")), rules=[("embed", "fsdp"), ("mlp", None)],
                            data_axes=("data", "fsdp"))
        state, sh = plan.init(init, np.asarray(jax.random.key_data(jax.random.key(0))), x[:2])
        batch = plan.batch_sharding()
        sharded_step = jax.jit(step, in_shardings=(sh, batch, batch), donate_argnums=0)
        losses = []
        for i in range(2):
            rows = slice(16 * i + 8 * pid, 16 * i + 8 * pid + 8)  # this process's half of the batch
            bx, by = plan.place_batch((x[rows], y[rows]), process_local=True)
            state, loss = sharded_step(state, bx, by)
            losses.append(float(loss.addressable_data(0)))
        with open(os.path.join(out_dir, f"shards-{pid}.msgpack"), "wb") as f:
            f.write(pack_shards(local_shards(state)))
        kernel = state["params"]["up"]["kernel"]
        print(json.dumps({"losses": losses, "devices": jax.device_count(),
                          "kernel_bytes": sorted(set(per_device_bytes(kernel).values())),
                          "kernel_shards": len(kernel.addressable_shards)}))
    else:
        state = jax.jit(lambda k, a: unbox(init(k, a)))(np.asarray(jax.random.key_data(jax.random.key(0))), x[:2])
        losses = []
        for i in range(2):
            state, loss = jax.jit(step)(state, x[16 * i:16 * (i + 1)], y[16 * i:16 * (i + 1)])
            losses.append(float(loss))
        records = []
        for name in ("shards-0.msgpack", "shards-1.msgpack"):
            with open(os.path.join(out_dir, name), "rb") as f:
                records += unpack_shards(f.read())
        one = ShardingPlan(jax.make_mesh((1,), ("data",)))
        back = assemble_tree(records, one.shardings(state))
        diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                   for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(back)))
        print(json.dumps({"losses": losses, "max_diff": diff,
                          "paths": sorted({r.path for r in records})[:3], "records": len(records)}))
""")


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_process_fsdp_shards_reassemble_on_one_device(tmp_path):
    import numpy as np

    port = str(_free_port())
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(i), port, str(tmp_path)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    env1 = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    ref = subprocess.run([sys.executable, "-c", WORKER, "-1", port, str(tmp_path)], cwd=ROOT, env=env1,
                         check=False, capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    single = json.loads(ref.stdout.strip().splitlines()[-1])
    for out in outs:
        assert out["devices"] == 8 and out["kernel_shards"] == 4
        # up/kernel (8, 16) float32 split 4 ways over "fsdp": 128 bytes on each device.
        assert out["kernel_bytes"] == [8 * 16 * 4 // 4]
        np.testing.assert_allclose(out["losses"], single["losses"], rtol=1e-5)
    # Each process wrote only its shards; together they rebuild the one-device state.
    assert single["max_diff"] < 1e-5, single
