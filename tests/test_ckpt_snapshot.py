"""The checkpoint's device-side snapshot and the cheap write path behind it.

A save packs the train state's arrays, already msgpack-encoded, into one device buffer
(``jaxfit.checkpoint._snapshot``), and the writer writes that buffer as it is: the bytes on
disk must be exactly those of encoding the fetched state leaf by leaf.
"""

import hashlib
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import struct

from jaxfit import _state
from jaxfit.checkpoint import RunWriter, _io, _msgpack, read_checkpoint
from jaxfit.checkpoint._snapshot import Snapshot, fetcher, owned_copy


@struct.dataclass
class _Engine:  # the shape of the engine's state: a step, the train state, scalars
    step: jax.Array
    state: dict
    hp_scales: dict


def _engine(**state):
    return _Engine(jnp.int32(7), state, {"learning_rate": jnp.float32(1.0)})


MIXED = dict(
    params={"dense": {"kernel": jnp.arange(12, dtype=jnp.float32).reshape(3, 4),
                      "bias": jnp.zeros((0,), jnp.bfloat16)},
            "half": jnp.full((2, 2), 1.5, jnp.float16),
            "mask": jnp.array([True, False, True])},
    key=jax.random.key(1),
    keys=jax.random.split(jax.random.key(2), 3),
    opt=(jnp.float32(2.0), [jnp.arange(5, dtype=jnp.int8), jnp.uint32(9)]),
    # 20 entries: a msgpack map of 16 or more entries has a longer header.
    many={f"w{i:02d}": jnp.full((i,), i, jnp.float32) for i in range(20)},
)


def _slow_bytes(es):
    return _msgpack.encode(_state.train_state_dict(es))


def test_packed_snapshot_encodes_exactly_what_the_leaf_by_leaf_write_does():
    es = _engine(**MIXED)
    snap = Snapshot(es)
    assert snap.packed and snap.finite()
    fast = b"".join(bytes(p) for p in snap.train_state().parts)
    assert fast == _slow_bytes(es)
    decoded = _msgpack.decode(fast)
    assert decoded["state"]["params"]["half"].dtype == np.float16
    assert decoded["state"]["params"]["dense"]["bias"].dtype == ml_dtypes.bfloat16
    assert decoded["state"]["params"]["mask"].tolist() == [True, False, True]


def test_the_snapshot_is_the_state_at_the_save_not_after_the_next_donating_step():
    es = _engine(w=jnp.ones((64,), jnp.float32))
    step = jax.jit(lambda e: e.replace(state={"w": e.state["w"] * 3}), donate_argnums=0)
    snap = Snapshot(es)
    expected = _slow_bytes(es)
    es = step(es)  # reuses the live buffers at once
    jax.block_until_ready(es)
    assert b"".join(bytes(p) for p in snap.train_state().parts) == expected


def test_a_dtype_the_flat_buffer_cannot_carry_keeps_a_copy_per_leaf():
    es = _engine(w=jnp.ones((4,), jnp.float32), packed4=jnp.zeros((4,), jnp.int4))
    snap = Snapshot(es)
    assert not snap.packed
    tree = snap.train_state()
    assert tree["state"]["packed4"].dtype == jnp.int4 and tree["state"]["w"].tolist() == [1] * 4


@pytest.mark.parametrize("process", [True, False])
@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("dtype,bad", [(jnp.float32, jnp.nan), (jnp.bfloat16, jnp.nan),
                                       (jnp.float16, -jnp.inf), (jnp.float32, jnp.inf)])
def test_a_non_finite_train_state_is_seen_by_either_path(tmp_path, packed, dtype, bad, process):
    extra = {} if packed else {"i4": jnp.zeros((2,), jnp.int4)}
    es = _engine(b=jnp.ones((3,), jnp.float32), w=jnp.array([1.0, bad, 2.0], dtype),
                 h=jnp.ones((2,), jnp.float16), **extra)
    snap = Snapshot(es)
    assert snap.packed is packed and not snap.finite()
    ok = Snapshot(_engine(w=jnp.ones((2,), jnp.float32), h=jnp.ones((2,), dtype), **extra))
    assert ok.finite()
    # A float outside the train state (a hyperparameter's scale) is not tested.
    outside = _Engine(jnp.int32(7), {"w": jnp.ones((2,), dtype), **extra},
                      {"learning_rate": jnp.float32(jnp.nan)})
    assert Snapshot(outside).finite()
    # Tested on the devices; the writer (process or thread) skips the save.
    writer = RunWriter(tmp_path, keep_last=3, keep_best=0, monitor=None, mode=None,
                       process=process)
    assert (writer._child is not None) is process
    meta = {"format": 1, "train_state": {}, "step": 1}
    for step, s in ((1, snap), (2, ok)):
        writer.save(meta, fetch=fetcher(s, meta, sharded=False), step=step, epoch=1,
                    batch_in_epoch=0, reason="epoch", metrics={})
    writer.close()
    assert writer.take_skipped() == [1]
    assert [p.name for p in tmp_path.glob("ckpt-*")] == ["ckpt-000002-step2"]


def test_a_written_packed_checkpoint_reads_back_bit_for_bit(tmp_path):
    es = _engine(**MIXED)
    snap = Snapshot(es)
    writer = RunWriter(tmp_path, keep_last=2, keep_best=0, monitor=None, mode=None)
    meta = {"format": 1, "train_state": {}, "step": 7, "history": {"loss": [0.5, 0.25]}}
    writer.save(meta, fetch=fetcher(snap, meta, sharded=False), step=7, epoch=1,
                batch_in_epoch=0, reason="epoch", metrics={})
    writer.wait()
    _, _, got = read_checkpoint(tmp_path)  # (directory, manifest, state)
    want = _state.train_state_dict(es)
    assert got["history"] == {"loss": [0.5, 0.25]}
    flat_got = jax.tree_util.tree_leaves(got["train_state"])
    flat_want = jax.tree_util.tree_leaves(want)
    assert len(flat_got) == len(flat_want)
    for a, b in zip(flat_got, flat_want):
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_lists_of_scalars_encode_as_the_element_by_element_walk():
    values = [0.5, 3, None, "x", True, b"\x00", -(2**63), 2**64 - 1]
    packer = _msgpack.msgpack.Packer(use_bin_type=True)
    walked = packer.pack_array_header(len(values)) + b"".join(packer.pack(v) for v in values)
    assert _msgpack.encode(values) == walked
    with pytest.raises(OverflowError, match=r"integer at 'h/2' does not fit in 64 bits"):
        _msgpack.encode({"h": [1, 2, 2**64]})


def test_dicts_of_scalars_encode_as_the_item_by_item_walk():
    records = [{"step": 3, "epoch": 1, "val_loss": 0.25}, {}, {"name": "x", "flag": None},
               {f"k{i:02d}": float(i) for i in range(20)}]  # 16 or more: a longer header
    packer = _msgpack.msgpack.Packer(use_bin_type=True)

    def walked(d):
        return packer.pack_map_header(len(d)) + b"".join(
            packer.pack(k) + packer.pack(v) for k, v in d.items())

    for record in records:
        assert _msgpack.encode(record) == walked(record)
    with pytest.raises(OverflowError, match=r"integer at 'v/k' does not fit in 64 bits"):
        _msgpack.encode({"v": {"k": 2**64}})
    with pytest.raises(TypeError, match=r"dict key 1 at 'v' is a int"):
        _msgpack.encode({"v": {1: 0.5}})


def test_the_host_part_of_a_save_is_a_copy_the_fit_cannot_change():
    history = {"loss": [0.5, 0.25], "validations": [{"step": 2, "val_loss": 0.75}]}
    base = np.arange(4.0)
    state = {"history": history, "views": [base[1:]], "nested": [[1.0], {"a": base[:2]}]}
    copy = owned_copy(state)
    history["loss"].append(0.125)  # the fit goes on while the writer thread writes
    history["validations"][0]["val_loss"] = 9.0
    base[:] = -1.0
    assert copy["history"] == {"loss": [0.5, 0.25],
                               "validations": [{"step": 2, "val_loss": 0.75}]}
    assert copy["views"][0].tolist() == [1.0, 2.0, 3.0]
    assert copy["nested"][1]["a"].tolist() == [0.0, 1.0]


def test_hashing_writer_gathers_small_writes_without_changing_bytes_or_digest(tmp_path):
    pieces = [b"a" * 10, memoryview(np.arange(100_000, dtype=np.uint8)), b"b" * 70_000,
              b"", b"c" * 3, memoryview(np.ones(5, np.uint8))]
    entry = _io.write_file(tmp_path / "f", lambda w: [w.write(p) for p in pieces])
    data = b"".join(bytes(p) for p in pieces)
    assert (tmp_path / "f").read_bytes() == data
    assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def test_a_save_fsyncs_the_files_and_directories_a_power_loss_needs(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        real(fd)

    writer = RunWriter(tmp_path, keep_last=1, keep_best=0, monitor=None, mode=None,
                       background=False)
    writer.save({"train_state": {"w": np.zeros(3)}}, step=1, epoch=1, batch_in_epoch=0,
                reason="epoch", metrics={})
    monkeypatch.setattr(os, "fsync", fsync)
    writer.save({"train_state": {"w": np.ones(3)}}, step=2, epoch=2, batch_in_epoch=0,
                reason="epoch", metrics={})
    # The state and the manifest, the checkpoint's directory before its rename and the run
    # directory after it; not the `latest` pointer, nor the removal of the older one.
    assert synced[:2] == ["state.msgpack", "manifest.json"]
    assert synced[2].startswith(".tmp-") and synced[2].endswith("ckpt-000002-step2")
    assert synced[3:] == [tmp_path.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-000002-step2", "latest"]


def test_a_checkpoint_deleted_by_hand_during_the_run_does_not_fail_retention(tmp_path):
    import shutil

    writer = RunWriter(tmp_path, keep_last=1, keep_best=0, monitor=None, mode=None,
                       background=False)
    writer.save({"train_state": {"w": np.zeros(3)}}, step=1, epoch=1, batch_in_epoch=0,
                reason="epoch", metrics={})
    shutil.rmtree(tmp_path / "ckpt-000001-step1")  # the writer still knows it
    writer.save({"train_state": {"w": np.ones(3)}}, step=2, epoch=2, batch_in_epoch=0,
                reason="epoch", metrics={})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-000002-step2", "latest"]
