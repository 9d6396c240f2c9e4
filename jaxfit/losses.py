"""Losses by name, each returning one value per example (masked and averaged by the step).

Outputs are logits for the classification losses. Names:
``softmax_cross_entropy`` (integer or one-hot / probability targets),
``sigmoid_binary_cross_entropy``, ``mse``, ``mae``, ``huber``, and Keras-style aliases.
A callable ``fn(outputs, targets)`` returning a scalar batch mean or per-example values is
accepted too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxfit._reduce import builtin, match_regression
from jaxfit.errors import ShapeError


def f32(x: jax.Array) -> jax.Array:
    """Floating values in float32 at least: bf16/fp16 logits are reduced in float32, as
    the flax examples do (a bf16 softmax cross-entropy is off in the second digit)."""
    x = jnp.asarray(x)
    return x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize < 4 else x


def _class_targets(outputs: jax.Array, targets: jax.Array, name: str) -> str:
    """'int' for integer labels, 'dense' for one-hot or probabilities; else ShapeError."""
    o, t = outputs, targets
    if o.ndim < 2:
        raise ShapeError(
            f"{name}: model outputs have shape {o.shape}, expected (batch, num_classes) logits. "
            "For a single binary output use 'sigmoid_binary_cross_entropy'."
        )
    if jnp.issubdtype(t.dtype, jnp.integer) and t.shape == o.shape[:-1]:
        return "int"
    if jnp.issubdtype(t.dtype, jnp.integer) and t.shape == o.shape[:-1] + (1,):
        return "int1"
    if t.shape == o.shape:
        return "dense"
    raise ShapeError(
        f"{name}: model outputs have shape {o.shape} but targets have shape {t.shape} "
        f"(dtype {t.dtype}). Expected integer labels of shape {o.shape[:-1]} or one-hot "
        f"targets of shape {o.shape}. Check the model's last layer size (num_classes)."
    )


@builtin
def softmax_cross_entropy(outputs: jax.Array, targets: jax.Array) -> jax.Array:
    """Cross-entropy of softmax(logits) with integer labels or one-hot/probability targets."""
    outputs = f32(outputs)
    kind = _class_targets(outputs, targets, "softmax_cross_entropy")
    if kind == "dense":
        ce = optax.softmax_cross_entropy(outputs, targets.astype(outputs.dtype))
    else:
        labels = targets if kind == "int" else targets[..., 0]
        ce = optax.softmax_cross_entropy_with_integer_labels(outputs, labels)
    return ce.reshape(ce.shape[0], -1).mean(axis=1) if ce.ndim > 1 else ce


@builtin
def sigmoid_binary_cross_entropy(outputs: jax.Array, targets: jax.Array) -> jax.Array:
    """Binary (or multi-label) cross-entropy of sigmoid(logits); targets in [0, 1]."""
    o, t = match_regression(f32(outputs), targets, "sigmoid_binary_cross_entropy")
    v = optax.sigmoid_binary_cross_entropy(o, t.astype(o.dtype))
    return v.reshape(v.shape[0], -1).mean(axis=1) if v.ndim > 1 else v


def _regression(fn, name):
    @builtin
    def loss(outputs: jax.Array, targets: jax.Array) -> jax.Array:
        o, t = match_regression(f32(outputs), f32(targets), name)
        v = fn(o, t.astype(o.dtype))
        return v.reshape(v.shape[0], -1).mean(axis=1) if v.ndim > 1 else v

    loss.__name__ = name
    loss.__doc__ = f"Per-example {name}, averaged over non-batch axes."
    return loss


mse = _regression(lambda o, t: jnp.square(o - t), "mse")
mae = _regression(lambda o, t: jnp.abs(o - t), "mae")
huber = _regression(lambda o, t: optax.huber_loss(o, t, delta=1.0), "huber")

LOSSES = {
    "softmax_cross_entropy": softmax_cross_entropy,
    "sparse_categorical_crossentropy": softmax_cross_entropy,
    "categorical_crossentropy": softmax_cross_entropy,
    "sigmoid_binary_cross_entropy": sigmoid_binary_cross_entropy,
    "binary_crossentropy": sigmoid_binary_cross_entropy,
    "mse": mse,
    "mean_squared_error": mse,
    "mae": mae,
    "mean_absolute_error": mae,
    "huber": huber,
}
