"""Pytrees to plain nested dicts of numpy arrays and back, with path-named errors.

Checkpoints store the training state as nested dicts (msgpack-friendly: str keys, numpy
leaves), whatever containers it is made of — optax named tuples, flax dataclasses,
``nnx.State``. Restoring walks a live template of the same structure, so a mismatch names
the exact path and both shapes.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from jaxfit.errors import ShapeError

_KEY_MARK = "__prng_key_data__"


def _key_name(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _is_typed_key(leaf: Any) -> bool:
    return hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def batch_rows(batch: Any) -> int | None:
    """The batch's leading axis when every leaf shares it, else None (a graph batch)."""
    sizes = {leaf.shape[0] if getattr(leaf, "ndim", 0) else None for leaf in jax.tree_util.tree_leaves(batch)}
    return sizes.pop() if len(sizes) == 1 and None not in sizes else None


def same_structure(a: Any, b: Any) -> bool:
    """Whether two pytrees have the same structure (containers and leaf count)."""
    return bool(jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b))  # type: ignore[operator]


def aval_key(*trees: Any) -> tuple | None:
    """A hashable key of the trees' structures and their leaves' shapes and dtypes (what a
    trace of them depends on, as jit's cache sees it); None when a tree's structure cannot
    be hashed (a pytree with an unhashable static field)."""
    parts: list = []
    for tree in trees:
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        parts.append(treedef)
        parts.append(tuple((np.shape(x), getattr(x, "dtype", type(x))) for x in leaves))
    key = tuple(parts)
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _key_impl(leaf: Any) -> Any:
    """The PRNG implementation of a typed key, or of a template of one (``eval_shape``)."""
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return leaf.dtype._impl  # the key dtype carries its implementation
    return jax.random.key_impl(leaf)


def nest(leaves: list, values: Any) -> dict:
    """The nested dict ``to_dict`` makes of ``tree_flatten_with_path``'s ``leaves``, holding
    ``values`` (one per leaf, in order) where the arrays go: a typed PRNG key's value is
    wrapped as its key data's entry."""
    out: dict = {}
    for (path, leaf), value in zip(leaves, values):
        node = out
        names = [_key_name(k) for k in path] or ["value"]
        for name in names[:-1]:
            node = node.setdefault(name, {})
        node[names[-1]] = {_KEY_MARK: value} if _is_typed_key(leaf) else value
    return out


def to_dict(tree: Any) -> dict:
    """Nested dict of numpy arrays; typed PRNG keys become their key data."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    host = jax.device_get([jax.random.key_data(leaf) if _is_typed_key(leaf) else leaf for _, leaf in leaves])
    return nest(leaves, [np.asarray(value) for value in host])


def from_dict(template: Any, data: dict, where: str = "state") -> Any:
    """``template``'s structure with leaves taken from ``data`` (as made by ``to_dict``)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    new = []
    for path, leaf in leaves:
        names = [_key_name(k) for k in path] or ["value"]
        node: Any = data
        for i, name in enumerate(names):
            if not isinstance(node, dict) or name not in node:
                at = ".".join(names[: i + 1])
                raise ShapeError(
                    f"{where}: the saved state has no entry {at!r} that the model/optimizer "
                    "expects. The checkpoint was made with a different model or optimizer "
                    "definition."
                )
            node = node[name]
        at = ".".join(names)
        if _is_typed_key(leaf):
            if not isinstance(node, dict) or _KEY_MARK not in node:
                raise ShapeError(f"{where}.{at}: expected saved PRNG key data")
            impl = _key_impl(leaf)
            value = jax.random.wrap_key_data(jax.numpy.asarray(node[_KEY_MARK]), impl=impl)
            want = tuple(leaf.shape) + tuple(jax.random.key_data(jax.random.key(0, impl=impl)).shape)
            got = node[_KEY_MARK].shape
        else:
            value = np.asarray(node)
            want, got = tuple(np.shape(leaf)), value.shape
            if got == want and hasattr(leaf, "dtype") and value.dtype != leaf.dtype:
                raise ShapeError(f"{where}.{at}: saved dtype {value.dtype}, expected {leaf.dtype}")
        if tuple(got) != tuple(want):
            raise ShapeError(f"{where}.{at}: saved shape {tuple(got)}, expected {tuple(want)}")
        new.append(value)
    extra = _count(data) - len(leaves)
    if extra > 0:
        raise ShapeError(
            f"{where}: the saved state has {extra} more array(s) than the model/optimizer "
            "expects; it was made with a different definition"
        )
    return jax.tree_util.tree_unflatten(treedef, new)


def _count(node: Any) -> int:
    if isinstance(node, dict) and _KEY_MARK not in node:
        return sum(_count(v) for v in node.values())
    return 1
