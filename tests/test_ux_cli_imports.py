"""``python -m jaxfit --help`` and ``info`` answer without importing JAX; every public name
of ``jaxfit`` is still importable (lazily where it needs JAX)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.multiprocess

REPO = Path(__file__).resolve().parent.parent

# Runs `python -m jaxfit ARGS` in-process (runpy, as -m does), then reports which of the
# heavy packages it imported and the exit status.
PROBE = """
import json, runpy, sys
sys.argv = ["jaxfit", *sys.argv[1:]]
status = 0
try:
    runpy.run_module("jaxfit", run_name="__main__", alter_sys=True)
except SystemExit as e:
    status = e.code
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"jax", "jaxlib", "flax", "optax"})
print("PROBE" + json.dumps({"status": status, "heavy": heavy}))
"""


def probe(*args: str, cwd: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="120")
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE")), None)
    assert line, f"no report from the probe:\n{proc.stdout}\n{proc.stderr}"
    return dict(json.loads(line[5:]), out=proc.stdout, err=proc.stderr)


@pytest.mark.parametrize("args", [["--help"], ["info", "--help"], ["resume", "--help"]])
def test_help_does_not_import_jax(tmp_path, args):
    got = probe(*args, cwd=tmp_path)
    assert got["status"] == 0 and "usage: python -m jaxfit" in got["out"]
    assert got["heavy"] == [], f"--help imported {got['heavy']}"


def test_info_does_not_import_jax(tmp_path, data):
    import optax
    from conftest import MLP

    from jaxfit import Trainer
    from jaxfit.callbacks import ModelCheckpoint

    trainer = Trainer(optimizer=optax.inject_hyperparams(optax.sgd)(learning_rate=0.1),
                      metrics=["accuracy"], seed=0)  # fmt: skip
    trainer.fit(MLP(), data, epochs=1, batch_size=16, callbacks=[ModelCheckpoint(tmp_path / "run")])
    got = probe("info", str(tmp_path / "run"), cwd=tmp_path)
    assert got["status"] == 0, got["err"]
    assert "ckpt-000001" in got["out"] and "resume with:" in got["out"]
    assert got["heavy"] == [], f"info imported {got['heavy']}"


def test_public_names_stay_importable_and_jax_comes_with_the_trainer(tmp_path):
    code = """
import sys
import jaxfit
light = "jax" not in sys.modules
from jaxfit import (Callback, CallbackError, CallbackList, ConfigError, DataError, History,
                    HyperParams, HyperparamError, JaxfitError, MonitorError, Preempted,
                    ShapeError, TrainState, Trainer, __version__)
import jaxfit.trainer
assert jaxfit.Trainer is jaxfit.trainer.Trainer and jaxfit.TrainState.__name__ == "TrainState"
assert set(jaxfit.__all__) <= set(dir(jaxfit))
try:
    jaxfit.no_such_name
except AttributeError as e:
    assert "has no attribute 'no_such_name'" in str(e)
else:
    raise AssertionError("no AttributeError")
print(light, "jax" in sys.modules)
"""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "True"]
