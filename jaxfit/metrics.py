"""Metrics: per-example functions by name, and the additive states epochs are summed in.

Every metric of an epoch is a *metric state*: a small pytree of sums that the step adds
batch after batch on the device, and that is turned into a number once, at the epoch's
single fetch (``compute``). Because the states are sums, an epoch's value never depends
on how the data was cut into batches:

* ``Average(total, count)``: ``total / count`` over the epoch. A per-example metric is
  ``Average(sum of values, number of real examples)``; a token-weighted loss or accuracy
  is ``Average(sum of weighted values, sum of weights)`` — a ratio of sums, not a mean
  of batch means.
* ``Histogram``: per-class score histograms of positives and negatives, from which
  ``AUC`` (ROC or precision-recall) and ``MeanAveragePrecision`` are computed over the
  whole epoch.

Names for ``Trainer(metrics=[...])``: ``accuracy`` (multi-class from logits with integer
or one-hot targets; binary when the model has one output, thresholded at logit 0),
``binary_accuracy``, ``top_<k>_accuracy`` (e.g. ``top_5_accuracy``), ``mse``, ``mae``;
callables ``fn(outputs, targets)`` returning per-example values or a batch mean; and
epoch-level metric objects (``AUC()``, ``MeanAveragePrecision()``).
"""

from __future__ import annotations

import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxfit._reduce import builtin, match_regression, resolve
from jaxfit.errors import ConfigError, ShapeError
from jaxfit.losses import _class_targets, f32, mae, mse


class MetricState:
    """Base of the additive metric states: adding two states merges two sets of batches."""

    def compute(self) -> float:  # pragma: no cover - every state defines it
        raise NotImplementedError


@struct.dataclass
class Average(MetricState):
    """``total / count`` over everything added (NaN while ``count`` is 0).

    Example:
        >>> import jax.numpy as jnp
        >>> a = Average.of(jnp.array([1.0, 3.0]))          # the mean of two examples
        >>> b = Average(total=jnp.array(6.0), count=jnp.array(2.0))  # a ratio of sums
        >>> float(merge(a, b).compute())
        2.5
    """

    total: Any
    count: Any

    @classmethod
    def of(cls, values: Any, mask: Any = None) -> Average:
        """The masked mean of per-example ``values`` (non-batch axes averaged first)."""
        v = jnp.asarray(values, jnp.float32)
        if v.ndim > 1:
            v = v.reshape(v.shape[0], -1).mean(axis=1)
        if v.ndim == 0:
            return cls(total=v, count=jnp.ones((), jnp.float32))
        m = jnp.ones(v.shape[:1], jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
        return cls(total=jnp.sum(v * m), count=jnp.sum(m))

    def compute(self) -> float:
        count = float(self.count)
        return float(self.total) / count if count else float("nan")


@struct.dataclass
class Histogram(MetricState):
    """Per-class histograms of scores (in [0, 1]) of positive and negative examples."""

    pos: Any  # (classes, bins) float32 counts
    neg: Any
    kind: str = struct.field(pytree_node=False, default="roc")

    def compute(self) -> float:
        pos, neg = np.asarray(self.pos, np.float64), np.asarray(self.neg, np.float64)
        # Cumulate from the highest bin down: tp[i] = positives scoring in bin i or above.
        tp = np.cumsum(pos[:, ::-1], axis=1)
        fp = np.cumsum(neg[:, ::-1], axis=1)
        P, N = tp[:, -1], fp[:, -1]
        valid = (P > 0) & (N > 0) if self.kind == "roc" else P > 0
        if not valid.any():
            return float("nan")
        tp, fp, P, N = tp[valid], fp[valid], P[valid], N[valid]
        zeros = np.zeros((tp.shape[0], 1))
        if self.kind == "roc":
            tpr = np.concatenate([zeros, tp / P[:, None]], axis=1)
            fpr = np.concatenate([zeros, fp / N[:, None]], axis=1)
            per_class = np.sum(np.diff(fpr, axis=1) * (tpr[:, 1:] + tpr[:, :-1]) / 2, axis=1)
        else:  # average precision: sum over thresholds of (R_k - R_{k-1}) * P_k
            recall = np.concatenate([zeros, tp / P[:, None]], axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1e-300), 1.0)
            per_class = np.sum(np.diff(recall, axis=1) * precision, axis=1)
        return float(per_class.mean())


def merge(a: Any, b: Any) -> Any:
    """Two metric states (or dicts of them) added together."""
    return jax.tree_util.tree_map(jnp.add, a, b)


def compute(states: dict[str, MetricState]) -> dict[str, float]:
    """Host numbers from fetched metric states (``jax.device_get`` first)."""
    return {name: float(state.compute()) for name, state in states.items()}


def as_state(value: Any, weight: Any) -> MetricState:
    """A value a loss or step returned, as a metric state: states pass, scalars become
    ``Average(value * weight, weight)`` (weight: the batch's real examples, or 1)."""
    if isinstance(value, MetricState):
        return value
    v = jnp.asarray(value, jnp.float32)
    if v.ndim != 0:
        raise ShapeError(
            f"a metric returned shape {v.shape}: return a scalar, jaxfit.metrics.Average(total, "
            "count) for a ratio of sums, or another jaxfit.metrics state"
        )
    w = jnp.asarray(weight, jnp.float32)
    return Average(total=v * w, count=w)


class _Scored:
    """Shared by AUC and MeanAveragePrecision: scores binned per class on the device."""

    kind = "roc"
    default_name = "scored"

    def __init__(self, num_thresholds: int = 200, from_logits: bool = True, name: str | None = None) -> None:
        if not isinstance(num_thresholds, int) or num_thresholds < 2:
            raise ConfigError(f"num_thresholds must be an int >= 2, got num_thresholds = {num_thresholds!r}")
        self.num_thresholds, self.from_logits = num_thresholds, from_logits
        self.__name__ = name or self.default_name

    def __call__(self, outputs: Any, targets: Any, mask: Any = None) -> Histogram:
        """The histograms of one batch: ``outputs`` and ``targets`` of shape (B,) or
        (B, classes); NaN targets (unlabelled tasks) and masked rows are left out."""
        o = jnp.asarray(outputs, jnp.float32)
        t = jnp.asarray(targets, jnp.float32)
        if o.ndim == 1:
            o, t = o[:, None], t.reshape(-1, 1)
        if o.shape != t.shape:
            raise ShapeError(f"{self.__name__}: outputs have shape {o.shape} but targets have shape {t.shape}")
        p = jax.nn.sigmoid(o) if self.from_logits else o
        known = ~jnp.isnan(t)
        w = known.astype(jnp.float32)
        if mask is not None:
            w = w * jnp.asarray(mask, jnp.float32)[:, None]
        t = jnp.where(known, t, 0.0)
        T, C = self.num_thresholds, o.shape[1]
        bins = jnp.clip((p * T).astype(jnp.int32), 0, T - 1)
        flat = (jnp.arange(C)[None, :] * T + bins).reshape(-1)
        pos = jnp.zeros(C * T, jnp.float32).at[flat].add((w * t).reshape(-1)).reshape(C, T)
        neg = jnp.zeros(C * T, jnp.float32).at[flat].add((w * (1 - t)).reshape(-1)).reshape(C, T)
        return Histogram(pos=pos, neg=neg, kind=self.kind)


class AUC(_Scored):
    """Area under the ROC curve over the whole epoch, averaged over classes (multi-label
    outputs) that have both positive and negative examples.

    Scores are binned into ``num_thresholds`` equal bins on the device, like Keras's
    ``AUC``: the value is exact up to ties within a bin (within 1e-2 of scikit-learn's
    ``roc_auc_score`` at the default 200 bins on the tests' data).

    Example:
        >>> from jaxfit.metrics import AUC
        >>> trainer = Trainer(optimizer=opt, loss="sigmoid_binary_cross_entropy",  # doctest: +SKIP
        ...                   metrics=[AUC()])
    """

    kind = "roc"
    default_name = "auc"


class MeanAveragePrecision(_Scored):
    """Average precision over the whole epoch, averaged over the classes that have a
    positive example (the ogbg-molpcba metric). Binned like ``AUC``; within 2e-2 of
    scikit-learn's ``average_precision_score`` at 200 bins on the tests' data."""

    kind = "pr"
    default_name = "mean_average_precision"


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
    o, t = match_regression(f32(outputs), targets, "binary_accuracy")
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


def resolve_metric(spec: Any) -> tuple[str, Callable]:
    """(name, fn) for a metric name, callable or metric object. ``fn(outputs, targets)``
    gives per-example values; a metric object (``AUC()``) is marked ``_jaxfit_state``
    and gives a metric state from ``(outputs, targets, mask)``."""
    if isinstance(spec, _Scored):
        return spec.__name__, spec
    if isinstance(spec, str):
        m = _TOP_K.match(spec)
        if m:
            return spec, top_k_accuracy(int(m.group(1)))
    return resolve(spec, METRICS, "metric")
