"""Fuzzing the safe msgpack reader: hostile bytes give CheckpointCorruptError, never a crash."""

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxfit.checkpoint import CheckpointCorruptError, decode_state, encode_state

SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

_dtypes = st.sampled_from(["float32", "int32", "uint8", "bool", "float64", "int64"])
_arrays = st.builds(
    lambda dtype, shape, seed: np.random.default_rng(seed).integers(0, 100, shape).astype(dtype),
    _dtypes, st.lists(st.integers(0, 4), max_size=3).map(tuple), st.integers(0, 2**16))
_leaves = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
                    st.floats(allow_nan=False), st.text(max_size=8), st.binary(max_size=8),
                    _arrays)
_trees = st.recursive(
    _leaves,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.text(max_size=6), children, max_size=4)),
    max_leaves=20)
_states = st.dictionaries(st.text(max_size=6), _trees, max_size=5)


def _decode_or_corrupt(data: bytes) -> None:
    try:
        out = decode_state(data, max_bytes=1 << 20)
    except CheckpointCorruptError as err:
        assert str(err)  # every refusal says something
    else:
        assert isinstance(out, dict)


@SETTINGS
@given(st.binary(max_size=512))
def test_arbitrary_bytes_never_raise_anything_but_corrupt(data):
    _decode_or_corrupt(data)


@SETTINGS
@given(_states, st.data())
def test_truncated_valid_states_are_always_refused(state, data):
    encoded = encode_state(state)
    cut = data.draw(st.integers(0, len(encoded) - 1))
    try:
        decode_state(encoded[:cut])
    except CheckpointCorruptError:
        return
    raise AssertionError(f"a state truncated to {cut} of {len(encoded)} bytes was accepted")


@SETTINGS
@given(_states, st.data())
def test_mutated_valid_states_never_crash(state, data):
    encoded = bytearray(encode_state(state))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(encoded) - 1))
        encoded[pos] = data.draw(st.integers(0, 255))
    _decode_or_corrupt(bytes(encoded))


@SETTINGS
@given(_states)
def test_valid_states_round_trip(state):
    again = decode_state(encode_state(state))
    assert encode_state(again) == encode_state(state)
