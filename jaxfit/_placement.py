"""Where the engine's state lives on a mesh: the glue between ``Trainer(mesh=...)`` and
``jaxfit.sharding.ShardingPlan``.

The engine's state is built *abstractly* first (``jax.eval_shape`` of the step's ``init``),
with flax's partitioning boxes (``nn.Partitioned``, ``nn.LogicallyPartitioned``) still in it
and nnx Variables carrying their ``out_sharding`` metadata. The plan turns that abstract state
into one ``NamedSharding`` per array; the concrete state is then computed by a jitted init
whose ``out_shardings`` are those shardings, so no device ever holds a whole sharded param.
The step itself always sees unboxed arrays (``unbox_linen``).
"""

from __future__ import annotations

import re
from typing import Any

import jax
import numpy as np
from flax import nnx
from flax.core import meta
from jax.sharding import NamedSharding

from jaxfit.errors import ConfigError


def _is_linen_box(x: Any) -> bool:
    return isinstance(x, meta.AxisMetadata)


def unbox_linen(tree: Any) -> Any:
    """``tree`` with every linen metadata box (``nn.Partitioned``, ...) replaced by its value.

    nnx Variables are kept: an nnx state must stay a state of Variables to be merged back
    into its module. The layout a box asked for is read by the plan before unboxing.
    """
    if not any(_is_linen_box(x) for x in jax.tree_util.tree_leaves(tree, is_leaf=_is_linen_box)):
        return tree
    from jaxfit.sharding import unbox

    return jax.tree_util.tree_map(lambda x: unbox(x) if _is_linen_box(x) else x, tree,
                                  is_leaf=_is_linen_box)


def expand(shardings: Any, tree: Any) -> Any:
    """The sharding tree ``shardings`` (a prefix of ``tree``, one entry per box) broadcast to
    every array leaf of ``tree``: a full tree for ``jax.jit`` and ``tree_map``."""
    return jax.tree_util.tree_map(lambda s, x: jax.tree_util.tree_map(lambda _: s, x), shardings, tree)


def state_shardings(plan: Any, boxed: Any, unboxed: Any, params: Any) -> Any:
    """One NamedSharding per array leaf of ``unboxed`` (the engine's abstract state).

    ``boxed`` is the same state with the linen boxes still in it (what the plan reads the
    annotations from) and ``params`` its params (what every other leaf is matched to by path
    suffix and shape: optimizer state, EMA copies).
    """
    _check_rules_match(plan, params)
    return expand(plan.shardings(boxed, params), unboxed)


def _check_rules_match(plan: Any, params: Any) -> None:
    """A ``param_rules`` regex that matches no param is a typo that would silently leave
    the params it meant replicated: refuse it, listing the paths it could match."""
    from jaxfit.sharding import path_str

    def is_box(x: Any) -> bool:
        return _is_linen_box(x) or isinstance(x, nnx.Variable)

    paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_box)[0]]
    for pattern, _ in plan.param_rules:
        rx = re.compile(pattern)
        if not any(rx.search(p) for p in paths):
            shown = ", ".join(paths[:12]) + (", ..." if len(paths) > 12 else "")
            raise ConfigError(f"param_rules regex {pattern!r} matches no param; the params' "
                              f"paths are: {shown}")


def unalias(tree: Any) -> Any:
    """``tree`` with every array that shares its buffers with an earlier leaf copied.

    A step's init may put one array in two places (``{"params": p, "ema": p}``), and a
    jitted init may return one buffer for two equal outputs; the train step donates the
    whole state, and XLA refuses to donate a buffer twice.
    """
    seen: set[Any] = set()

    def fresh(a: Any) -> Any:
        if not isinstance(a, jax.Array):
            return a
        try:
            key = tuple(s.data.unsafe_buffer_pointer() for s in a.addressable_shards)
        except Exception:  # noqa: BLE001 - typed PRNG keys and other exotic arrays
            key = ("id", id(a))
        if key in seen:
            return jax.device_put(a, a.sharding, may_alias=False)
        seen.add(key)
        return a

    return jax.tree_util.tree_map(fresh, tree)


def place_host(tree: Any, shardings: Any) -> Any:
    """Host arrays of global shape onto their shardings, each device receiving its slice only
    (``jax.make_array_from_callback``). Typed PRNG keys (replicated scalars) are put whole."""

    def place(a: Any, s: NamedSharding) -> jax.Array:
        if isinstance(a, jax.Array) and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            return jax.device_put(a, s)
        a = np.asarray(a)
        return jax.make_array_from_callback(a.shape, s, lambda idx: a[idx])

    return jax.tree_util.tree_map(place, tree, shardings)


def local_snapshot(tree: Any) -> Any:
    """``tree`` with every array sharded across processes replaced by a host copy built from
    this process's own shards, which must cover it (FSDP within each host, replicated across
    hosts); jax cannot fetch such an array with ``device_get``. Other leaves are unchanged.

    Raises ConfigError naming the leaf when this process does not hold all of it (only a
    gather across processes could build it; ModelCheckpoint writes such a state as a sharded
    checkpoint instead, each process its own slices).
    """
    from jaxfit.sharding import path_str

    def fetch(path: Any, leaf: Any) -> Any:
        if not isinstance(leaf, jax.Array) or leaf.is_fully_addressable or leaf.is_fully_replicated:
            return leaf
        out = np.empty(leaf.shape, leaf.dtype)
        covered = np.zeros(leaf.shape, bool)
        for shard in leaf.addressable_shards:
            out[shard.index] = np.asarray(shard.data)
            covered[shard.index] = True
        if not covered.all():
            sharding: Any = leaf.sharding  # a NamedSharding: the Trainer places every leaf so
            raise ConfigError(
                f"state leaf {path_str(path)!r} ({sharding.spec} on mesh "
                f"{dict(sharding.mesh.shape)}) is split across processes: this process "
                f"holds {int(covered.sum())} of its {covered.size} elements, and state_dict() "
                "returns whole host arrays. Checkpoint it with ModelCheckpoint (a sharded "
                "checkpoint: each process writes its own slices), or fetch it with "
                "jax.experimental.multihost_utils.process_allgather on every process")
        return out

    return jax.tree_util.tree_map_with_path(fetch, tree)
