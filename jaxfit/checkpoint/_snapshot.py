"""The device-side snapshot a checkpoint save takes of the engine state, and its host bytes.

A save must not hold the training thread, yet the next step donates the state's buffers. So
the save dispatches one program that copies the state on the devices, and a background
thread fetches the copy, tests the train state for NaN/inf and writes it.

On one process with an unsharded state, the program returns the checkpoint's
``train_state`` already encoded: one ``uint8`` buffer holding the msgpack encoding of the
state's nested dict, the bytes between the arrays (dict headers, keys, array headers) being
constants of the program, made once per state layout. Fetching is then one transfer and
writing one buffer: no Python work per leaf on the writer thread, which shares the
interpreter lock with training. The bytes are exactly those of
``write_tree(train_state_dict(state))``. Other states (several processes, a sharded state,
a dtype the buffer cannot carry) keep a copy per leaf.

Either program also returns whether the train state's float arrays are all finite, computed
on the devices (every process takes the same decision, and the writer thread does no
per-leaf test under the interpreter lock).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxfit import _state, _tree
from jaxfit.checkpoint import _msgpack, _sharded

if TYPE_CHECKING:  # pragma: no cover
    from jaxfit.trainer import Trainer

# dtypes whose arrays the flat buffer carries as their bytes (a bitcast, or bool as uint8).
_FLAT_DTYPES = frozenset(["bool", "int8", "int16", "int32", "int64", "uint8", "uint16",
                          "uint32", "uint64", "float16", "bfloat16", "float32", "float64"])


def _all_finite(leaves: list, *, per_leaf: bool = False) -> jax.Array:
    """Whether every element of the float ``leaves`` is finite, as one replicated flag.

    One reduction per dtype over the leaves' concatenation (a reduction per leaf makes the
    program slow to compile for a state of many leaves); ``per_leaf`` for sharded leaves,
    which a concatenation would gather.
    """
    floats = [x for x in leaves if jnp.issubdtype(x.dtype, jnp.inexact) and x.size]
    if per_leaf:
        flags = [jnp.all(jnp.isfinite(x)) for x in floats]
    else:
        by_dtype: dict[Any, list] = {}
        for x in floats:
            by_dtype.setdefault(x.dtype, []).append(jnp.ravel(x))
        flags = [jnp.all(jnp.isfinite(jnp.concatenate(xs))) for xs in by_dtype.values()]
    return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)


def _copy_leaves(es: Any) -> tuple[Any, jax.Array]:
    copy = jax.tree_util.tree_map(jnp.copy, es)  # each copy keeps its input's sharding
    return copy, _all_finite(jax.tree_util.tree_leaves(es.state), per_leaf=True)


def _as_bytes(x: jax.Array) -> jax.Array:
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint8).reshape(-1)  # numpy's bools are the bytes 0 and 1
    return jax.lax.bitcast_convert_type(x, jnp.uint8).reshape(-1)


# The copy per leaf, compiled once per state layout. The flag is a 0-d array, replicated
# over any mesh.
_copy_program = jax.jit(_copy_leaves)


class _Plan:
    """The encoding of one state layout's ``train_state``, made on the devices.

    Its program returns one ``uint8`` buffer, the msgpack encoding of the state's nested
    dict (the bytes between the arrays are constants of the program, the arrays' bytes are
    copied in between), and the finiteness flag of the train state's float arrays.
    """

    def __init__(self, es: Any) -> None:
        flat = jax.tree_util.tree_flatten_with_path(es)[0]
        headers = []
        for _, leaf in flat:
            arr = jax.random.key_data(leaf) if _tree._is_typed_key(leaf) else leaf
            nbytes = int(np.prod(arr.shape, dtype=np.int64)) * arr.dtype.itemsize
            headers.append(_msgpack.array_header(tuple(arr.shape), arr.dtype.name, nbytes))
        parts = _msgpack.encode_skeleton(_tree.nest(flat, range(len(flat))), headers)
        consts = [np.frombuffer(p, np.uint8) if isinstance(p, bytes) else p for p in parts]

        def pack(es: Any) -> tuple[jax.Array, jax.Array]:
            leaves = jax.tree_util.tree_leaves(es)
            buf = jnp.concatenate([_as_bytes(leaves[p]) if isinstance(p, int)
                                   else jnp.asarray(p) for p in consts])
            return buf, _all_finite(jax.tree_util.tree_leaves(es.state))

        self.program = jax.jit(pack)


def _flat_ok(leaves: list) -> bool:
    devices = None
    for leaf in leaves:
        if not isinstance(leaf, jax.Array) or not leaf.is_fully_replicated:
            return False
        if devices is None:
            devices = leaf.sharding.device_set
        elif leaf.sharding.device_set != devices:
            return False  # one program cannot read them all
        dtype = leaf.dtype
        if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            continue  # its key data is uint32
        if dtype.name not in _FLAT_DTYPES or leaf.nbytes > _msgpack.CHUNK_BYTES:
            return False  # (an array over 1 GiB is written in flax's chunked form)
    return True


class Snapshot:
    """A device-side copy of an engine state, dispatched at construction (not waited for).

    Args:
      es: the engine state to copy (the next donated step may reuse its buffers at once).
      sharded: the copy is written as a sharded checkpoint (each process its own slices):
        a copy per leaf, never packed.
    """

    _plans: dict[tuple, _Plan | None] = {}

    def __init__(self, es: Any, *, sharded: bool = False) -> None:
        leaves, treedef = jax.tree_util.tree_flatten(es)
        key = (treedef, tuple((getattr(leaf, "shape", None), getattr(leaf, "dtype", None))
                              for leaf in leaves)) \
            if not sharded and jax.process_count() == 1 else None
        plan = None
        if key is not None:
            if key not in self._plans:
                if len(self._plans) >= 16:  # a run has one or two layouts: bound the cache
                    self._plans.clear()
                self._plans[key] = _Plan(es) if _flat_ok(leaves) else None
            plan = self._plans[key]
        self._plan = plan
        self._flat: jax.Array | None = None
        if plan is not None:
            self._flat, self._flag = plan.program(es)
            self._copy = None
        else:
            self._copy, self._flag = _copy_program(es)
        self._buf: np.ndarray | None = None

    @property
    def packed(self) -> bool:
        """Whether the arrays travel as one flat buffer (else a copy per leaf)."""
        return self._plan is not None

    def _fetched(self) -> np.ndarray:
        if self._buf is None:
            assert self._flat is not None
            self._buf = np.asarray(self._flat)  # waits for the program; no copy on CPU
        return self._buf

    def finite(self) -> bool:
        """Whether every float array of the train state is finite (waits for the copy)."""
        # A replicated scalar: every process takes the same decision.
        return bool(np.asarray(self._flag.addressable_data(0)))

    def train_state(self) -> Any:
        """The ``train_state`` entry of the checkpoint's state: pre-encoded bytes, or the
        copy's nested dict of host arrays (views of the copy: nothing donates it)."""
        if self._plan is not None:
            return _msgpack.Encoded([self._fetched().data])  # one buffer: written as is
        return _state.train_state_dict(self._copy)

    def records(self) -> dict:
        """The writer's entries for a sharded checkpoint: this process's records and the
        leaves' metadata."""
        assert self._copy is not None, "a packed snapshot is not sharded"
        return {"records": _sharded.snapshot(self._copy, copy=False),
                "leaves": _sharded.leaf_meta(self._copy)}


def fetcher(snap: Snapshot, state: dict, sharded: bool) -> Callable[[], dict | None]:
    """What the writer thread calls for the arrays of a save whose small rest is ``state``:
    None when the snapshot holds NaN/inf (nothing is written)."""

    def fetch() -> dict | None:
        if not snap.finite():
            return None
        if sharded:
            return snap.records()
        return {"state": {**state, "train_state": snap.train_state()}}

    return fetch


def owned_copy(tree: Any) -> Any:
    """A copy whose arrays own their memory (of the small host part of a save: history,
    callback states, RNG seed data).

    On CPU ``jax.device_get`` returns numpy views of the device buffers; while such a view is
    alive the next donating step cannot reuse the buffer and silently copies it. Copying
    here (and dropping the views) keeps donation working while the background thread
    writes. (The arrays of the train state are copied on the devices instead.)
    """
    if isinstance(tree, dict):
        if _msgpack.only_plain(tree.values()):  # (a validation record): copied in C
            return dict(tree)
        return {k: owned_copy(v) for k, v in tree.items()}
    if isinstance(tree, list):
        # A history's lists grow by an entry an epoch: copied in C, not walked in Python
        # (a checkpoint every epoch would otherwise cost more at each epoch than the last).
        if _msgpack.only_plain(tree):
            return list(tree)
        return [owned_copy(v) for v in tree]
    if isinstance(tree, np.ndarray) and tree.base is not None:
        return tree.copy()
    return tree


@dataclasses.dataclass(frozen=True)
class Capture:
    """A checkpoint of the trainer's current point, taken without waiting for its arrays.

    Attributes:
      state: the small host part of the state (step, epoch, data position, history,
        callback states, RNG seed), copies that own their memory; ``train_state`` is empty.
      fetch: for ``RunWriter.save(state, fetch=...)``, called on the writer thread: waits
        for the device-side copy of the arrays and returns the job's missing entries, or
        None when the train state holds NaN/inf (nothing is then written).
      device_wait: seconds spent waiting for the steps already dispatched to finish (the
        state must be computed before it is copied): training time, not saving time.
      seconds: seconds spent dispatching the copy and copying the small host part.
    """

    state: dict
    fetch: Callable[[], dict | None]
    device_wait: float
    seconds: float

    @property
    def position(self) -> dict[str, Any]:
        """The manifest fields that place the checkpoint in its run, for ``RunWriter.save``:
        ``step``, ``epoch``, ``batch_in_epoch``, ``run_id``."""
        s = self.state
        return {"step": int(s["step"]), "epoch": int(s["epoch"]),
                "batch_in_epoch": int(s["batch_in_epoch"]), "run_id": s.get("run_id")}


def capture(trainer: Trainer, *, sharded: bool) -> Capture:
    """Takes a checkpoint of ``trainer`` at its current point: waits for the steps under
    way, dispatches one program that copies the engine state on the devices (the next step
    donates the live buffers) and copies the small host part. ``sharded``: the copy is for a
    sharded checkpoint (each process its own slices, see :func:`writes_shards`)."""
    start = time.perf_counter()
    es = trainer.engine_state
    jax.block_until_ready(es)
    dispatched = time.perf_counter()
    snap = Snapshot(es, sharded=sharded)
    state = owned_copy(_state.meta_dict(trainer))
    return Capture(state, fetcher(snap, state, sharded), dispatched - start,
                   time.perf_counter() - dispatched)


def writes_shards(trainer: Trainer) -> bool:
    """Whether ``trainer``'s checkpoints are sharded: its state holds an array that is not
    fully replicated (each process writes its own slices, nothing is gathered). A replicated
    state is written whole by process 0."""
    return _sharded.is_sharded(trainer.engine_state)
