"""Fuzzing the safe msgpack reader: hostile bytes give CheckpointCorruptError, never a crash;
and the restore: a mutated state gives CheckpointStructureError, never another error."""

import copy

import numpy as np
import pytest
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


# --------------------------------------------------------------------------- restore path
# A state that decodes but has the wrong structure, restored into a trainer: the only
# error allowed is a CheckpointStructureError naming the state file.

_ODD_VALUES = st.sampled_from([
    None, True, -1, 0, 2**40, 1.5, "x", b"\x00", [], {}, [1, [2]], {"a": {"b": 1}},
    np.zeros((2, 2), np.float32), np.zeros(0, np.int32), np.array(1.5), np.zeros(3, np.int8),
    {"shape": [2**40], "dtype": "float32"}, {"dict": {"x": {"shape": [1, 4], "dtype": "?"}}},
]).map(copy.deepcopy)  # a fresh object each draw: a shared one could be made a cycle


@pytest.fixture(scope="module")
def trained_state():
    from conftest import MLP, make_trainer

    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    trainer = make_trainer()
    trainer.fit(MLP(), (x, y), epochs=1, batch_size=16)
    return encode_state(trainer.state_dict()), (x, y)


def _mutate(state: dict, data) -> None:
    """Walks down to a random container of ``state`` and deletes, replaces or adds an entry."""
    node = state
    while True:
        keys = list(node.keys()) if isinstance(node, dict) else list(range(len(node)))
        children = [k for k in keys if isinstance(node[k], (dict, list)) and node[k]]
        if not children or data.draw(st.booleans()):
            break
        node = node[data.draw(st.sampled_from(children))]
    keys = list(node.keys()) if isinstance(node, dict) else list(range(len(node)))
    op = data.draw(st.sampled_from(["delete", "replace", "add"] if keys else ["add"]))
    if op == "add":
        if isinstance(node, dict):
            node[data.draw(st.text(max_size=4))] = data.draw(_ODD_VALUES)
        else:
            node.append(data.draw(_ODD_VALUES))
        return
    key = data.draw(st.sampled_from(keys))
    if op == "delete":
        del node[key]
    else:
        node[key] = data.draw(_ODD_VALUES)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.data())
def test_restoring_a_mutated_state_raises_only_structure_errors(trained_state, tmp_path_factory,
                                                                data):
    from conftest import MLP, make_trainer

    from jaxfit.checkpoint import CheckpointStructureError, restore, write_checkpoint

    encoded, (x, y) = trained_state
    state = decode_state(encoded)
    for _ in range(data.draw(st.integers(1, 3))):
        _mutate(state, data)
    run = tmp_path_factory.mktemp("fuzz")
    ckpt = write_checkpoint(run, state, seq=1, step=2, epoch=1, batch_in_epoch=0,
                            reason="epoch", metrics={})
    try:
        restore(make_trainer(), ckpt, model=MLP(), data=(x, y), epochs=2, batch_size=16,
                max_bytes=1 << 20)
    except CheckpointStructureError as err:
        assert str(ckpt / "state.msgpack") in str(err)


# --------------------------------------------------------------------------- manifests
_JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
              st.text(max_size=6)),
    lambda children: st.one_of(st.lists(children, max_size=3),
                               st.dictionaries(st.text(max_size=4), children, max_size=3)),
    max_leaves=6)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.data())
def test_mutated_manifests_are_refused_by_name_by_every_reader(tmp_path_factory, capsys, data):
    import json

    from jaxfit.__main__ import main
    from jaxfit.checkpoint import read_checkpoint, write_checkpoint

    run = tmp_path_factory.mktemp("manifest")
    ckpt = write_checkpoint(run, {"w": np.zeros(3, np.float32)}, seq=1, step=2, epoch=1,
                            batch_in_epoch=0, reason="epoch", metrics={"val_loss": 0.5},
                            monitor="val_loss", mode="min", recipe={"file": "recipe-0.pkl",
                                                                    "sha256": "0" * 64})
    manifest = json.loads((ckpt / "manifest.json").read_text())
    for _ in range(data.draw(st.integers(1, 3))):
        node = manifest
        while isinstance(node.get(key := data.draw(st.sampled_from(sorted(node)))), dict) \
                and node[key] and data.draw(st.booleans()):
            node = node[key]
        node[key] = data.draw(_JSON_VALUES)
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    try:
        read_checkpoint(ckpt)
    except CheckpointCorruptError as err:
        assert "manifest.json" in str(err) or "state.msgpack" in str(err)
    assert main(["info", str(run)]) in (0, 1)
    capsys.readouterr()
