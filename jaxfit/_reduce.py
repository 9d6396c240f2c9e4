"""Turning a loss or metric into per-example values, so padded batches can be masked."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from jaxfit.errors import ConfigError, ShapeError

PerExample = Callable[[Any, Any], jax.Array]


def shape_of(x: Any) -> Any:
    return jax.tree_util.tree_map(lambda a: tuple(a.shape), x)


def batch_size_of(tree: Any) -> int:
    return jax.tree_util.tree_leaves(tree)[0].shape[0]


def flat_per_example(values: jax.Array, batch: int) -> jax.Array:
    """Average every non-batch axis away: (B, ...) -> (B,)."""
    values = jnp.asarray(values)
    if values.ndim == 0 or values.shape[0] != batch:
        raise ShapeError(f"expected per-example values with leading axis {batch}, got {values.shape}")
    return values.reshape(batch, -1).mean(axis=1) if values.ndim > 1 else values


def per_example(fn: Callable[[Any, Any], Any], name: str, strict: bool = False) -> PerExample:
    """Wrap a user ``fn(outputs, targets)`` so that it returns one value per example.

    ``fn`` may return per-example values of shape (B,) or (B, ...), which are used as they
    are (non-batch axes averaged), or a scalar batch mean, in which case it is evaluated
    per example through ``jax.vmap`` — exact for any loss or metric that is a mean over
    examples (not for batch-level statistics such as AUC, which need per-example output).
    With ``strict`` (metrics), values of shape (B, ...) are refused rather than averaged:
    a metric returning (B, classes) is almost always a mistake.
    """

    def wrapped(outputs: Any, targets: Any) -> jax.Array:
        batch = batch_size_of(outputs)
        out = jnp.asarray(fn(outputs, targets))
        if strict and out.ndim > 1:
            raise ShapeError(
                f"metric {name} returned shape {out.shape} for a batch of {batch}: a metric returns "
                f"one value per example, shape ({batch},), or a batch mean; reduce the other axes "
                "(e.g. .mean(axis=-1)) or return jaxfit.metrics.Average(total, count)"
            )
        if out.ndim >= 1 and out.shape[0] == batch:
            return flat_per_example(out, batch)
        if out.ndim == 0:
            one = lambda o, t: jnp.asarray(  # noqa: E731
                fn(jax.tree_util.tree_map(lambda a: a[None], o), jax.tree_util.tree_map(lambda a: a[None], t))
            ).reshape(())
            return jax.vmap(one)(outputs, targets)
        raise ShapeError(
            f"{name} returned shape {out.shape} for a batch of {batch}: return a scalar batch "
            f"mean or one value per example, shape ({batch},)."
        )

    wrapped.__name__ = name
    return wrapped


def resolve(spec: str | Callable, registry: Mapping[str, Callable], kind: str) -> tuple[str, PerExample]:
    """A (name, per-example fn) pair from a registered name or a callable."""
    if isinstance(spec, str):
        factory = registry.get(spec)
        if factory is None:
            raise ConfigError(
                f"unknown {kind} {spec!r}. Known {kind}es: {', '.join(sorted(registry))}. "
                f"Or pass a function fn(outputs, targets) -> {kind} value."
                if kind == "loss"
                else f"unknown {kind} {spec!r}. Known {kind}s: {', '.join(sorted(registry))}, "
                f"top_<k>_accuracy. Or pass a function fn(outputs, targets) -> value."
            )
        return spec, factory
    if callable(spec):
        name = getattr(spec, "__name__", type(spec).__name__)
        if name == "<lambda>":
            name = kind
        builtin = getattr(spec, "_jaxfit_per_example", False)
        return name, spec if builtin else per_example(spec, name, strict=kind == "metric")
    raise ConfigError(f"{kind} must be a name or a callable fn(outputs, targets), got {spec!r}")


def builtin(fn: Callable) -> Callable:
    """Mark a function as already per-example (returns shape (B,))."""
    fn._jaxfit_per_example = True  # type: ignore[attr-defined]
    return fn


def match_regression(outputs: jax.Array, targets: jax.Array, name: str) -> tuple[jax.Array, jax.Array]:
    """Align (B,) with (B, 1), which users mix up all the time; refuse anything else."""
    o, t = jnp.asarray(outputs), jnp.asarray(targets)
    if o.shape == t.shape:
        return o, t
    if o.ndim == t.ndim + 1 and o.shape[-1] == 1 and o.shape[:-1] == t.shape:
        return o[..., 0], t
    if t.ndim == o.ndim + 1 and t.shape[-1] == 1 and t.shape[:-1] == o.shape:
        return o, t[..., 0]
    raise ShapeError(
        f"{name}: model outputs have shape {o.shape} but targets have shape {t.shape}; "
        "they must match (a trailing axis of size 1 is ignored). Check the model's last "
        "layer size against the targets."
    )
