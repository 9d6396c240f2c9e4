"""The step: what a user extends to change how a batch is trained on. Pure functions only.

Three forms, from the least to the most to write (``docs/custom_training.md`` walks
through each with real programs):

* ``loss="softmax_cross_entropy"`` or ``loss=fn(outputs, targets)`` — the **simple form**:
  the model is called on the batch's inputs and the loss sees its outputs and the targets,
  one value per example, averaged over the real examples.
* ``loss=fn(model, batch, ctx)`` — the **full form**: the whole batch; ``model(...)``
  called however the module wants to be called (mode flag, RNG streams and mutable
  collections handled); ``ctx.params`` (the params being differentiated), ``ctx.sown``,
  ``ctx.key`` / ``ctx.rng(name)`` / ``ctx.rngs``, ``ctx.mask``. It returns the loss it
  normalises itself — a scalar, or ``Average(total, count)`` for a ratio of sums — and
  optionally a dict of metrics: ``return loss, {"accuracy": ...}``.
* ``step=MyStep()``, a ``jaxfit.Step`` — a **custom step**: ``init``, ``train_step`` and
  ``eval_step`` over a state you define (several optimizers, EMA params, a loss scale).

The simple form is implemented on the full one, and the full one is a ``Step``
(``LossStep``): the engine (``jaxfit.engine``) drives every form the same way — jitted,
donated, fused for ``steps_per_execution``, checkpointed.
"""

from __future__ import annotations

import inspect
import zlib
from typing import TYPE_CHECKING, Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from flax.core import meta as nn_meta

from jaxfit._reduce import resolve
from jaxfit._tree import aval_key, batch_rows, same_structure
from jaxfit.data import split_dict
from jaxfit.errors import ConfigError, DataError
from jaxfit.losses import LOSSES
from jaxfit.metrics import Average, MetricState, as_state, resolve_metric
from jaxfit.models import ModelAdapter

FORMS = (
    "loss= takes a name (e.g. \"softmax_cross_entropy\"), fn(outputs, targets) -> one value "
    "per example or a batch mean (the simple form), or fn(model, batch, ctx) -> loss or "
    "(loss, metrics) (the full form); logic that one loss and one update cannot say is a "
    "custom step: Trainer(step=MyStep()) with a jaxfit.Step subclass"
)


def stream_key(key: jax.Array, name: str) -> jax.Array:
    """The key of RNG stream ``name`` for a step whose key is ``key``.

    ``"dropout"`` is the step key itself; every other stream folds in a hash of its name,
    so streams never share randomness. The step key of train step ``k`` is
    ``fold_in(fold_in(key(seed), 1), k)``: a hand-written loop reproduces any of them.
    """
    if name == "dropout":
        return key
    return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


@struct.dataclass
class StepContext:
    """What the engine hands a step besides the state and the batch (a pytree: traced).

    Attributes:
        key: this step's key, derived from the seed and the step number.
        step: the number of train steps completed before this one (int32, traced).
        mask: ``(B,)`` float32, 1 for real examples, 0 for padding; None when the batch
            has no single leading axis (a graph batch).
        train: True in training, False in evaluation and prediction.
    """

    key: jax.Array
    step: jax.Array
    mask: Any
    train: bool = struct.field(pytree_node=False)

    @property
    def weight(self) -> jax.Array:
        """The number of real examples (1 for a batch without a leading axis): what a scalar
        metric is weighted by when epochs are averaged."""
        return jnp.ones((), jnp.float32) if self.mask is None else jnp.sum(self.mask)

    def rng(self, name: str) -> jax.Array:
        """The key of RNG stream ``name`` (``stream_key``)."""
        return stream_key(self.key, name)

    @property
    def rngs(self) -> nnx.Rngs:
        """An ``nnx.Rngs`` seeded from this step's dropout stream, for nnx calls."""
        return nnx.Rngs(self.rng("dropout"))


@struct.dataclass
class TrainState:
    """The built-in step's state: what the optimizer trains and the model's other variables."""

    params: Any
    model_state: Any
    opt_state: Any

    if TYPE_CHECKING:  # flax.struct adds it at run time
        def replace(self, **changes: Any) -> TrainState: ...


class Step:
    """Custom training logic: pure functions over a state you define.

    Subclass and implement ``init``, ``train_step`` and ``eval_step`` (``predict_step``
    for ``trainer.predict``). The engine jits and donates them, fuses ``train_step`` for
    ``steps_per_execution``, checkpoints the state (any pytree of arrays) and resumes it
    bit for bit. Injected hyperparameters of every optimizer state inside it are
    ``trainer.hyperparams`` (qualified by path when a name is injected twice).

    Logs are a dict of scalars (averaged over the epoch, weighted by ``ctx.weight``) or
    metric states (``jaxfit.metrics.Average(total, count)``, ...), summed on the device and
    fetched once per epoch. ``train_step``'s ``"loss"`` is what ``on_train_batch_end`` gets.

    Example (EMA params used for evaluation):
        >>> class EMAStep(jaxfit.Step):  # doctest: +SKIP
        ...     def init(self, model, batch, key):
        ...         params = model.init(key, batch[0])["params"]
        ...         return {"params": params, "ema": params, "opt": tx.init(params)}
        ...     def train_step(self, state, batch, ctx):
        ...         x, y = batch
        ...         loss, g = jax.value_and_grad(lambda p: xent(model.apply({"params": p}, x), y))(state["params"])
        ...         updates, opt = tx.update(g, state["opt"], state["params"])
        ...         params = optax.apply_updates(state["params"], updates)
        ...         ema = optax.incremental_update(params, state["ema"], 0.01)
        ...         return {"params": params, "ema": ema, "opt": opt}, {"loss": loss}
        ...     def eval_step(self, state, batch, ctx):
        ...         x, y = batch
        ...         return {"loss": xent(model.apply({"params": state["ema"]}, x), y)}
    """

    def init(self, model: Any, batch: Any, key: jax.Array) -> Any:
        """The initial state from the model given to ``fit`` and a first batch. Pure: it
        also runs under ``jax.eval_shape`` to build a template when a run is loaded."""
        raise NotImplementedError(f"{type(self).__name__}.init(model, batch, key) must return the initial state")

    def train_step(self, state: Any, batch: Any, ctx: StepContext) -> tuple[Any, Mapping[str, Any]]:
        """One training step: ``(new state, logs)``."""
        raise NotImplementedError(f"{type(self).__name__}.train_step(state, batch, ctx) must return (state, logs)")

    def eval_step(self, state: Any, batch: Any, ctx: StepContext) -> Mapping[str, Any]:
        """The logs of one evaluation batch (``val_`` logs in ``fit``)."""
        raise NotImplementedError(f"{type(self).__name__}.eval_step(state, batch, ctx) must return logs")

    def predict_step(self, state: Any, batch: Any, ctx: StepContext) -> Any:
        """Model outputs for one batch of inputs (``trainer.predict``)."""
        raise ConfigError(f"{type(self).__name__} has no predict_step: implement it to use trainer.predict")

    def params(self, state: Any) -> Any:
        """What ``trainer.params`` shows: ``state.params`` or ``state["params"]``."""
        if isinstance(state, Mapping) and "params" in state:
            return state["params"]
        if hasattr(state, "params"):
            return state.params
        raise ConfigError(f"{type(self).__name__}: the state has no params; override Step.params(state)")

    def replace_params(self, state: Any, params: Any) -> Any:
        if isinstance(state, Mapping) and "params" in state:
            return {**state, "params": params}
        return state.replace(params=params)


def _required_positional(fn: Callable) -> int | None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in sig.parameters.values()):
        return None
    return sum(1 for p in sig.parameters.values() if p.kind in kinds and p.default is p.empty)


def loss_form(loss: Any) -> str:
    """``"simple"`` or ``"full"`` for a loss name or callable; ConfigError naming the forms."""
    if isinstance(loss, str):
        return "simple"
    if not callable(loss):
        raise ConfigError(f"loss must be a name or a function, got {loss!r}. {FORMS}")
    if getattr(loss, "_jaxfit_per_example", False):
        return "simple"
    n = _required_positional(loss)
    if n == 2:
        return "simple"
    if n == 3:
        return "full"
    name = getattr(loss, "__name__", type(loss).__name__)
    raise ConfigError(
        f"loss {name} takes {n if n is not None else 'a variable number of'} required positional "
        f"arguments; {FORMS}."
    )


class Model:
    """The model as the full-form loss calls it: ``model(*inputs, **kw)``.

    The mode flag the module declares (``train``/``training``/``deterministic``), its RNG
    streams (and ``rngs`` for an nnx ``__call__`` taking it) are filled in unless given;
    mutable collections (batch statistics) are updated, and what the call sowed is in
    ``ctx.sown`` afterwards. ``model.method("name", ...)`` calls another method.
    """

    def __init__(self, ctx: LossContext) -> None:
        self._ctx = ctx

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._ctx._call(None, args, kwargs)

    def method(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call the module's method ``name`` (linen ``apply(method=...)``; nnx attribute)."""
        return self._ctx._call(name, args, kwargs)


class LossContext:
    """``ctx`` of the full-form loss: the step's context plus the model's variables.

    Attributes:
        params: the params being differentiated (for an L2 penalty).
        model_state: the model's other variables, updated by each train call.
        sown: ``{collection: values}`` sown by the last model call (linen ``self.sow``,
            nnx ``nnx.Intermediate``), e.g. ``ctx.sown["intermediates"]``.
        key, step, mask, train, weight, rng(name), rngs: as in ``StepContext``.
    """

    def __init__(self, base: StepContext, adapter: ModelAdapter, params: Any, model_state: Any) -> None:
        self.base, self.adapter = base, adapter
        self.params, self.model_state = params, model_state
        self.sown: dict[str, Any] = {}
        self.model = Model(self)

    key = property(lambda self: self.base.key)
    step = property(lambda self: self.base.step)
    mask = property(lambda self: self.base.mask)
    train = property(lambda self: self.base.train)
    weight = property(lambda self: self.base.weight)
    rngs = property(lambda self: self.base.rngs)

    def rng(self, name: str) -> jax.Array:
        return self.base.rng(name)

    def _call(self, method: str | None, args: tuple, kwargs: dict) -> Any:
        out, self.model_state, self.sown = self.adapter.call(
            self.params, self.model_state, args, kwargs, train=self.train, key=self.key,
            stream_key=stream_key, method=method)
        return out


class _InitContext(LossContext):
    """The loss's context while ``LossStep.init`` runs it: the first model call initialises."""

    def _call(self, method: str | None, args: tuple, kwargs: dict) -> Any:
        if self.params is not None:
            return super()._call(method, args, kwargs)
        a = self.adapter
        kw = {**a.flag_kwargs(False, kwargs), **kwargs} if method is None else kwargs
        out, variables = a.init_streams(
            # mutable=True: linen's init leaves "intermediates" out, and the loss reads ctx.sown.
            self.key, lambda rngs: a.module.init_with_output(rngs, *args, method=method, mutable=True, **kw))
        self.params, self.model_state = a.split_variables(variables)
        self.sown = {name: variables[name] for name in a.sown if name in variables}
        return out


def _loss_value(loss: Any) -> jax.Array:
    """The scalar to differentiate: a scalar as is, ``Average`` as total / count."""
    if isinstance(loss, Average):
        count = jnp.asarray(loss.count, jnp.float32)
        # Dividing by 1 where count is 0 keeps the gradient finite (no where-NaN).
        return jnp.asarray(loss.total) / jnp.where(count > 0, count, 1.0).astype(jnp.asarray(loss.total).dtype)
    v = jnp.asarray(loss)
    if v.shape != ():
        raise DataError(
            f"the loss returned shape {v.shape}; the full-form loss returns the scalar it "
            "normalises itself (or jaxfit.metrics.Average(total, count)): reduce it, e.g. "
            "jnp.sum(per_token * weights) / jnp.sum(weights)"
        )
    return v


def split_result(result: Any, weight: jax.Array) -> tuple[jax.Array, dict[str, MetricState]]:
    """(scalar loss, logs as metric states) from what a full-form loss returned."""
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], Mapping):
        loss, metrics = result
    else:
        loss, metrics = result, {}
    if "loss" in metrics:
        raise ConfigError('the loss\'s metrics dict has a "loss" key: the first value returned is the loss')
    logs = {"loss": as_state(loss, weight) if not isinstance(loss, Average) else loss}
    logs.update({str(k): as_state(v, weight) for k, v in metrics.items()})
    return _loss_value(loss), logs


class LossStep(Step):
    """The built-in step: one loss (simple or full form), one optax update.

    Its state is a ``TrainState(params, model_state, opt_state)``.
    """

    def __init__(self, model: Any, optimizer: optax.GradientTransformation, loss: Any,
                 metrics: list[Any], *, input_keys: Any = None, target_keys: Any = None) -> None:
        self.adapter = model if isinstance(model, ModelAdapter) else ModelAdapter(model)
        self.tx = optimizer
        self.form = loss_form(loss)
        self.input_keys, self.target_keys = input_keys, target_keys
        self._outputs: dict[tuple, Any] = {}  # check_targets: the outputs' shape, by input shapes
        self.metric_fns: dict[str, Callable] = {}
        for spec in metrics:
            name, fn = resolve_metric(spec)
            if name in self.metric_fns or name in ("loss", "count"):
                raise ConfigError(f"metric name {name!r} is used twice; give the function a distinct __name__")
            self.metric_fns[name] = fn
        if self.form == "full":
            if self.metric_fns:
                raise ConfigError(
                    "Trainer(metrics=[...]) goes with the simple loss form fn(outputs, targets); a "
                    "full-form loss fn(model, batch, ctx) returns its metrics itself: "
                    "return loss, {\"accuracy\": ...}"
                )
            self.loss_name, self.loss_fn = getattr(loss, "__name__", "loss"), loss
        else:
            self.loss_name, per_example = resolve(loss, LOSSES, "loss")
            self.loss_fn = self._simple(per_example)

    # -- the simple form, on the full one ----------------------------------------
    def split(self, batch: Any, need_targets: bool = True) -> tuple[Any, Any]:
        """(inputs, targets) of a batch for the simple form: a dict by keys, a pair
        ``(inputs, targets)``; anything else is inputs alone."""
        if isinstance(batch, dict):
            return split_dict(batch, self.input_keys, self.target_keys, need_targets)
        if isinstance(batch, (tuple, list)) and len(batch) == 2 and not hasattr(batch, "_fields"):
            return batch[0], batch[1]
        if need_targets:
            raise DataError(
                f"the loss fn(outputs, targets) needs (inputs, targets) batches, got a "
                f"{type(batch).__name__} with no targets. Pass (x, y), a dict with a target key, "
                "or use the full form loss(model, batch, ctx) for self-supervised batches"
            )
        return batch, None

    def _simple(self, per_example: Callable) -> Callable:
        metric_fns = self.metric_fns

        def loss(model: Model, batch: Any, ctx: LossContext) -> Any:
            x, y = self.split(batch)
            args, kwargs = self.adapter.arguments(x)
            out = model(*args, **kwargs)
            per = per_example(out, y)
            mask = jnp.ones(per.shape[:1], jnp.float32) if ctx.mask is None else ctx.mask
            total = jnp.sum(per.astype(jnp.float32) * mask)
            out = jax.lax.stop_gradient(out)
            metrics = {name: fn(out, y, mask) if getattr(fn, "kind", None) else Average.of(fn(out, y), mask)
                       for name, fn in metric_fns.items()}
            return Average(total=total, count=jnp.sum(mask)), metrics

        loss.__name__ = self.loss_name
        return loss

    # -- the Step protocol ---------------------------------------------------------
    def init(self, model: Any, batch: Any, key: jax.Array) -> TrainState:
        if self.form == "full" and self.adapter.kind == "linen":
            params, model_state = self._init_by_loss(batch, key)
        else:
            inputs = self.split(batch, need_targets=False)[0] if self.form == "simple" else self.example_inputs(batch)
            params, model_state = self.adapter.init(key, inputs)
        return TrainState(params=params, model_state=model_state, opt_state=self.tx.init(params))

    def _init_by_loss(self, batch: Any, key: jax.Array) -> tuple[Any, Any]:
        """linen variables from the first model call the full-form loss makes, in evaluation
        mode: its arguments need not be in the batch (a VAE's sampling key ``ctx.rng("z")``)."""
        rows = batch_rows(batch)
        mask = None if rows is None else jnp.ones((rows,), jnp.float32)

        def run(batch: Any, key: jax.Array) -> tuple[Any, Any]:
            ctx = StepContext(key=key, step=jnp.zeros((), jnp.int32), mask=mask, train=False)
            lctx = _InitContext(ctx, self.adapter, None, {})
            self.loss_fn(lctx.model, batch, lctx)
            if lctx.params is None:
                raise ConfigError(f"the loss {self.loss_name} never calls model(...): nothing to initialise")
            return lctx.params, lctx.model_state

        return jax.jit(run)(batch, key)

    def example_inputs(self, batch: Any) -> Any:
        """The model's inputs in a batch for the full form, for linen's init: the inputs
        part of an (inputs, targets) pair or dict, else the batch."""
        return self.split(batch, need_targets=False)[0]

    def _loss(self, params: Any, model_state: Any, batch: Any, ctx: StepContext) -> tuple[jax.Array, Any]:
        lctx = LossContext(ctx, self.adapter, params, model_state)
        value, logs = split_result(self.loss_fn(lctx.model, batch, lctx), ctx.weight)
        self._order = list(logs)  # trace time: grad's aux comes back with sorted keys
        return value, (logs, lctx.model_state)

    def train_step(self, state: TrainState, batch: Any, ctx: StepContext) -> tuple[TrainState, dict]:
        grad_fn = jax.value_and_grad(self._loss, has_aux=True)
        (_, (logs, model_state)), grads = grad_fn(state.params, state.model_state, batch, ctx)
        logs = {k: logs[k] for k in self._order}
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return state.replace(params=params, model_state=model_state, opt_state=opt_state), logs

    def eval_step(self, state: TrainState, batch: Any, ctx: StepContext) -> dict:
        _, (logs, _) = self._loss(state.params, state.model_state, batch, ctx)
        return logs

    def predict_step(self, state: TrainState, batch: Any, ctx: StepContext) -> Any:
        args, kwargs = self.adapter.arguments(batch)
        return self.adapter.call(state.params, state.model_state, args, kwargs, train=False,
                                 key=ctx.key, stream_key=stream_key)[0]

    def check_targets(self, data: Any, state: TrainState, where: str = "training data") -> None:
        """Integer class labels must index the model's outputs: checked once, vectorised,
        before the first step (out-of-range labels train to NaN or silently wrong)."""
        if self.form != "simple" or LOSSES.get(self.loss_name) is not LOSSES["softmax_cross_entropy"]:
            return
        try:
            x, y = self.split(data)
        except DataError:
            return
        y = getattr(y, "dtype", None) is not None and y
        if y is False or not jnp.issubdtype(y.dtype, jnp.integer):
            return
        head = jax.tree_util.tree_map(lambda a: a[:2], x)
        shapes = aval_key(state, head)  # each fit checks its labels: the model is traced once
        out = self._outputs.get(shapes) if shapes is not None else None
        if out is None:
            ctx = StepContext(key=jax.random.key(0), step=jnp.zeros((), jnp.int32), mask=None, train=False)
            out = jax.eval_shape(lambda s, b: self.predict_step(s, b, ctx), state, head)
            if shapes is not None:
                if len(self._outputs) >= 8:  # a run trains on one or two shapes: bounded
                    self._outputs.clear()
                self._outputs[shapes] = out
        classes = getattr(out, "shape", (None,))[-1]
        lo, hi = int(y.min()), int(y.max())
        if classes is not None and (lo < 0 or hi >= classes):
            raise DataError(
                f"{where}: integer labels range from {lo} to {hi}, but the model has "
                f"{classes} outputs, so labels must be in 0..{classes - 1}. Check the last "
                "layer's size (num_classes) or re-encode the labels (np.unique(y, return_inverse=True))."
            )

    def with_params(self, state: TrainState, given: Any) -> TrainState:
        """``state`` starting from ``given`` params (a whole tree, or the subtrees to
        replace: a pretrained backbone), with the optimizer state built for them."""
        # Params as flax.linen init returns them may be boxed (nn.Partitioned): the state's are plain.
        params = _merge_params(state.params, nn_meta.unbox(given), "params")
        return state.replace(params=params, opt_state=self.tx.init(params))


def _merge_params(current: Any, given: Any, where: str) -> Any:
    if isinstance(given, Mapping) and isinstance(current, Mapping):
        unknown = sorted(set(given) - set(current))
        if unknown:
            raise ConfigError(
                f"initial_params: {where} has no entry {unknown[0]!r}; the model's {where} has "
                f"{sorted(current)}"
            )
        return {k: _merge_params(v, given[k], f"{where}.{k}") if k in given else v for k, v in current.items()}
    if not same_structure(current, given):
        raise ConfigError(f"initial_params: {where} has another structure than the model's params")

    def check(cur: Any, new: Any) -> Any:
        new = jnp.asarray(new)
        if new.shape != cur.shape:
            raise ConfigError(f"initial_params: {where} has shape {new.shape}, the model expects {cur.shape}")
        # A copy: the train step donates its state, which must not delete the caller's arrays.
        return jnp.array(new, dtype=cur.dtype, copy=True)

    return jax.tree_util.tree_map(check, current, given)
