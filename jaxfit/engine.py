"""The engine: a ``Step`` turned into jitted, donated programs over one state pytree.

The loop (``jaxfit.trainer``) drives three compiled programs built here from whichever
form the user chose (``jaxfit.step``): the train step — alone, or ``k`` at a time in a
``lax.scan`` (``steps_per_execution``) — the evaluation step and the prediction step.
Around the user's ``train_step`` the engine adds only what every form needs: the step
key, the hyperparameter schedules attached by callbacks, and the epoch's metric sums.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterator

import jax
import jax.numpy as jnp
from flax import struct

from jaxfit._placement import state_shardings, unalias, unbox_linen
from jaxfit._tree import aval_key, batch_rows, same_structure
from jaxfit.errors import ConfigError, ShapeError
from jaxfit.hyperparams import HyperparamSlot, find_slots, node_at, with_values
from jaxfit.metrics import Average, MetricState, as_state, merge
from jaxfit.step import Step, StepContext


@struct.dataclass
class EngineState:
    """Everything the train step reads and writes; donated to every step."""

    step: jax.Array  # int32: train steps completed since the run began
    state: Any  # the step's own state (TrainState for the built-in step)
    hp_scales: dict  # {hyperparameter: float32 multiplier of its attached schedule}
    metrics: dict  # {log name: metric state}: on-device sums for the epoch under way

    if TYPE_CHECKING:  # flax.struct adds it at run time
        def replace(self, **changes: Any) -> EngineState: ...


def _is_state(x: Any) -> bool:
    return isinstance(x, MetricState)


def scalar_loss(logs: dict) -> jax.Array | None:
    """The loss of one step as a device scalar, for ``on_train_batch_end``."""
    loss = logs.get("loss")
    if isinstance(loss, Average):
        count = jnp.asarray(loss.count, jnp.float32)
        return jnp.asarray(loss.total, jnp.float32) / jnp.where(count > 0, count, 1.0)
    return None if loss is None else jnp.asarray(loss, jnp.float32)


class Engine:
    """Builds and caches the compiled programs of one ``Step`` for one run.

    Args:
        step: the ``Step`` (``LossStep`` for a loss, or the user's own).
        seed: the run's seed; the key of train step ``k`` is
            ``fold_in(fold_in(key(seed), 1), k)``, of evaluation batch ``i``
            ``fold_in(fold_in(key(seed), 2), i)``.
    """

    def __init__(self, step: Step, seed: int) -> None:
        self.step = step
        root = jax.random.key(seed)
        self.init_key = root
        self.train_key = jax.random.fold_in(root, 1)
        self.eval_key = jax.random.fold_in(root, 2)
        self.trace_counts = {"train": 0, "eval": 0, "predict": 0}
        self.slots: dict[str, HyperparamSlot] = {}
        self._compiled: dict[Any, Callable] = {}
        self._zeros: dict[str, Callable] = {}
        self.templates: dict[str, Any] = {}
        # The (step, state, batch) shapes whose logs are known to match the templates: a fit
        # that trains on them again traces nothing before its first step (see check).
        self._checked: set[tuple] = set()
        self.order: dict[str, list[str]] = {}
        # On a mesh (init_state with a plan): the EngineState's NamedSharding tree, pinned
        # as the programs' out_shardings so the layout never drifts (or gathers).
        self.shardings: EngineState | None = None
        self.replicated: Any = None

    # ------------------------------------------------------------------ state
    def init_state(self, model: Any, batch: Any, *, abstract: bool = False,
                   plan: Any = None) -> EngineState:
        """The initial ``EngineState`` for ``model`` and an example batch; with
        ``abstract=True`` only its shapes and dtypes (nothing is computed or compiled).

        Linen partitioning boxes (``nn.Partitioned``) are unboxed: the step sees arrays.
        With a ``plan`` (``jaxfit.sharding.ShardingPlan``), ``self.shardings`` becomes the
        state's layout (params as annotated, optimizer state and EMA copies like their
        params) and the concrete state is computed directly sharded.
        """
        fn = lambda b: self.step.init(model, b, self.init_key)  # noqa: E731
        if plan is None and not abstract:
            return self.wrap(unalias(unbox_linen(fn(batch))), batch)
        boxed = jax.eval_shape(fn, batch)
        es = self.wrap(unbox_linen(boxed), batch, abstract=True)
        if plan is not None:
            try:
                params = self.step.params(boxed)
            except ConfigError:  # a custom state without params: match leaves to each other
                params = boxed
            self.shardings = state_shardings(plan, es.replace(state=boxed), es, params)
            self.replicated = plan.replicated
        if abstract:
            return es
        # The jitted init writes every shard straight onto its device.
        assert self.shardings is not None
        init = jax.jit(lambda b: unbox_linen(fn(b)), out_shardings=self.shardings.state)
        return EngineState(step=jnp.zeros((), jnp.int32), state=unalias(init(batch)),
                           hp_scales={n: jnp.ones((), jnp.float32) for n in self.slots},
                           metrics=self.zero_metrics("train"))

    def wrap(self, state: Any, batch: Any, *, abstract: bool = False) -> EngineState:
        """An ``EngineState`` around the step's state, with zeroed metric sums."""
        self.slots = find_slots(state)
        scales = {n: jnp.ones((), jnp.float32) for n in self.slots}
        es = EngineState(step=jnp.zeros((), jnp.int32), state=state, hp_scales=scales, metrics={})
        self._learn_templates(es, batch)
        if abstract:
            es = jax.eval_shape(lambda e: e, es)
            return es.replace(metrics=jax.eval_shape(self._zeros_fn("train")))
        return es.replace(metrics=self.zero_metrics("train"))

    def _learn_templates(self, es: EngineState, batch: Any) -> None:
        """The structure of the train and eval logs, from tracing both steps abstractly."""
        mask = _example_mask(batch)
        ctx_t = StepContext(key=self.train_key, step=es.step, mask=mask, train=True)
        ctx_e = StepContext(key=self.eval_key, step=es.step, mask=mask, train=False)

        def train_logs(state, b, ctx):
            logs = self._as_states(self.step.train_step(state, b, ctx)[1], ctx)
            self.order["train"] = list(logs)  # pytrees sort dict keys: keep the step's order
            return logs

        def eval_logs(state, b, ctx):
            logs = self._as_states(self.step.eval_step(state, b, ctx), ctx)
            self.order["eval"] = list(logs)
            return logs

        self.templates["train"] = jax.eval_shape(train_logs, es.state, batch, ctx_t)
        self.templates["eval"] = jax.eval_shape(eval_logs, es.state, batch, ctx_e)
        self._zeros.clear()
        self._checked.clear()
        shapes = aval_key(es.state, batch)
        if shapes is not None:  # a check on these shapes would trace the same
            self._checked.update({("train", shapes), ("eval", shapes)})

    def check(self, es: EngineState, batch: Any, which: str) -> None:
        """Trace the train or eval step on ``batch`` abstractly (errors before any work) and
        check that its logs have the structure the epoch sums were made for. Shapes
        already checked (every fit of a run checks its first batch) are not traced again:
        the step's trace depends on nothing else, as jit's cache assumes too."""
        shapes = aval_key(es.state, batch)
        key = None if shapes is None else (which, shapes)
        if key is not None and key in self._checked:
            return
        mask = _example_mask(batch)
        ctx = StepContext(key=self.train_key, step=es.step, mask=mask, train=which == "train")
        run = self.step.train_step if which == "train" else self.step.eval_step

        def logs(state, b, c):
            out = run(state, b, c)
            return self._as_states(out[1] if which == "train" else out, c)

        got = jax.eval_shape(logs, es.state, batch, ctx)
        want = self.templates[which]
        if not same_structure(got, want):
            raise ShapeError(
                f"the {which} step returns logs {sorted(got)} for this batch, but "
                f"{sorted(want)} for the first one: return the same keys for every batch"
            )
        if key is not None:
            self._checked.add(key)

    @staticmethod
    def _as_states(logs: Any, ctx: StepContext) -> dict[str, MetricState]:
        return {str(k): as_state(v, ctx.weight) for k, v in dict(logs).items()}

    def _zeros_fn(self, which: str) -> Callable[[], dict]:
        fn = self._zeros.get(which)
        if fn is None:
            template = self.templates[which]
            # One dispatch for all accumulators instead of one jnp.zeros each: runs every epoch.
            fn = self._zeros[which] = jax.jit(
                lambda: jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), template))
        return fn

    def zero_metrics(self, which: str = "train") -> dict:
        return self._zeros_fn(which)()

    def log_names(self, which: str = "train") -> list[str]:
        return list(self.order.get(which, []))

    def compute(self, which: str, metrics: dict) -> dict[str, float]:
        """Host floats from the fetched metric sums, in the order the step returned them."""
        host = jax.device_get(metrics)
        return {name: float(host[name].compute()) for name in self.order[which]}

    # ---------------------------------------------------------------- programs
    def train_fn(self, k: int, schedules: dict[str, Callable], unroll: Any,
                 on_unroll: Callable[[Any], None] | None = None) -> Callable:
        """``fn(es, batch, mask) -> (es, loss)``; ``k > 1``: stacked ``(k, B, ...)`` batches."""
        key = ("train", k, tuple((n, id(f)) for n, f in sorted(schedules.items())))
        fn = self._compiled.get(key)
        if fn is None:
            one = self._train_one(dict(schedules))
            body = one if k == 1 else _fused(one, unroll, on_unroll)

            def counted(*args):
                self.trace_counts["train"] += 1  # runs at trace time only
                return body(*args)

            # The whole EngineState is donated: XLA updates params and optimizer state in place.
            # keep_unused: a leaf the step overwrites without reading (a scheduled learning
            # rate) would otherwise be pruned from the inputs, and jax's donation, which pairs
            # outputs with donated inputs of the same shape in order, would then pair every
            # later scalar with its neighbour's buffer: XLA inserts a chain of ~15 copies
            # (measured: 3 context switches per step, as slow as no donation on W1).
            pinned: dict[str, Any] = {} if self.shardings is None else {
                "out_shardings": (self.shardings, self.replicated)}
            fn = self._compiled[key] = jax.jit(counted, donate_argnums=(0,), keep_unused=True, **pinned)
        return fn

    def _train_one(self, schedules: dict[str, Callable]) -> Callable:
        step, slots, base = self.step, self.slots, self.train_key
        # On one XLA:CPU device (see _after); on a mesh the tie would read a sharded leaf.
        tie_count = self.shardings is None and jax.default_backend() == "cpu"

        def one(es: EngineState, batch: Any, mask: Any) -> tuple[EngineState, Any]:
            # The key of step k depends on (seed, k) alone: nothing to carry or save.
            ctx = StepContext(key=jax.random.fold_in(base, es.step), step=es.step, mask=mask, train=True)
            state = apply_schedules(es.state, slots, schedules, es.hp_scales, es.step)
            state, logs = step.train_step(state, batch, ctx)
            logs = self._as_states(logs, ctx)
            metrics = merge(es.metrics, jax.lax.stop_gradient(logs))
            count = _after(es.step + 1, (metrics, state)) if tie_count else es.step + 1
            return es.replace(step=count, state=state, metrics=metrics), scalar_loss(logs)

        return one

    def eval_fn(self) -> Callable:
        """``fn(state, acc, batch, mask, index) -> acc`` (``acc`` donated)."""
        fn = self._compiled.get("eval")
        if fn is None:
            step, base = self.step, self.eval_key

            def run(state, acc, batch, mask, index):
                self.trace_counts["eval"] += 1
                ctx = StepContext(key=jax.random.fold_in(base, index), step=index, mask=mask, train=False)
                return merge(acc, self._as_states(step.eval_step(state, batch, ctx), ctx))

            pinned: dict[str, Any] = {} if self.shardings is None else {"out_shardings": self.replicated}
            fn = self._compiled["eval"] = jax.jit(run, donate_argnums=(1,), **pinned)
        return fn

    def predict_fn(self) -> Callable:
        """``fn(state, batch, mask, index) -> outputs``."""
        fn = self._compiled.get("predict")
        if fn is None:
            step, base = self.step, self.eval_key

            def run(state, batch, mask, index):
                self.trace_counts["predict"] += 1
                ctx = StepContext(key=jax.random.fold_in(base, index), step=index, mask=mask, train=False)
                return step.predict_step(state, batch, ctx)

            fn = self._compiled["predict"] = jax.jit(run)
        return fn

    def clear(self) -> None:
        self._compiled.clear()


def apply_schedules(state: Any, slots: dict[str, HyperparamSlot], schedules: dict[str, Callable],
                    scales: dict, step: Any) -> Any:
    """``state`` with each scheduled hyperparameter set to ``schedule(count) * scale``.

    ``count`` is the optimizer's own update count (the ``count`` of its
    ``inject_hyperparams`` state), exactly what ``inject_hyperparams(opt)(name=schedule)``
    would use: inside ``optax.MultiSteps`` it advances once per real update, not per
    micro-batch. A schedule attached with ``count="steps"`` gets the train-step count.
    """
    if not schedules:
        return state
    values = {}
    for name, fn in schedules.items():
        node = node_at(state, slots[name].node_path)
        count = step if getattr(fn, "steps", False) else node.count
        values[name] = fn(count) * scales[name]
    return with_values(state, slots, values)


def _after(value: jax.Array, results: Any) -> jax.Array:
    """``value`` unchanged, but computed only once the last leaf of ``results`` is.

    XLA:CPU runs a program's thunks concurrently when several are ready at once and
    hands some to another thread. A lone ``step + 1``, which depends only on an input, is
    ready at the start next to the forward pass: measured on W1, ~3 context switches per
    step and ~25% of a ~200 us step. Tied to the step's last result by a term that is 0
    for every value (``x != x`` and ``x == x`` are never both true; XLA does not fold it),
    it runs at the end, on the thread already running the step.
    """
    leaves = [a for a in jax.tree_util.tree_leaves(results)
              if hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.inexact) and a.size]
    if not leaves:
        return value
    x = jnp.ravel(leaves[-1])[0]
    return value + ((x != x) & (x == x)).astype(value.dtype)


def _example_mask(batch: Any) -> Any:
    rows = batch_rows(batch)
    return None if rows is None else jax.ShapeDtypeStruct((rows,), jnp.float32)



def _fused(one: Callable, unroll: Any, on_unroll: Callable[[Any], None] | None) -> Callable:
    """``k`` steps in one ``lax.scan`` over stacked batches ``(k, B, ...)``."""

    def multi(es, batches, masks):
        def body(carry, item):
            return one(carry, *item)

        chosen = unroll
        if unroll == "auto":
            single = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), (batches, masks))
            chosen = auto_unroll(one, es, *single)
        if on_unroll is not None:
            on_unroll(chosen)
        es, losses = jax.lax.scan(body, es, (batches, masks), unroll=chosen)
        return es, None if losses is None else losses[-1]

    return multi


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
