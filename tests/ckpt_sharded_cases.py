"""Sharded checkpoints on 8 fake CPU devices. Not collected by itself: test_ckpt_sharded.py
runs it in a subprocess with 8 devices (run it the same way:
``XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m pytest tests/ckpt_sharded_cases.py``)."""

from __future__ import annotations

import hashlib
import json
import shutil

import jax
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from sharding_models import Block, adam, data

import jaxfit._state
from jaxfit import Trainer
from jaxfit.callbacks import ModelCheckpoint
from jaxfit.checkpoint import CheckpointWarning, read_checkpoint
from jaxfit.checkpoint._msgpack import decode
from jaxfit.checkpoint._sharded import ShardedState
from jaxfit.sharding import per_device_bytes

if jax.device_count() != 8:
    raise RuntimeError("run with XLA_FLAGS=--xla_force_host_platform_device_count=8 (see test_ckpt_sharded.py)")

FSDP = jax.make_mesh((2, 4), ("data", "fsdp"))
TP = jax.make_mesh((2, 4), ("data", "model"))
LAYOUTS = {
    # name: (mesh, trainer layout arguments, model annotation, up/kernel spec, up/kernel shard shape)
    "fsdp": (FSDP, dict(rules=[("embed", "fsdp"), ("mlp", None)], data_axes=("data", "fsdp")), "logical",
             ["fsdp"], (2, 16)),
    "tp": (TP, dict(rules=[("embed", None), ("mlp", "model")]), "logical", [None, "model"], (8, 4)),
}
X, Y = data(64)
XV, YV = data(32, seed=1)


def trainer(mesh, layout, **kw):
    return Trainer(optimizer=adam(), loss="softmax_cross_entropy", metrics=["accuracy"], seed=0, mesh=mesh,
                   **layout, **kw)


def fit(run, name="fsdp", epochs=1, **cb):
    mesh, layout, mode, _, _ = LAYOUTS[name]
    t = trainer(mesh, layout)
    t.fit(Block(mode), (X, Y), validation_data=(XV, YV), epochs=epochs, batch_size=16, verbose=0,
          callbacks=[ModelCheckpoint(run, keep_last=5, **cb)])
    return t


def newest(run):
    return run / (run / "latest").read_text().strip()


def host(tree):
    return [np.asarray(a) for a in jax.tree_util.tree_leaves(jax.device_get(tree))]


def _mesh(devices, shape, names):
    return Mesh(np.array(devices).reshape(shape), names)


@pytest.mark.parametrize("name", ["fsdp", "tp"])
def test_a_sharded_state_is_written_as_shards_never_gathered(tmp_path, monkeypatch, name):
    def gathered(es):
        raise AssertionError("the checkpoint gathered the state to the host")

    monkeypatch.setattr(jaxfit._state, "train_state_dict", gathered)  # state_dict()'s whole-array fetch
    t = fit(tmp_path / "run", name)
    _, _, _, spec, shard_shape = LAYOUTS[name]
    ckpt = newest(tmp_path / "run")
    assert sorted(p.name for p in ckpt.iterdir()) == ["manifest.json", "shards-00000-of-00001.msgpack",
                                                      "state.msgpack"]
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["format_version"] == 2
    section = manifest["sharded"]
    assert section["process_count"] == 1 and section["parts"] == ["shards-00000-of-00001.msgpack"]
    assert section["mesh"] == {"axis_names": list(t.mesh.axis_names), "shape": [2, 4]}
    assert section["leaves"]["state/params/up/kernel"] == {"global_shape": [8, 16], "dtype": "float32",
                                                           "spec": spec}
    part = (ckpt / "shards-00000-of-00001.msgpack").read_bytes()
    assert manifest["files"]["shards-00000-of-00001.msgpack"] == {
        "sha256": hashlib.sha256(part).hexdigest(), "size": len(part)}
    records = decode(part)["shards"]
    kernel = [r for r in records if r["path"] == "state/params/up/kernel"]
    # One record per distinct slice (replicas once), each of the shard's shape, not (8, 16).
    assert len(kernel) == 4 and {r["data"].shape for r in kernel} == {shard_shape}
    assert len({str(r["index"]) for r in kernel}) == 4 and sum(r["data"].size for r in kernel) == 8 * 16
    head = [r for r in records if r["path"] == "state/params/head/kernel"]
    assert len(head) == 1 and head[0]["data"].shape == (8, 3)  # replicated: written once, whole
    assert decode((ckpt / "state.msgpack").read_bytes())["train_state"] == {}


def test_a_replicated_state_on_a_mesh_keeps_the_whole_format(tmp_path):
    t = trainer(jax.make_mesh((8,), ("data",)), {})
    t.fit(Block("plain"), (X, Y), epochs=1, batch_size=16, verbose=0,
          callbacks=[ModelCheckpoint(tmp_path / "run")])
    ckpt = newest(tmp_path / "run")
    assert sorted(p.name for p in ckpt.iterdir()) == ["manifest.json", "state.msgpack"]
    assert json.loads((ckpt / "manifest.json").read_text())["format_version"] == 1


def test_resume_8_to_4_to_1_devices_from_sharded_checkpoints(tmp_path):
    mesh, layout, mode, _, _ = LAYOUTS["fsdp"]
    full = trainer(mesh, layout)
    full.fit(Block(mode), (X, Y), validation_data=(XV, YV), epochs=3, batch_size=16, verbose=0)
    run = tmp_path / "run"
    fit(run, "fsdp", epochs=1)
    shutil.copytree(run, tmp_path / "copy")
    four = _mesh(jax.devices()[:4], (2, 2), ("data", "fsdp"))
    t4 = Trainer.load(str(run), mesh=four)
    assert t4.params["up"]["kernel"].sharding.spec == P("fsdp", None)
    assert set(per_device_bytes(t4.params["up"]["kernel"]).values()) == {8 * 16 * 4 // 2}
    t4.fit(epochs=2)  # writes a sharded checkpoint of the 4-device layout
    assert json.loads((newest(run) / "manifest.json").read_text())["sharded"]["mesh"]["shape"] == [2, 2]
    t1 = Trainer.load(str(run))
    assert t1.epoch == 2 and t1.mesh is None
    t1.fit(epochs=3)
    for a, b in zip(host(full.params), host(t1.params)):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(t1.history.history["loss"], full.history.history["loss"], atol=1e-5, rtol=1e-5)
    same = Trainer.load(str(tmp_path / "copy"), mesh=mesh)  # same mesh: bit for bit
    assert same.epoch == 1
    same.fit(epochs=3)
    for a, b in zip(host(full.state), host(same.state)):
        np.testing.assert_array_equal(a, b)
    assert same.history.history == full.history.history


def test_a_corrupt_part_falls_back_to_the_previous_checkpoint_with_a_warning(tmp_path):
    run = tmp_path / "run"
    fit(run, "fsdp", epochs=2)
    ckpt = newest(run)
    part = ckpt / "shards-00000-of-00001.msgpack"
    blob = bytearray(part.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    part.write_bytes(bytes(blob))
    with pytest.warns(CheckpointWarning, match=rf"{ckpt.name}: .*shards-00000-of-00001.msgpack fails its sha256"):
        t = Trainer.load(str(run), mesh=FSDP)
    assert t.epoch == 1
    part.unlink()
    with pytest.warns(CheckpointWarning, match=r"shards-00000-of-00001.msgpack is missing"):
        assert Trainer.load(str(run)).epoch == 1


def test_read_checkpoint_returns_the_records_and_their_whole_arrays_on_request(tmp_path):
    t = fit(tmp_path / "run", "tp")
    _, manifest, state = read_checkpoint(tmp_path / "run")
    assert isinstance(state["train_state"], ShardedState)
    whole = state["train_state"].to_host()
    np.testing.assert_array_equal(whole["state/params/up/kernel"], np.asarray(jax.device_get(t.params["up"]["kernel"])))
    assert set(whole) == set(manifest["sharded"]["leaves"])
