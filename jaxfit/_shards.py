"""Sharded checkpoint pieces as pure functions: this process's shards out, a global array in.

A process lists the shards it owns (``local_shards``: one record per distinct slice, replicas
written once over all processes), packs them into a msgpack blob (``pack_shards``), and any
later run, on any mesh and process count, assembles each leaf for its own target sharding from
the records of all files (``assemble_tree``): each device is filled from the overlapping
records only, so no device or process builds a full copy of a sharded leaf.

Example:
    >>> import jax, numpy as np
    >>> from jax.sharding import NamedSharding, PartitionSpec
    >>> s = NamedSharding(jax.make_mesh((1,), ("data",)), PartitionSpec("data"))
    >>> tree = {"w": jax.device_put(np.arange(4.0), s)}
    >>> records = unpack_shards(pack_shards(local_shards(tree)))
    >>> np.asarray(assemble_tree(records, {"w": s})["w"]).tolist()
    [0.0, 1.0, 2.0, 3.0]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from flax import serialization

from .errors import ShapeError

Index = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class ShardRecord:
    """One slice of one leaf of a sharded pytree.

    Attributes:
        path: the leaf's path, ``"opt_state/0/mu/Dense_0/kernel"`` (``sharding.path_str``).
        index: ``(start, stop)`` per dim of the slice within the global array.
        global_shape: the whole array's shape.
        dtype: numpy dtype name, e.g. ``"float32"``.
        spec: the PartitionSpec it was saved under, as a tuple of str / tuple / None
            (informational: loading may use any other sharding).
        data: the slice, a host numpy array of shape ``stop - start`` per dim.
    """

    path: str
    index: Index
    global_shape: tuple[int, ...]
    dtype: str
    spec: tuple[Any, ...]
    data: np.ndarray

    def meta(self) -> dict[str, Any]:
        """Everything but the data, as JSON-able values (for a manifest)."""
        return {"path": self.path, "index": [list(i) for i in self.index],
                "global_shape": list(self.global_shape), "dtype": self.dtype,
                "spec": [list(e) if isinstance(e, tuple) else e for e in self.spec]}


def _index(idx: tuple[slice, ...], shape: tuple[int, ...]) -> Index:
    return tuple((s.indices(n)[0], s.indices(n)[1]) for s, n in zip(idx, shape))


def local_shards(tree: Any, *, copy: bool = True) -> list[ShardRecord]:
    """This process's shards of every array in ``tree``, each distinct slice once.

    Only shards with ``replica_id == 0`` are listed, so over all processes every slice of a
    leaf appears exactly once (a replicated leaf: once, on the process of its first device).
    The data is copied to host memory (on CPU a plain view would alias the device buffer,
    which the next donated step overwrites); ``copy=False`` keeps such views, for a tree
    that no step donates (a device-side copy made for a checkpoint).
    """
    from .sharding import path_str, unbox

    records = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(unbox(tree))[0]:
        if not isinstance(leaf, jax.Array):
            leaf = jax.numpy.asarray(leaf)
        spec = tuple(getattr(leaf.sharding, "spec", ()))
        spec = tuple(tuple(e) if isinstance(e, (list, tuple)) else e for e in spec)
        for shard in leaf.addressable_shards:
            if shard.replica_id != 0:
                continue
            records.append(ShardRecord(
                path_str(path), _index(shard.index, leaf.shape), tuple(leaf.shape),
                np.dtype(leaf.dtype).name, spec,
                np.array(shard.data, copy=True) if copy else np.asarray(shard.data)))
    return records


def shard_payload(records: Sequence[ShardRecord]) -> dict[str, Any]:
    """The msgpack-ready tree of ``records``: ``{"shards": [meta + data, ...]}`` (what a
    shard file holds)."""
    return {"shards": [{**r.meta(), "data": r.data} for r in records]}


def pack_shards(records: Sequence[ShardRecord]) -> bytes:
    """msgpack bytes of ``records`` (one process's shard file)."""
    return serialization.msgpack_serialize(shard_payload(records))


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
            isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 0 for n in value):
        raise ShapeError(f"{what} is {value!r}, expected a list of non-negative ints")
    return tuple(int(n) for n in value)


def records_from_payload(tree: Any, source: str = "shard file") -> list[ShardRecord]:
    """The records of a decoded shard file (``shard_payload``'s form), each field checked.

    Raises ShapeError naming ``source`` and the record that is malformed: a wrong type, an
    index outside the global shape, or data whose shape or dtype is not the index's.
    """
    shards = tree.get("shards") if isinstance(tree, dict) else None
    if not isinstance(shards, list):
        raise ShapeError(f"{source}: expected a map with a 'shards' list")
    out = []
    for i, d in enumerate(shards):
        at = f"{source}: shard record {i}"
        if not isinstance(d, dict) or not isinstance(d.get("path"), str) \
                or not isinstance(d.get("dtype"), str) or not isinstance(d.get("spec"), list) \
                or not isinstance(d.get("index"), list) \
                or not isinstance(d.get("data"), (np.ndarray, np.generic)):
            raise ShapeError(f"{at} lacks a path, index, dtype, spec or data of the right type")
        shape = _ints(d.get("global_shape"), f"{at}: global_shape")
        pairs = [_ints(pair, f"{at}: index") for pair in d["index"]]
        if len(pairs) != len(shape) or any(len(p) != 2 or not p[0] <= p[1] <= n
                                           for p, n in zip(pairs, shape)):
            raise ShapeError(f"{at} ({d['path']!r}): index {d['index']} does not fit the global "
                             f"shape {shape}")
        index: Index = tuple((p[0], p[1]) for p in pairs)
        data = np.asarray(d["data"])
        if data.shape != tuple(b - a for a, b in index) or np.dtype(data.dtype).name != d["dtype"]:
            raise ShapeError(f"{at} ({d['path']!r}): data of shape {data.shape} {data.dtype}, "
                             f"the index and dtype say {tuple(b - a for a, b in index)} {d['dtype']}")
        out.append(ShardRecord(d["path"], index, shape, d["dtype"],
                               tuple(tuple(e) if isinstance(e, list) else e for e in d["spec"]),
                               data))
    return out


def unpack_shards(blob: bytes) -> list[ShardRecord]:
    """The records of one ``pack_shards`` blob."""
    return records_from_payload(serialization.msgpack_restore(blob), "pack_shards blob")


def _check_agree(records: Sequence[ShardRecord]) -> list[ShardRecord]:
    """``records`` of one leaf without duplicate slices, after checking they agree."""
    if not records:
        raise ShapeError("no shard records to assemble")
    first = records[0]
    for r in records:
        if (r.global_shape, r.dtype, r.path) != (first.global_shape, first.dtype, first.path):
            raise ShapeError(f"shard records disagree: {r.path!r} {r.global_shape} {r.dtype} vs "
                             f"{first.path!r} {first.global_shape} {first.dtype}")
    # Replicas saved twice (e.g. files of two save layouts) would count twice below.
    return list({r.index: r for r in records}.values())


def _fill(unique: Sequence[ShardRecord], want: Index) -> np.ndarray:
    """The slice ``want`` of a leaf, cut from the records overlapping it."""
    first = unique[0]
    out = np.empty([b - a for a, b in want], np.dtype(first.data.dtype))
    covered = 0
    for r in unique:
        lo = [max(a, c) for (a, _), (c, _) in zip(want, r.index)]
        hi = [min(b, d) for (_, b), (_, d) in zip(want, r.index)]
        if any(h <= low for low, h in zip(lo, hi)):
            continue
        dst = tuple(slice(low - a, h - a) for low, h, (a, _) in zip(lo, hi, want))
        src = tuple(slice(low - c, h - c) for low, h, (c, _) in zip(lo, hi, r.index))
        out[dst] = r.data[src]
        covered += math.prod(h - low for low, h in zip(lo, hi))
    if covered != out.size:
        raise ShapeError(f"leaf {first.path!r} of shape {first.global_shape}: the shard records "
                         f"cover {covered} of the {out.size} elements of slice {want}; a shard "
                         f"file is missing or the records overlap")
    return out


def assemble(records: Sequence[ShardRecord], sharding: jax.sharding.Sharding) -> jax.Array:
    """The global array that ``records`` (all slices of one leaf) describe, on ``sharding``.

    Each addressable device's slice is cut from the records overlapping it, so the target
    mesh and process count may differ from the ones that saved. Raises ShapeError when the
    records disagree on the shape or dtype, or leave part of a device's slice uncovered.
    """
    unique = _check_agree(records)
    shape = unique[0].global_shape
    def fill(idx: Any) -> np.ndarray:  # a tuple of slices, one per dim
        return _fill(unique, _index(idx, shape))

    return jax.make_array_from_callback(shape, sharding, fill)


def assemble_host(records: Sequence[ShardRecord]) -> np.ndarray:
    """The whole leaf that ``records`` describe, as one host array (for a one-device target)."""
    unique = _check_agree(records)
    return _fill(unique, tuple((0, n) for n in unique[0].global_shape))


def group_records(records: Sequence[ShardRecord], paths: Sequence[str]) -> list[list[ShardRecord]]:
    """The records of each leaf path in ``paths``, in order. Raises ShapeError naming the
    leaves the records miss and the records no leaf takes."""
    by_path: dict[str, list[ShardRecord]] = {}
    for r in records:
        by_path.setdefault(r.path, []).append(r)
    missing = [p for p in paths if p not in by_path]
    extra = sorted(set(by_path) - set(paths))
    if missing or extra:
        raise ShapeError(f"shard records do not match the target state: missing {missing}, "
                         f"unexpected {extra}; load with the state layout they were saved from")
    return [by_path[p] for p in paths]


def assemble_tree(records: Sequence[ShardRecord], shardings: Any) -> Any:
    """Assemble every leaf of ``shardings`` (a NamedSharding tree) from the records of all
    shard files; the result has the structure of ``shardings``. Raises ShapeError naming
    the leaves the records miss and the records no leaf takes."""
    from .sharding import path_str

    flat, treedef = jax.tree_util.tree_flatten_with_path(shardings)
    groups = group_records(records, [path_str(p) for p, _ in flat])
    return jax.tree_util.tree_unflatten(
        treedef, [assemble(g, s) for g, (_, s) in zip(groups, flat)])
