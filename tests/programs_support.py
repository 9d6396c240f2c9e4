"""Helpers shared by the program ports (``tests/test_programs_*.py``).

Each port trains one public program of ``/work/shared/PROGRAMS.md`` twice from the same
initial params on the same batches with the same keys: once by jaxfit, once by the
program's own hand-written jitted step (as in its source). These helpers give the hand
loop what jaxfit hands a step (the keys of every step, the batches in order) and compare
the two runs.

Keys (``jaxfit.engine.Engine``): train step ``k`` gets ``fold_in(fold_in(key(seed), 1), k)``,
evaluation batch ``i`` ``fold_in(fold_in(key(seed), 2), i)``; RNG stream ``name`` of a step
is ``jaxfit.step.stream_key(step_key, name)`` ("dropout" is the step key itself).
"""

from __future__ import annotations

from typing import Any, Iterator

import jax
import numpy as np

from jaxfit.step import stream_key


def train_key(seed: int, k: int) -> jax.Array:
    """The key jaxfit gives train step ``k`` (0-based count of steps before it)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 1), k)


def eval_key(seed: int, i: int) -> jax.Array:
    """The key jaxfit gives evaluation batch ``i`` of an evaluation pass."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 2), i)


def rng(seed: int, k: int, name: str = "dropout") -> jax.Array:
    """The key of RNG stream ``name`` at train step ``k``."""
    return stream_key(train_key(seed, k), name)


def batches(data: Any, batch_size: int) -> Iterator[Any]:
    """``data`` (any pytree of equal-length arrays) cut in order, the last batch partial:
    what ``fit(..., shuffle=False)`` feeds its steps."""
    n = jax.tree_util.tree_leaves(data)[0].shape[0]
    for lo in range(0, n, batch_size):
        yield jax.tree_util.tree_map(lambda a: a[lo:lo + batch_size], data)


def host(tree: Any) -> Any:
    """A host copy (jaxfit donates its state to the next step)."""
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def assert_bitwise(got: Any, want: Any, what: str = "params") -> None:
    """Every leaf identical bit for bit (same structure, shapes and dtypes)."""
    # jaxfit's state holds plain arrays; a hand step's flax init may keep nn.Partitioned boxes.
    from flax.core import meta

    g, w = host(meta.unbox(got)), host(meta.unbox(want))
    assert jax.tree_util.tree_structure(g) == jax.tree_util.tree_structure(w), f"{what}: structures differ"
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g)[0], jax.tree_util.tree_leaves(w)):
        where = f"{what}{jax.tree_util.keystr(path)}"
        assert a.shape == b.shape and a.dtype == b.dtype, f"{where}: {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}"
        if a.tobytes() != b.tobytes():
            diff = np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))) if a.dtype.kind == "f" else "?"
            raise AssertionError(f"{where} differs (max |difference| {diff})")


def assert_close(got: Any, want: Any, *, rtol: float, atol: float, what: str = "params") -> None:
    g, w = host(got), host(want)
    assert jax.tree_util.tree_structure(g) == jax.tree_util.tree_structure(w), f"{what}: structures differ"
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g)[0], jax.tree_util.tree_leaves(w)):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=rtol, atol=atol,
                                   err_msg=f"{what}{jax.tree_util.keystr(path)}")


def assert_changed(after: Any, before: Any) -> None:
    """Training moved the params (a comparison of two runs that never trained proves nothing)."""
    a, b = jax.tree_util.tree_leaves(host(after)), jax.tree_util.tree_leaves(host(before))
    assert any(x.tobytes() != y.tobytes() for x, y in zip(a, b)), "the params did not change"


class EpochMean:
    """An epoch's value as jaxfit accumulates it: float32 sums of ``total`` and ``count``
    added batch after batch on the device, divided on the host in float64
    (``jaxfit.metrics.Average``). A scalar batch value ``v`` of a batch of ``w`` real
    examples adds ``(v * w, w)``; a ratio of sums adds ``(numerator, denominator)``.
    Replaying the same float32 additions makes the epoch value bit-comparable."""

    def __init__(self) -> None:
        self.total, self.count = np.float32(0), np.float32(0)

    def add_scalar(self, value: Any, weight: float) -> None:
        w = np.float32(weight)
        self.add(np.float32(np.asarray(value, np.float32) * w), w)

    def add(self, total: Any, count: Any) -> None:
        self.total = np.float32(self.total + np.asarray(total, np.float32))
        self.count = np.float32(self.count + np.asarray(count, np.float32))

    @property
    def value(self) -> float:
        return float(self.total) / float(self.count)


def fit_args(**kw: Any) -> dict:
    """Fit arguments of the ports: silent, batches in order (the hand loop replays them)."""
    return {"verbose": 0, "shuffle": False, **kw}


def check_resume(trainer: Any, model: Any, data: Any, **kw: Any) -> None:
    """``verify_resume`` holds: stopped, saved, loaded and fitted on equals the uninterrupted run."""
    report = trainer.verify_resume(model, data, **fit_args(**kw))
    assert report, str(report)
    assert report.stopped_at and report.total_steps > report.stopped_at[0]
