"""Metrics by name, each returning one value per example (masked and averaged on device).

Names: ``accuracy`` (multi-class from logits with integer or one-hot targets; binary when
the model has one output, thresholded at logit 0), ``binary_accuracy``,
``top_<k>_accuracy`` (e.g. ``top_5_accuracy``), ``mse``, ``mae``. Callables
``fn(outputs, targets)`` are accepted too.
"""

from __future__ import annotations

import re
from typing import Callable

import jax
import jax.numpy as jnp

from jaxfit._reduce import builtin, match_regression, resolve
from jaxfit.errors import ShapeError
from jaxfit.losses import _class_targets, mae, mse


def _labels(outputs: jax.Array, targets: jax.Array, name: str) -> jax.Array:
    kind = _class_targets(outputs, targets, name)
    if kind == "dense":
        return jnp.argmax(targets, axis=-1)
    return targets if kind == "int" else targets[..., 0]


def _per_example_mean(v: jax.Array) -> jax.Array:
    v = v.astype(jnp.float32)
    return v.reshape(v.shape[0], -1).mean(axis=1) if v.ndim > 1 else v


@builtin
def binary_accuracy(outputs: jax.Array, targets: jax.Array) -> jax.Array:
    """Fraction right when a logit > 0 predicts 1 (targets 0/1 or booleans)."""
    o, t = match_regression(outputs, targets, "binary_accuracy")
    return _per_example_mean((o > 0) == (t > 0.5))


@builtin
def accuracy(outputs: jax.Array, targets: jax.Array) -> jax.Array:
    """Multi-class accuracy from logits; binary accuracy for single-output models."""
    if outputs.ndim == 1 or outputs.shape[-1] == 1:
        return binary_accuracy(outputs, targets)
    labels = _labels(outputs, targets, "accuracy")
    return _per_example_mean(jnp.argmax(outputs, axis=-1) == labels)


def top_k_accuracy(k: int) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """Whether the true class is among the ``k`` largest logits."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"top_k_accuracy needs an integer k >= 1, got k = {k!r}")
    name = f"top_{k}_accuracy"

    @builtin
    def metric(outputs: jax.Array, targets: jax.Array) -> jax.Array:
        labels = _labels(outputs, targets, name)
        if outputs.shape[-1] < k:
            raise ShapeError(f"{name}: the model has {outputs.shape[-1]} classes, fewer than k = {k}")
        true_logit = jnp.take_along_axis(outputs, labels[..., None].astype(jnp.int32), axis=-1)
        # Rank = number of classes scoring strictly higher; ties count in the true class's favour.
        rank = jnp.sum(outputs > true_logit, axis=-1)
        return _per_example_mean(rank < k)

    metric.__name__ = name
    return metric


METRICS: dict[str, Callable] = {
    "accuracy": accuracy,
    "binary_accuracy": binary_accuracy,
    "mse": mse,
    "mae": mae,
}

_TOP_K = re.compile(r"^top_(\d+)_accuracy$")


def resolve_metric(spec):
    """(name, per-example fn) for a metric name or callable."""
    if isinstance(spec, str):
        m = _TOP_K.match(spec)
        if m:
            return spec, top_k_accuracy(int(m.group(1)))
    return resolve(spec, METRICS, "metric")
