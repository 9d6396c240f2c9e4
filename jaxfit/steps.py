"""The training state and the jitted train / eval / predict steps.

One step function, written once for a single batch, is reused three ways: jitted alone,
fused ``k`` at a time in a ``lax.scan`` (``steps_per_execution``), and — because it is a
pure function of pytrees — under a device mesh by passing shardings to ``jax.jit``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import optax
from flax import struct

from jaxfit.hyperparams import HyperparamSlot, with_values
from jaxfit.models import ModelAdapter


@struct.dataclass
class TrainState:
    """Everything the train step reads and writes; donated to every step."""

    step: jax.Array  # int32: optimizer steps completed since the run began
    params: Any
    model_state: Any
    opt_state: Any
    hp_scales: dict  # {hyperparameter: float32 multiplier of its attached schedule}
    metrics: dict  # on-device sums for the epoch under way: count, loss, each metric


def zero_metrics(names: list[str]) -> dict:
    return _zeros_fn(tuple(names))()


@functools.lru_cache(maxsize=None)
def _zeros_fn(names: tuple[str, ...]) -> Callable[[], dict]:
    # One dispatch for all accumulators instead of one jnp.zeros each: runs every epoch.
    return jax.jit(lambda: {k: jnp.zeros((), jnp.float32) for k in ["count", "loss", *names]})


def _accumulate(acc: dict, per_loss: jax.Array, outputs: Any, targets: Any, mask: jax.Array,
                metric_fns: dict[str, Callable]) -> dict:
    new = dict(acc)
    new["count"] = acc["count"] + mask.sum()
    new["loss"] = acc["loss"] + jnp.sum(per_loss.astype(jnp.float32) * mask)
    for name, fn in metric_fns.items():
        new[name] = acc[name] + jnp.sum(fn(outputs, targets).astype(jnp.float32) * mask)
    return new


def masked_mean(per_example: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(per_example * mask.astype(per_example.dtype)) / jnp.maximum(mask.sum(), 1.0).astype(per_example.dtype)


class StepBuilder:
    """Builds the pure step functions for one (model, optimizer, loss, metrics) setup."""

    def __init__(self, adapter: ModelAdapter, tx: optax.GradientTransformation, loss_fn: Callable,
                 metric_fns: dict[str, Callable], base_key: jax.Array) -> None:
        self.adapter = adapter
        self.tx = tx
        self.loss_fn = loss_fn
        self.metric_fns = metric_fns
        self.base_key = base_key

    def train_step(self, slots: dict[str, HyperparamSlot], schedules: dict[str, Callable]) -> Callable:
        """``step(state, x, y, mask) -> (state, loss)`` for one batch."""
        adapter, tx, loss_fn, metric_fns, base_key = self.adapter, self.tx, self.loss_fn, self.metric_fns, self.base_key

        def step(state: TrainState, x: Any, y: Any, mask: jax.Array) -> tuple[TrainState, jax.Array]:
            # The dropout key of step k depends on (seed, k) alone: nothing to carry or save.
            rng = jax.random.fold_in(base_key, state.step)

            def objective(params):
                out, new_ms = adapter.apply(params, state.model_state, x, train=True, rng=rng)
                per = loss_fn(out, y)
                return masked_mean(per, mask), (out, new_ms, per)

            (loss, (out, new_ms, per)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
            opt_state = state.opt_state
            if schedules:
                values = {n: fn(state.step) * state.hp_scales[n] for n, fn in schedules.items()}
                opt_state = with_values(opt_state, slots, values)
            updates, opt_state = tx.update(grads, opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            metrics = _accumulate(state.metrics, per, jax.lax.stop_gradient(out), y, mask, metric_fns)
            new = state.replace(step=state.step + 1, params=params, model_state=new_ms,
                                opt_state=opt_state, metrics=metrics)
            return new, loss

        return step

    @staticmethod
    def fused(step: Callable, unroll: int | bool | str,
              on_choice: Callable[[int | bool], None] | None = None) -> Callable:
        """``k`` steps in one ``lax.scan`` over stacked batches ``(k, B, ...)``.

        ``unroll="auto"`` picks the unroll at trace time with ``auto_unroll`` and reports
        it to ``on_choice``.
        """

        def multi(state, xs, ys, masks):
            def body(s, batch):
                s, loss = step(s, *batch)
                return s, loss

            chosen = unroll
            if unroll == "auto":
                one = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype),
                                             (xs, ys, masks))
                chosen = auto_unroll(step, state, *one)
            if on_choice is not None:
                on_choice(chosen)
            state, losses = jax.lax.scan(body, state, (xs, ys, masks), unroll=chosen)
            return state, losses[-1]

        return multi

    def eval_step(self) -> Callable:
        """``step(params, model_state, acc, x, y, mask) -> acc`` in evaluation mode."""
        adapter, loss_fn, metric_fns = self.adapter, self.loss_fn, self.metric_fns

        def step(params, model_state, acc, x, y, mask):
            out, _ = adapter.apply(params, model_state, x, train=False, rng=None)
            return _accumulate(acc, loss_fn(out, y), out, y, mask, metric_fns)

        return step

    def predict_step(self) -> Callable:
        adapter = self.adapter

        def step(params, model_state, x):
            return adapter.apply(params, model_state, x, train=False, rng=None)[0]

        return step


def _primitives(jaxpr: Any) -> Iterator[str]:
    """Names of every primitive in ``jaxpr`` and in the jaxprs nested in its equations."""
    for eqn in jaxpr.eqns:
        yield eqn.primitive.name
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(inner, "eqns"):
                    yield from _primitives(inner)


def auto_unroll(step: Callable, *example: Any) -> int | bool:
    """The ``lax.scan`` unroll that keeps ``steps_per_execution`` at least as fast as single steps.

    XLA:CPU runs a convolution inside a rolled loop on a slow path (25-50x slower than the
    same convolution outside a loop, jax#12868): a step with a convolution is unrolled fully
    there. Everything else stays rolled: unrolling compiles ``k`` copies of the step, takes
    longer to compile and measured no faster on dense models.
    """
    if jax.default_backend() != "cpu":
        return 1
    closed = jax.make_jaxpr(step)(*example)
    return True if any(p.startswith("conv_general") for p in _primitives(closed.jaxpr)) else 1


def jit_train(step: Callable) -> Callable:
    # The whole TrainState is donated: XLA updates params and optimizer state in place.
    return jax.jit(step, donate_argnums=(0,))


def jit_eval(step: Callable) -> Callable:
    return jax.jit(step, donate_argnums=(2,))
