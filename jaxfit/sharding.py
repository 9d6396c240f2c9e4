"""Sharding plans: FSDP and tensor parallelism from flax's own partitioning metadata.

A :class:`ShardingPlan` turns a mesh, flax ``logical_axis_rules`` and optional path-regex rules
into a ``NamedSharding`` for every leaf of a training state: params as annotated
(``nn.with_partitioning``, ``nn.with_logical_partitioning``, nnx ``out_sharding`` metadata),
unannotated params by the regex rules or replicated, and every other leaf (optimizer state, EMA
params) like the param whose path it ends with and whose shape it has; scalars are replicated.

Example:
    >>> import jax, flax.linen as nn, numpy as np
    >>> from jaxfit.sharding import ShardingPlan
    >>> mesh = jax.make_mesh((1,), ("model",))
    >>> dense = nn.Dense(4, kernel_init=nn.with_partitioning(nn.initializers.ones, (None, "model")))
    >>> plan = ShardingPlan(mesh, data_axes=())
    >>> variables, shardings = plan.init(dense.init, jax.random.key(0), np.ones((1, 2)))
    >>> shardings["params"]["kernel"].spec
    P(None, 'model')
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import nnx
from flax.core import meta
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ._shards import ShardRecord, assemble, assemble_tree, local_shards, pack_shards, unpack_shards
from .errors import ConfigError, ShapeError

__all__ = [
    "ShardRecord",
    "ShardingPlan",
    "assemble",
    "assemble_tree",
    "local_shards",
    "pack_shards",
    "path_str",
    "per_device_bytes",
    "reshard",
    "unbox",
    "unpack_shards",
]

Rules = Sequence[tuple[str, "str | tuple[str, ...] | None"]]


def _is_box(x: Any) -> bool:
    return isinstance(x, (meta.AxisMetadata, nnx.Variable))


def _value(x: Any) -> Any:
    if isinstance(x, nnx.Variable):
        return x.get_value()
    if isinstance(x, meta.Partitioned):
        # No constraint: one would need a mesh context (and fail on a bad spec inside jax).
        return x.unbox(apply_constraint=False)
    return x.unbox() if isinstance(x, meta.AxisMetadata) else x


def unbox(tree: Any) -> Any:
    """Replace every flax partitioning box and nnx Variable in ``tree`` by its plain value.

    Example:
        >>> import flax.linen as nn, numpy as np
        >>> unbox({"w": nn.Partitioned(np.zeros(2), ("model",))})["w"].shape
        (2,)
    """
    return jax.tree_util.tree_map(_value, tree, is_leaf=_is_box)


def path_str(path: Sequence[Any]) -> str:
    """``"params/Dense_0/kernel"`` for a jax key path (the form ``param_rules`` regexes see)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _leaves(tree: Any) -> tuple[list[tuple[tuple[str, ...], Any]], Any]:
    """(path parts, leaf-or-box) pairs and the treedef with boxes as leaves."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_box)
    return [(tuple(path_str([k]) for k in p), x) for p, x in flat], treedef


def per_device_bytes(tree: Any) -> dict[jax.Device, int]:
    """Bytes each addressable device holds of the arrays in ``tree`` (sum of its shards).

    Example:
        >>> import jax, numpy as np
        >>> sum(per_device_bytes({"w": jax.device_put(np.zeros(4, np.float32))}).values())
        16
    """
    out: dict[jax.Device, int] = {}
    for leaf in jax.tree_util.tree_leaves(unbox(tree)):
        for shard in getattr(leaf, "addressable_shards", ()):
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


def _auto(mesh: Mesh) -> Mesh:
    # jax.make_mesh defaults to Explicit axes, under which flax layers reject ambiguous
    # shardings inside the step; Auto axes let XLA propagate them (the Trainer does the same).
    auto = (jax.sharding.AxisType.Auto,) * len(mesh.axis_names)
    return Mesh(mesh.devices, mesh.axis_names, axis_types=auto)


def _check_spec(mesh: Mesh, where: str, shape: tuple[int, ...], spec: PartitionSpec) -> None:
    """ConfigError naming the leaf, its shape, the spec and the mesh unless ``spec`` fits."""
    mesh_desc = dict(mesh.shape)
    what = f"{where} of shape {shape} has PartitionSpec {tuple(spec)} on mesh {mesh_desc}"
    if len(spec) > len(shape):
        raise ConfigError(f"{what}: the spec has {len(spec)} entries for {len(shape)} dims; "
                          f"give at most one entry per dim")
    used: list[str] = []
    for dim, entry in enumerate(spec):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        for axis in axes:
            if axis not in mesh.shape:
                raise ConfigError(f"{what}: {axis!r} is not an axis of the mesh; use one of "
                                  f"{tuple(mesh.axis_names)} or None, or map a logical name "
                                  f"to them with rules=")
            if axis in used:
                raise ConfigError(f"{what}: mesh axis {axis!r} is used twice; a mesh axis "
                                  f"may split at most one dim")
            used.append(axis)
        n = math.prod(mesh.shape[a] for a in axes)
        if shape[dim] % n:
            raise ConfigError(f"{what}: dim {dim} ({shape[dim]}) does not split evenly over mesh "
                              f"axes {axes} ({n} devices); pad it to a multiple of {n} or "
                              f"shard that dim over fewer devices")


@dataclass(frozen=True)
class ShardingPlan:
    """How a training state and its batches are laid out on a mesh.

    Args:
        mesh: the device mesh; its axes are made Auto (as the Trainer does).
        rules: flax ``logical_axis_rules``: ``(logical_name, mesh_axis | (axes...) | None)``
            pairs, in priority order, for ``nn.with_logical_partitioning`` names and nnx
            ``out_sharding`` names that are not mesh axes. A logical name with no rule is an
            error (map it to None to replicate that dim).
        param_rules: ``(regex, PartitionSpec)`` pairs for params without flax metadata; the
            first regex that ``re.search``-matches the param's path (``"Dense_0/kernel"``,
            relative to the params tree) gives its spec. Params matching none are replicated.
        data_axes: the mesh axes the batch's leading dim is split over, e.g. ``("data",)`` or
            ``("data", "fsdp")``; ``()`` replicates batches.

    Example:
        >>> import jax
        >>> from jax.sharding import PartitionSpec as P
        >>> plan = ShardingPlan(jax.make_mesh((1, 1), ("data", "model")),
        ...                     param_rules=[(r"kernel$", P(None, "model"))])
        >>> plan.param_specs({"Dense_0": {"kernel": jax.ShapeDtypeStruct((4, 8), "f4")}})
        {'Dense_0': {'kernel': P(None, 'model')}}
    """

    mesh: Mesh
    rules: Rules = ()
    param_rules: Sequence[tuple[str, PartitionSpec]] = ()
    data_axes: tuple[str, ...] = ("data",)
    _compiled_rules: list[tuple[re.Pattern[str], PartitionSpec]] = field(
        init=False, repr=False, compare=False, default_factory=list)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mesh", _auto(self.mesh))
        object.__setattr__(self, "rules", tuple(tuple(r) for r in self.rules))
        object.__setattr__(self, "data_axes", tuple(self.data_axes))
        object.__setattr__(self, "param_rules", tuple((p, PartitionSpec(*s)) for p, s in self.param_rules))
        for axis in self.data_axes:
            if axis not in self.mesh.shape:
                raise ConfigError(f"data axis {axis!r} is not an axis of the mesh "
                                  f"{dict(self.mesh.shape)}; pass data_axes= from "
                                  f"{tuple(self.mesh.axis_names)}")
        for name, target in self.rules:
            for axis in (() if target is None else (target,) if isinstance(target, str) else target):
                if axis not in self.mesh.shape:
                    raise ConfigError(f"rule ({name!r}, {target!r}) maps to {axis!r}, which is "
                                      f"not an axis of the mesh {dict(self.mesh.shape)}")
        compiled = []
        for pattern, spec in self.param_rules:
            try:
                compiled.append((re.compile(pattern), PartitionSpec(*spec)))
            except re.error as e:
                raise ConfigError(f"param_rules regex {pattern!r} does not compile: {e}") from e
        self._compiled_rules.extend(compiled)

    # ------------------------------------------------------------------ params
    def _box_spec(self, where: str, box: Any) -> PartitionSpec | None:
        """The mesh spec a box asks for, or None for an unannotated nnx Variable."""
        if isinstance(box, nnx.Variable):
            names = box.get_metadata().get("out_sharding")
            if names is None:
                return None
            local = tuple(box.get_metadata().get("sharding_rules") or ()) + tuple(self.rules)
            logical = {r[0] for r in local}
            # nnx names are physical unless a rule maps them (flax's own from_sharding_rules).
            names = tuple(names)
            if not any(isinstance(n, str) and n in logical for n in names):
                return PartitionSpec(*names)
            return self._logical(where, names, local, strict=False)
        if not isinstance(box, meta.Partitioned):  # other flax metadata: no layout in it
            return None
        if isinstance(box, nn.LogicallyPartitioned):
            rules = tuple(box.rules) if box.rules else self.rules
            return self._logical(where, tuple(box.names), rules, strict=True)
        return PartitionSpec(*box.names)

    def _logical(self, where: str, names: tuple, rules: Rules, strict: bool) -> PartitionSpec:
        known = {r[0] for r in rules}
        missing = [n for n in names if isinstance(n, str) and n not in known]
        if strict and missing:
            raise ConfigError(f"{where} has logical axis names {names}, but {missing} have no "
                              f"rule; pass rules=[(name, mesh_axis or None), ...] covering "
                              f"them (rules given: {list(rules)})")
        spec = nn.logical_to_mesh_axes(
            [n if (not isinstance(n, str) or n in known) else None for n in names], list(rules))
        assert spec is not None  # only None for names=None
        if not strict:  # unmapped nnx names stay physical
            spec = PartitionSpec(*(n if n in missing else s for n, s in zip(names, spec)))
        return spec

    def _resolve(self, path: tuple[str, ...], x: Any) -> PartitionSpec:
        where = f"param {'/'.join(path)!r}"
        spec = self._box_spec(where, x) if _is_box(x) else None
        if spec is None:
            joined = "/".join(path)
            spec = next((s for rx, s in self._compiled_rules if rx.search(joined)), PartitionSpec())
        shape = tuple(getattr(_value(x), "shape", ()))
        _check_spec(self.mesh, where, shape, spec)
        return spec

    def param_specs(self, params: Any) -> Any:
        """The validated PartitionSpec of every param (boxed or plain, abstract or concrete).

        Returns a tree with a PartitionSpec where each array or box was (a prefix of the
        unboxed params). Raises ConfigError naming the param for a spec that does not fit.
        """
        flat, treedef = _leaves(params)
        return jax.tree_util.tree_unflatten(treedef, [self._resolve(p, x) for p, x in flat])

    # ------------------------------------------------------------------ any state
    def shardings(self, tree: Any, params: Any = None) -> Any:
        """NamedShardings for ``tree`` (a state, optimizer state, EMA params...).

        Boxed leaves follow their own metadata. Every other array leaf is sharded like the
        param of ``params`` whose path is the longest suffix of the leaf's path and whose
        shape equals the leaf's (so Adam's ``mu``/``nu``, MultiSteps' accumulators, EMA
        copies follow their params through any ``optax`` wrapper); the rest is replicated.
        With ``params=None``, ``tree`` is the params tree itself.

        Returns a tree of NamedSharding, a prefix of ``unbox(tree)`` (for ``jax.jit``).
        """
        if params is None:
            return jax.tree_util.tree_map(lambda s: NamedSharding(self.mesh, s),
                                          self.param_specs(params=tree))
        specs, _ = _leaves(self.param_specs(params))
        shapes = {p: tuple(getattr(_value(x), "shape", ())) for p, x in _leaves(params)[0]}
        by_path = {p: (s, shapes[p]) for p, s in specs}
        longest = max((len(p) for p in by_path), default=0)
        flat, treedef = _leaves(tree)
        out = []
        for path, x in flat:
            shape = tuple(getattr(_value(x), "shape", ()))
            spec = self._box_spec(f"leaf {'/'.join(path)!r}", x) if _is_box(x) else None
            if spec is None and shape:
                for n in range(min(longest, len(path)), 0, -1):
                    hit = by_path.get(path[-n:])
                    if hit is not None and hit[1] == shape:
                        spec = hit[0]
                        break
            spec = PartitionSpec() if spec is None else spec
            _check_spec(self.mesh, f"leaf {'/'.join(path)!r}", shape, spec)
            out.append(NamedSharding(self.mesh, spec))
        return jax.tree_util.tree_unflatten(treedef, out)

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """The mesh and the logical rules as flax's context: build an nnx module eagerly
        under it (nnx shards a Variable with ``out_sharding`` metadata when it is created
        and needs both). ``init`` does not need it."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(list(self.rules)):
            yield

    def init(self, init_fn: Callable[..., Any], *args: Any,
             params_of: Callable[[Any], Any] = lambda s: s["params"]) -> tuple[Any, Any]:
        """Run ``init_fn(*args)`` directly sharded: no device ever holds a whole param.

        ``params_of`` picks the params out of the (abstract) result, so that the rest of
        it (batch_stats, optimizer state, EMA) can be sharded like them.

        Returns (the unboxed result as sharded arrays, its NamedSharding tree).
        """
        # No mesh context and no nnx eager sharding: flax would otherwise add sharding
        # constraints while tracing, and a bad spec would fail there with a jax error instead
        # of the ConfigError below. out_shardings alone places every shard on its device.
        with nnx.use_eager_sharding(False):
            abstract = jax.eval_shape(init_fn, *args)
            shardings = self.shardings(abstract, params_of(abstract))
            state = jax.jit(lambda *a: unbox(init_fn(*a)), out_shardings=shardings)(*args)
        return state, shardings

    # ------------------------------------------------------------------ batches
    @property
    def data_size(self) -> int:
        """How many ways the batch is split (the product of the data axes' sizes)."""
        return math.prod(self.mesh.shape[a] for a in self.data_axes)

    @property
    def replicated(self) -> NamedSharding:
        """A whole copy on every device: for losses, metrics, RNG keys, scalars."""
        return NamedSharding(self.mesh, PartitionSpec())

    def batch_sharding(self, stacked: bool = False) -> NamedSharding:
        """Leading dim over the data axes; ``stacked`` batches are (k, B, ...): dim 1."""
        axes = self.data_axes[0] if len(self.data_axes) == 1 else (self.data_axes or None)
        spec = PartitionSpec(None, axes) if stacked else PartitionSpec(axes)
        return NamedSharding(self.mesh, spec)

    def place_batch(self, tree: Any, stacked: bool = False, process_local: bool = False) -> Any:
        """Put a batch (numpy pytree) on the mesh, each device getting only its rows.

        Args:
            tree: the batch. With ``process_local=False`` every process passes the same
                global batch; with ``True`` each passes only its own rows (e.g. from its
                own data shard) and the global batch is their concatenation.
            stacked: the batch is (k, B, ...) for ``steps_per_execution=k``.
            process_local: see ``tree``.
        """
        sharding, dim = self.batch_sharding(stacked), int(stacked)

        def place(a: Any) -> jax.Array:
            a = np.asarray(a)
            n = self.data_size // (jax.process_count() if process_local else 1)
            if a.ndim <= dim or a.shape[dim] % max(n, 1):
                raise ConfigError(f"batch of shape {a.shape} does not split evenly over the "
                                  f"{self.data_size} devices of data axes {self.data_axes}: "
                                  f"use a batch size that is a multiple of {self.data_size}")
            if process_local:
                return jax.make_array_from_process_local_data(sharding, a)
            return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])

        return jax.tree_util.tree_map(place, tree)


def reshard(host_tree: Any, shardings: Any) -> Any:
    """Place host arrays of global shape onto ``shardings`` (e.g. another mesh on resume).

    Each device receives only its slice (``jax.make_array_from_callback``); no device ever
    holds a full copy of a sharded leaf.

    Example:
        >>> import jax, numpy as np
        >>> from jax.sharding import NamedSharding, PartitionSpec
        >>> s = NamedSharding(jax.make_mesh((1,), ("data",)), PartitionSpec("data"))
        >>> reshard({"w": np.arange(4.0)}, {"w": s})["w"].sharding.spec
        P('data',)
    """
    def place(path: Any, a: Any, s: NamedSharding) -> jax.Array:
        a = np.asarray(a)
        where = f"leaf {path_str(path)!r}"
        try:
            s.shard_shape(a.shape)
        except ValueError as e:
            raise ShapeError(f"{where} of shape {a.shape} does not fit sharding {s.spec} "
                             f"on mesh {dict(s.mesh.shape)}: {e}") from e
        return jax.make_array_from_callback(a.shape, s, lambda idx: a[idx])

    return jax.tree_util.tree_map_with_path(place, unbox(host_tree), shardings)
