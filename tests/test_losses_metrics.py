"""Losses and metrics by name and as callables, per example, masked."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxfit import losses, metrics
from jaxfit._reduce import per_example
from jaxfit.errors import ShapeError
from jaxfit.metrics import resolve_metric

logits = jnp.array([[2.0, 1.0, 0.1], [0.2, 0.3, 3.0], [1.0, 1.5, 0.0]])
labels = jnp.array([0, 2, 0])


def test_softmax_cross_entropy_accepts_integer_and_one_hot_targets():
    a = losses.softmax_cross_entropy(logits, labels)
    b = losses.softmax_cross_entropy(logits, jnp.eye(3)[labels])
    c = losses.softmax_cross_entropy(logits, labels[:, None])
    ref = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    for v in (a, b, c):
        np.testing.assert_allclose(v, ref, rtol=1e-6)


def test_regression_losses_per_example():
    o = jnp.array([[1.0, 2.0], [0.0, -1.0]])
    t = jnp.array([[0.0, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(losses.mse(o, t), [2.5, 2.0])
    np.testing.assert_allclose(losses.mae(o, t), [1.5, 1.0])
    np.testing.assert_allclose(losses.huber(o, t), [(0.5 + 1.5) / 2, 1.5 / 2])
    np.testing.assert_allclose(losses.mse(jnp.ones((3, 1)), jnp.zeros(3)), [1.0, 1.0, 1.0])


def test_sigmoid_binary_cross_entropy():
    o, t = jnp.array([0.0, 2.0]), jnp.array([1.0, 0.0])
    np.testing.assert_allclose(losses.sigmoid_binary_cross_entropy(o, t), optax.sigmoid_binary_cross_entropy(o, t))


def test_accuracy_multiclass_binary_and_top_k():
    np.testing.assert_array_equal(metrics.accuracy(logits, labels), [1.0, 1.0, 0.0])
    np.testing.assert_array_equal(metrics.accuracy(logits, jnp.eye(3)[labels]), [1.0, 1.0, 0.0])
    np.testing.assert_array_equal(metrics.accuracy(jnp.array([[2.0], [-1.0]]), jnp.array([1, 1])), [1.0, 0.0])
    _, top2 = resolve_metric("top_2_accuracy")
    np.testing.assert_array_equal(top2(logits, labels), [1.0, 1.0, 1.0])
    _, top1 = resolve_metric("top_1_accuracy")
    np.testing.assert_array_equal(top1(logits, labels), [1.0, 1.0, 0.0])


def test_callable_returning_a_batch_mean_is_evaluated_per_example():
    fn = per_example(lambda o, t: jnp.mean((o - t) ** 2), "my_loss")
    o, t = jnp.array([[1.0], [3.0]]), jnp.zeros((2, 1))
    np.testing.assert_allclose(fn(o, t), [1.0, 9.0])


def test_callable_returning_per_example_values_is_used_as_is():
    fn = per_example(lambda o, t: jnp.sum(jnp.abs(o - t), axis=-1), "l1")
    np.testing.assert_allclose(fn(jnp.array([[1.0, 1.0], [2.0, 0.0]]), jnp.zeros((2, 2))), [2.0, 2.0])


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ShapeError, match=r"outputs have shape \(3, 3\) but targets have shape \(3, 5\)"):
        losses.softmax_cross_entropy(logits, jnp.zeros((3, 5)))
    with pytest.raises(ShapeError, match=r"\(2, 3\).*\(2, 4\)"):
        losses.mse(jnp.zeros((2, 3)), jnp.zeros((2, 4)))


def test_top_k_needs_positive_k():
    with pytest.raises(ValueError, match="k >= 1"):
        metrics.top_k_accuracy(0)


def test_a_metric_returning_more_than_one_value_per_example_is_refused():
    fn = per_example(lambda o, t: o - t, "delta", strict=True)
    with pytest.raises(ShapeError, match=r"metric delta returned shape \(2, 3\).*one value per example"):
        fn(jnp.zeros((2, 3)), jnp.zeros((2, 3)))


def test_bf16_logits_are_reduced_in_float32():
    x = jnp.array([[3.1, -2.2, 0.7, 1.3]] * 2, jnp.bfloat16)
    labels = jnp.array([2, 0])
    got = losses.softmax_cross_entropy(x, labels)
    want = optax.softmax_cross_entropy_with_integer_labels(x.astype(jnp.float32), labels)
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(got, want)
