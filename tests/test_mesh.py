"""Data-parallel training on a mesh of 8 CPU devices matches one device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np, optax
    sys.path.insert(0, "tests")
    from conftest import BNDropout, make_trainer
    from jaxfit import ConfigError
    assert jax.device_count() == 8
    rng = np.random.default_rng(0)
    x = rng.normal(size=(104, 4)).astype(np.float32)  # the last batch of 8 splits over 8 devices
    y = (x[:, 0] > 0).astype(np.int32)
    out = {}
    for name, mesh in [("single", None), ("mesh", jax.make_mesh((8,), ("data",)))]:
        for k in (1, 2):
            # SGD, not Adam: Adam rescales the float-noise gradient of the bias that BatchNorm
            # cancels to a full step, which makes that (irrelevant) bias differ between layouts.
            t = make_trainer(mesh=mesh, steps_per_execution=k,
                             optimizer=optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9))
            t.fit(BNDropout(), (x, y), validation_data=(x, y), epochs=2, batch_size=16)
            first_traces = t.trace_counts["train"]
            t.hyperparams["learning_rate"] = 0.05
            t.fit(epochs=3)
            leaves = jax.tree_util.tree_leaves(jax.device_get(t.params))
            out[f"{name}{k}"] = dict(history=t.history.history, params=[l.ravel().tolist() for l in leaves],
                                     traces=t.trace_counts["train"], first_traces=first_traces,
                                     sharding=str(jax.tree_util.tree_leaves(t.params)[0].sharding),
                                     predict=t.predict(x[:10]).tolist())
    try:
        make_trainer(mesh=jax.make_mesh((8,), ("data",))).fit(BNDropout(), (x, y), batch_size=12)
    except ConfigError as e:
        out["error"] = str(e)
    try:  # a BatchNorm model: padding the last batch (100 = 6 * 16 + 4) would leak into its statistics
        make_trainer(mesh=jax.make_mesh((8,), ("data",))).fit(BNDropout(), (x[:100], y[:100]), batch_size=16)
    except ConfigError as e:
        out["pad_error"] = str(e)
    print(json.dumps(out))
""")


@pytest.mark.multiprocess
@pytest.mark.slow
def test_data_parallel_on_8_cpu_devices_matches_single_device():
    import numpy as np

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for k in (1, 2):
        single, mesh = out[f"single{k}"], out[f"mesh{k}"]
        for key in single["history"]:
            # Accuracy may flip on a near-tie logit (1 sample in 100); losses agree to float noise.
            atol = 0.011 if "accuracy" in key else 2e-6
            np.testing.assert_allclose(single["history"][key], mesh["history"][key], rtol=2e-5, atol=atol)
        for a, b in zip(single["params"], mesh["params"]):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(single["predict"], mesh["predict"], rtol=1e-4, atol=1e-5)
        assert mesh["traces"] == mesh["first_traces"]  # hyperparameter writes on a mesh do not recompile
        assert "NamedSharding" in mesh["sharding"]
    assert "batch size 12 does not split evenly over the 8 devices" in out["error"]
    assert "last batch of 4 samples does not split over the 8 devices" in out["pad_error"]
    assert "drop_remainder=True" in out["pad_error"]
