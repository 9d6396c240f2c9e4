"""Sharded checkpoints: each process writes the shards it owns; any mesh loads them.

A state holding an array that is not fully replicated (FSDP, tensor parallel) is saved
without gathering it anywhere. Every process lists the distinct slices it holds
(``jaxfit._shards.local_shards``: replicas once over all processes) and streams them into its
own part file, ``shards-<process>-of-<count>.msgpack``, inside the checkpoint's temporary
directory (on a file system all processes see). The arrays are not in ``state.msgpack``:
its ``train_state`` is empty and the manifest (format version 2) records every leaf's
global shape, dtype and saved sharding, and every part file's size and sha256.

Loading verifies every part's size and sha256, decodes the records (the hostile-input-safe
reader of ``_msgpack``) and assembles each leaf for the loading trainer's own sharding
(``jaxfit._shards.assemble``): each device is filled from the overlapping slices only, on
any mesh and device count. Without a mesh each leaf is assembled on the host and placed on
one device, as a whole checkpoint is.

Several processes commit through JAX's coordination service (``jax.distributed``): a
key-value store and a barrier that work from any thread, unlike a device collective such as
``multihost_utils.sync_global_devices``, which the writer thread could issue in another
order than the training thread's collectives on the other processes (a deadlock). JAX's own
asynchronous checkpointer (``jax.experimental.array_serialization``) commits the same way.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxfit._shards import (
    ShardRecord,
    assemble,
    assemble_host,
    group_records,
    local_shards,
    records_from_payload,
    shard_payload,
)
from jaxfit.checkpoint import _io, _msgpack
from jaxfit.checkpoint._errors import CheckpointCorruptError, CheckpointError
from jaxfit.errors import ShapeError

PEER_TIMEOUT_S = 600  # how long a process waits for the others' parts of one checkpoint
_GROUPS = itertools.count()  # sharded writers of this process, created in the same order everywhere


def part_name(process: int, count: int) -> str:
    return f"shards-{process:05d}-of-{count:05d}.msgpack"


def _is_key(leaf: Any) -> bool:
    return hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _flat(tree: Any) -> list[tuple[str, Any]]:
    """``(path, leaf)`` of every array of ``tree``, named as ``local_shards`` names them."""
    from jaxfit.sharding import path_str, unbox

    return [(path_str(p), leaf) for p, leaf in jax.tree_util.tree_flatten_with_path(unbox(tree))[0]]


def is_sharded(tree: Any) -> bool:
    """Whether ``tree`` holds an array that is not fully replicated (its checkpoints are
    sharded; a replicated state is written whole by process 0, as on one device)."""
    return any(isinstance(leaf, jax.Array) and not leaf.is_fully_replicated
               for leaf in jax.tree_util.tree_leaves(tree))


def as_data(tree: Any) -> Any:
    """``tree`` with typed PRNG keys replaced by their key data (arrays msgpack can hold)."""
    return jax.tree_util.tree_map(lambda a: jax.random.key_data(a) if _is_key(a) else a, tree)


def _mesh_meta(sharding: Any) -> dict | None:
    mesh = getattr(sharding, "mesh", None)
    return None if mesh is None else {"axis_names": [str(a) for a in mesh.axis_names],
                                      "shape": [int(n) for n in mesh.devices.shape]}


def leaf_meta(tree: Any) -> tuple[dict | None, dict[str, dict[str, Any]]]:
    """The mesh of the state (axis names and sizes) and, per leaf path: global shape, dtype
    and the PartitionSpec it is saved under, trailing ``None`` entries dropped (``None`` off
    any mesh). A leaf on another mesh than the first leaf's also records its own ``mesh``."""
    leaves, first = {}, None
    for path, leaf in _flat(as_data(tree)):
        sharding = getattr(leaf, "sharding", None)
        spec = getattr(sharding, "spec", None)
        mesh = _mesh_meta(sharding)
        first = first or mesh
        entries = None if spec is None else [list(e) if isinstance(e, (tuple, list)) else e
                                             for e in spec]
        while entries and entries[-1] is None:  # P("fsdp", None) is P("fsdp"): one form
            entries.pop()
        leaves[path] = {
            "global_shape": [int(n) for n in np.shape(leaf)],
            "dtype": np.dtype(leaf.dtype).name,
            "spec": entries,
            **({"mesh": mesh} if mesh != first else {}),
        }
    return first, leaves


def snapshot(tree: Any, *, copy: bool = True) -> list[ShardRecord]:
    """This process's records of ``tree`` (see ``local_shards``), copied to host memory
    unless ``copy=False`` (for a device-side copy that nothing donates)."""
    return local_shards(as_data(tree), copy=copy)


def write_part(path: Path, records: Sequence[ShardRecord]) -> dict:
    """Streams ``records`` into the new file ``path`` and fsyncs it; returns its size and
    sha256 (as ``_io.write_file``)."""
    return _io.write_file(path, lambda f: _msgpack.write_tree(f, shard_payload(records)))


# --------------------------------------------------------------------------- reading


def check_manifest(manifest: dict, where: str) -> None:
    """Checks the ``sharded`` section of a format-2 manifest (not the files' contents).

    Raises:
      CheckpointCorruptError: the section is missing or malformed, or names a part file
        the manifest's ``files`` do not list.
    """
    section = manifest.get("sharded")
    if not (isinstance(section, dict) and isinstance(section.get("parts"), list)
            and section["parts"] and isinstance(section.get("leaves"), dict)
            and isinstance(section.get("process_count"), int)):
        raise CheckpointCorruptError(
            f"{where}: format version 2 needs a 'sharded' section with 'parts', 'leaves' and "
            "'process_count' (the manifest is damaged)")
    for name in section["parts"]:
        if not isinstance(name, str) or name not in manifest["files"]:
            raise CheckpointCorruptError(f"{where}: part {name!r} is not among the listed files")
    if len(section["parts"]) != section["process_count"]:
        raise CheckpointCorruptError(
            f"{where}: {len(section['parts'])} part files for {section['process_count']} processes")


@dataclasses.dataclass
class ShardedState:
    """The arrays of a sharded checkpoint as read: every part's records, not yet placed.

    A ``state_dict``'s ``train_state`` holds one in place of the nested dict of whole arrays
    (``read_checkpoint`` returns it as is; :meth:`to_host` builds the whole arrays, on the
    host, for inspection). Restoring places each leaf for the loading trainer's layout.

    Attributes:
      records: the records of every part file.
      leaves: the manifest's per-leaf global shape, dtype and saved sharding.
    """

    records: list[ShardRecord]
    leaves: dict[str, dict[str, Any]]

    def to_host(self) -> dict[str, np.ndarray]:
        """``{leaf path: whole host array}`` (gathers every leaf: for inspection only)."""
        paths = sorted({r.path for r in self.records})
        return {p: assemble_host(g) for p, g in zip(paths, group_records(self.records, paths))}

    def restore(self, template: Any, shardings: Any = None) -> Any:
        """The state of ``template``'s structure, each leaf assembled for its sharding in
        ``shardings`` (same structure), or as a whole host array when ``shardings`` is None.

        Raises:
          ShapeError: naming the leaf whose saved shape or dtype is not the template's, or
            the leaves the records miss and the records no leaf takes.
        """
        leaves, treedef = jax.tree_util.tree_flatten(template)
        flat = _flat(jax.eval_shape(as_data, template))
        targets = ([s for _, s in _flat(shardings)] if shardings is not None
                   else [None] * len(flat))
        groups = group_records(self.records, [p for p, _ in flat])
        out = []
        for (path, want), leaf, group, target in zip(flat, leaves, groups, targets):
            got = group[0]
            if tuple(got.global_shape) != tuple(want.shape):
                raise ShapeError(f"train_state.{path}: saved shape {tuple(got.global_shape)}, "
                                 f"expected {tuple(want.shape)}")
            if got.dtype != np.dtype(want.dtype).name:
                raise ShapeError(f"train_state.{path}: saved dtype {got.dtype}, expected "
                                 f"{np.dtype(want.dtype).name}")
            value: Any = assemble_host(group) if target is None else assemble(group, target)
            if _is_key(leaf):
                value = jax.random.wrap_key_data(jax.numpy.asarray(value),
                                                 impl=leaf.dtype._impl)
                if target is not None:
                    value = jax.device_put(value, target)
            out.append(value)
        return jax.tree_util.tree_unflatten(treedef, out)


def read_parts(ckpt_dir: Path, manifest: dict, max_bytes: int) -> ShardedState:
    """Reads, verifies (size and sha256) and decodes every part file of a sharded checkpoint.

    Raises:
      CheckpointCorruptError: naming the part that is missing, of the wrong size, fails its
        sha256 or holds malformed records.
    """
    from jaxfit.checkpoint._read import decode_file

    section = manifest["sharded"]
    records: list[ShardRecord] = []
    for name in section["parts"]:
        path = ckpt_dir / name
        tree = decode_file(path, manifest["files"][name], max_bytes)
        try:
            part = records_from_payload(tree, str(path))
        except ShapeError as err:
            raise CheckpointCorruptError(str(err)) from None
        for r in part:
            meta = section["leaves"].get(r.path)
            if not isinstance(meta, dict) or meta.get("global_shape") != list(r.global_shape) \
                    or meta.get("dtype") != r.dtype:
                raise CheckpointCorruptError(
                    f"{path}: record of {r.path!r} ({r.global_shape} {r.dtype}) is not the "
                    f"manifest's leaf {meta!r}")
        records += part
    return ShardedState(records, section["leaves"])


# --------------------------------------------------------------------------- processes


class Peers:
    """The processes of one sharded ``RunWriter``, talking through JAX's coordination
    service (key-value store and barriers; thread-safe, not device collectives).

    Every process creates its writers in the same order (the same callbacks, fit after
    fit), so the group number and each save's number name the same checkpoint everywhere.
    """

    def __init__(self) -> None:
        from jax._src import distributed  # the client JAX's own async checkpointer uses

        client = distributed.global_state.client
        if client is None:
            raise CheckpointError(
                "a sharded checkpoint of several processes needs jax.distributed: call "
                "jax.distributed.initialize(...) in every process before any other jax call")
        self._client = client
        self.index, self.count = jax.process_index(), jax.process_count()
        # (Not the run id: a new run's id is drawn by each process on its own.)
        self._base = f"jaxfit/ckpt/{next(_GROUPS)}"

    def _key(self, save: int, what: str) -> str:
        return f"{self._base}/{save}/{what}"

    def publish(self, save: int, what: str, value: dict) -> None:
        self._client.key_value_set(self._key(save, what), json.dumps(value))

    def read(self, save: int, what: str) -> dict:
        try:
            value = self._client.blocking_key_value_get(self._key(save, what),
                                                        PEER_TIMEOUT_S * 1000)
        except Exception as err:  # a timeout or a lost coordination service
            raise CheckpointError(f"no word from the other processes about {what!r} within "
                                  f"{PEER_TIMEOUT_S} s ({err})") from err
        return json.loads(value)

    def barrier(self, save: int) -> None:
        try:
            self._client.wait_at_barrier(self._key(save, "written"), PEER_TIMEOUT_S * 1000)
        except Exception as err:
            raise CheckpointError(
                f"not every process wrote its part of the checkpoint within {PEER_TIMEOUT_S} s "
                f"({err}); the previous checkpoint stays the newest") from err
