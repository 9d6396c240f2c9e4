"""The msgpack state encoding: round trips, flax compatibility, clear errors."""

import io

import flax.serialization
import jax.numpy as jnp
import ml_dtypes
import msgpack
import numpy as np
import pytest

from jaxfit.checkpoint import CheckpointCorruptError, _msgpack, decode_state, encode_state


def _state():
    return {
        "train_state": {
            "step": np.asarray(7, np.int32),
            "params": {"Dense_0": {"kernel": np.arange(12, dtype=np.float32).reshape(3, 4),
                                   "bias": np.zeros(4, np.float32)}},
            "bf16": np.ones((2, 2), ml_dtypes.bfloat16),
            "key": np.array([1, 2], np.uint32),
            "empty": np.zeros((0, 3), np.float64),
        },
        "epoch": 3, "batch_in_epoch": 0, "seed": 0, "lr": 0.1, "stop_reason": None,
        "flag": True, "name": "x", "scalar": np.float32(2.5),
        "history": {"loss": [1.0, 0.5]}, "nested": [[1, 2], {"a": np.int64(-3)}],
    }


def _assert_same(a, b):
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    elif isinstance(a, (np.ndarray, np.generic)):
        assert np.asarray(b).dtype == np.asarray(a).dtype
        assert np.asarray(b).shape == np.asarray(a).shape
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    else:
        assert a == b and type(a) is type(b)


def test_round_trip_is_bit_exact_for_every_leaf_type():
    state = _state()
    _assert_same(state, decode_state(encode_state(state)))


def test_decoded_arrays_are_writable_and_own_their_memory():
    out = decode_state(encode_state({"w": np.ones(3, np.float32)}))["w"]
    out[0] = 5.0
    assert out.flags.owndata and out[0] == 5.0


def test_flax_reads_jaxfit_state_and_jaxfit_reads_flax_state():
    state = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": {"c": np.int32(4)}}
    ours = flax.serialization.msgpack_restore(encode_state(state))
    _assert_same(state, ours)
    theirs = decode_state(flax.serialization.msgpack_serialize(state))
    _assert_same(state, theirs)


def test_jax_arrays_are_stored_as_numpy():
    out = decode_state(encode_state({"w": jnp.arange(3.0)}))
    assert isinstance(out["w"], np.ndarray) and out["w"].tolist() == [0.0, 1.0, 2.0]


def test_large_arrays_are_chunked_like_flax(monkeypatch):
    monkeypatch.setattr(_msgpack, "CHUNK_BYTES", 64)
    arr = np.arange(100, dtype=np.float32).reshape(25, 4)
    data = encode_state({"big": arr})
    assert b"__msgpack_chunked_array__" in data
    _assert_same({"big": arr}, decode_state(data))
    monkeypatch.setattr(flax.serialization, "MAX_CHUNK_SIZE", 64)
    _assert_same({"big": arr}, flax.serialization.msgpack_restore(data))


def test_writing_streams_into_a_file():
    buf = io.BytesIO()
    _msgpack.write_tree(buf, _state())
    assert buf.getvalue() == encode_state(_state())


@pytest.mark.parametrize("bad, match", [
    ({"x": object()}, r"cannot store a builtins.object at 'x'"),
    ({1: 2}, r"dict key 1 at '' is a int: checkpoint state dicts need str keys"),
    ({"a": {"b": 2**70}}, r"integer at 'a/b' does not fit in 64 bits"),
    ({"s": np.array(["a"])}, r"cannot store an array of dtype <U1 at 's'"),
])
def test_unstorable_values_are_named_by_path(bad, match):
    with pytest.raises((TypeError, OverflowError), match=match):
        encode_state(bad)


def test_truncated_input_is_reported_as_truncated():
    data = encode_state(_state())
    with pytest.raises(CheckpointCorruptError, match=r"state\.msgpack: truncated msgpack data"):
        decode_state(data[:-10], source="state.msgpack")


def test_oversized_input_is_refused_before_parsing():
    data = encode_state(_state())
    with pytest.raises(CheckpointCorruptError, match=r"more than the limit of 10 bytes"):
        decode_state(data, max_bytes=10)


def test_non_map_top_level_is_refused():
    with pytest.raises(CheckpointCorruptError, match=r"expected a msgpack map at the top level"):
        decode_state(b"\x93\x01\x02\x03")


def test_array_whose_header_lies_about_its_size_is_refused():
    good = encode_state({"a": np.zeros(4, np.float32)})
    # shape [4] -> [5]: the header now claims 20 bytes while 16 follow.
    bad = good.replace(b"\x91\x04", b"\x91\x05", 1)
    with pytest.raises(CheckpointCorruptError, match=r"needs 20 bytes, the file holds 16"):
        decode_state(bad)


def test_unknown_dtype_and_extension_are_refused():
    header = msgpack.packb([[2], "object", bytes(16)])
    bad = msgpack.packb({"a": msgpack.ExtType(1, header)})
    with pytest.raises(CheckpointCorruptError, match=r"dtype 'object' is not one"):
        decode_state(bad)
    with pytest.raises(CheckpointCorruptError, match=r"unknown msgpack extension type 9"):
        decode_state(b"\x81\xa1a\xd4\x09\x00")


def test_deep_nesting_is_an_error_not_a_crash():
    with pytest.raises(CheckpointCorruptError, match=r"malformed msgpack data"):
        decode_state(b"\x81\xa1a" + b"\x91" * 100_000 + b"\xc0")
