"""``Trainer``: a Keras-like ``fit`` loop over jitted steps, dispatching to callbacks."""

from __future__ import annotations

import contextlib
import functools
import math
import signal
import threading
import uuid
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxfit import _tree
from jaxfit._reduce import resolve, shape_of
from jaxfit._fusion import FusionChooser
from jaxfit.callback import Callback, CallbackList
from jaxfit.data import Execution, make_source
from jaxfit.errors import ConfigError, DataError, MonitorError, Preempted, ShapeError
from jaxfit.history import History
from jaxfit.hyperparams import HyperParams, HyperparamSlot, find_slots, place_like
from jaxfit.losses import LOSSES
from jaxfit.metrics import resolve_metric
from jaxfit.models import ModelAdapter
from jaxfit.steps import StepBuilder, TrainState, jit_eval, jit_train, zero_metrics

STATE_FORMAT = 1


class Trainer:
    """Trains a flax model with an optax optimizer, driving callbacks around jitted steps.

    Args:
        optimizer: an optax ``GradientTransformation``. Hyperparameters wrapped with
            ``optax.inject_hyperparams`` can be read and written through
            ``trainer.hyperparams`` and driven by ``LRScheduler`` / ``ReduceOnPlateau``.
        loss: a loss name (``"softmax_cross_entropy"``, ``"sigmoid_binary_cross_entropy"``,
            ``"mse"``, ``"mae"``, ``"huber"``) or ``fn(outputs, targets)`` returning a
            scalar batch mean or one value per example.
        metrics: metric names (``"accuracy"``, ``"top_5_accuracy"``, ``"mse"``, ...) or
            functions ``fn(outputs, targets)``.
        seed: seeds initialisation, the per-epoch shuffle and the dropout keys.
        steps_per_execution: fuse this many steps into one compiled ``lax.scan``; batch
            hooks then fire once per execution, as in Keras.
        scan_unroll: ``unroll`` of that scan: an int, ``True`` (fully unrolled) or
            ``"auto"`` (the default), which unrolls fully on the CPU when the step has a
            convolution (XLA:CPU runs convolutions in a rolled loop 25-50x slower) and keeps
            the scan rolled otherwise; ``trainer.fit_config["scan_unroll"]`` says what was used.
            On a single device the first executions of each fit are timed fused and as single
            steps, and the faster way is kept: ``trainer.fit_config["execution"]``.
        input_keys, target_keys: for dict data, which keys are model inputs and targets
            (default: targets are ``"label"``/``"labels"``/``"y"``/``"target(s)"``, inputs
            the rest).
        handle_signals: while ``fit`` runs, turn SIGTERM / SIGINT into a clean stop that
            checkpoints (see ``fit``).
        mesh: a ``jax.sharding.Mesh`` for data-parallel training: the training state is
            replicated on every device and each batch is split along ``data_axis`` (the
            batch size must divide evenly). With several processes
            (``jax.distributed.initialize()`` first), every process runs the same ``fit``
            on the same data and feeds its own devices their rows of each global batch.
            ``None`` runs on the default device.
        data_axis: the mesh axis that batches are split along.

    Example:
        >>> import numpy as np, optax, flax.linen as nn
        >>> from jaxfit import Trainer
        >>> x, y = np.random.rand(64, 4).astype("float32"), np.arange(64) % 3
        >>> trainer = Trainer(optimizer=optax.inject_hyperparams(optax.sgd)(learning_rate=0.1),
        ...                   loss="softmax_cross_entropy", metrics=["accuracy"], seed=0)
        >>> history = trainer.fit(nn.Dense(3), (x, y), epochs=2, batch_size=16)
        >>> len(history.history["loss"])
        2
    """

    def __init__(
        self,
        optimizer: optax.GradientTransformation,
        loss: str | Callable = "softmax_cross_entropy",
        metrics: Sequence[str | Callable] = (),
        seed: int = 0,
        *,
        steps_per_execution: int = 1,
        scan_unroll: int | bool | str = "auto",
        input_keys: Sequence[str] | None = None,
        target_keys: Sequence[str] | None = None,
        handle_signals: bool = True,
        mesh: jax.sharding.Mesh | None = None,
        data_axis: str = "data",
    ) -> None:
        if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
            raise ConfigError(
                f"optimizer must be an optax GradientTransformation, got {type(optimizer).__name__}. "
                "Example: optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)"
            )
        if isinstance(metrics, (str, bytes)) or callable(metrics):
            metrics = [metrics]  # type: ignore[list-item]
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ConfigError(f"seed must be an int, got {seed!r}")
        if isinstance(steps_per_execution, bool) or not isinstance(steps_per_execution, int) or steps_per_execution < 1:
            raise ConfigError(f"steps_per_execution must be an int >= 1, got {steps_per_execution!r}")
        if scan_unroll != "auto" and (not isinstance(scan_unroll, int) or scan_unroll < 1):
            raise ConfigError(f'scan_unroll must be "auto", True or an int >= 1, got {scan_unroll!r}')
        self.optimizer = optimizer
        self.loss = loss
        self.metrics = list(metrics)
        self.seed = int(seed)
        self.steps_per_execution = steps_per_execution
        self.scan_unroll = scan_unroll
        self.input_keys, self.target_keys = input_keys, target_keys
        self.handle_signals = handle_signals
        if mesh is not None and data_axis not in mesh.axis_names:
            raise ConfigError(f"data_axis {data_axis!r} is not an axis of the mesh {tuple(mesh.axis_names)}")
        if mesh is not None:
            # jax.make_mesh defaults to Explicit axes, under which flax layers (dropout's
            # select, for one) reject mixed shardings. The trainer places every array itself,
            # so it uses the mesh's devices with Auto axes and lets XLA propagate shardings.
            auto = (jax.sharding.AxisType.Auto,) * len(mesh.axis_names)
            mesh = jax.sharding.Mesh(mesh.devices, mesh.axis_names, axis_types=auto)
        self.mesh, self.data_axis = mesh, data_axis
        self.loss_name, self._loss_fn = resolve(loss, LOSSES, "loss")
        self._metric_fns: dict[str, Callable] = {}
        for spec in self.metrics:
            name, fn = resolve_metric(spec)
            if name in self._metric_fns or name in ("loss", "count"):
                raise ConfigError(f"metric name {name!r} is used twice; give the function a distinct __name__")
            self._metric_fns[name] = fn

        self.hyperparams = HyperParams(self)
        self.history = History()
        self.stop_training = False
        self.stop_reason: str | None = None
        self.callbacks = CallbackList([])
        self.trace_counts = {"train": 0, "eval": 0, "predict": 0}
        self._model: Any = None
        self._adapter: ModelAdapter | None = None
        self._state: TrainState | None = None
        self._input_spec: Any = None
        self._user_callbacks: list[Callback] = []
        self._fit_args: dict[str, Any] = {}
        self._schedules: dict[str, tuple[Callable, Any]] = {}
        self._slots: dict[str, HyperparamSlot] | None = None
        self._epochs_completed = 0
        self._epoch_under_way: int | None = None
        self.batch_in_epoch = 0
        self._step = 0
        self._compiled: dict[Any, Callable] = {}
        self._masks: dict[Any, jax.Array] = {}
        self._signal: str | None = None
        self.run_id: str | None = None
        self.resuming = False
        self.log_names: list[str] = []
        self.fit_config: dict[str, Any] = {}

    # ------------------------------------------------------------------ state
    @property
    def epoch(self) -> int:
        """The 1-based epoch under way; between fits, the number of completed epochs."""
        return self._epoch_under_way if self._epoch_under_way is not None else self._epochs_completed

    @property
    def step(self) -> int:
        """Optimizer steps completed since the run began (a host counter: never syncs)."""
        return self._step

    @property
    def model(self) -> Any:
        return self._model

    @property
    def state(self) -> TrainState:
        if self._state is None:
            raise ConfigError("the trainer has no state yet: call fit(model, data) first (or Trainer.load)")
        return self._state

    @property
    def params(self) -> Any:
        """The current params (device arrays; the next train step donates them, so copy
        with ``jax.device_get`` to keep them)."""
        return self.state.params

    @params.setter
    def params(self, value: Any) -> None:
        current = self.state.params
        if jax.tree_util.tree_structure(value) != jax.tree_util.tree_structure(current):
            raise ShapeError("new params must have the same tree structure as trainer.params")
        placed = jax.tree_util.tree_map(lambda new, old: place_like(np.asarray(new, old.dtype), old), value, current)
        self._state = self.state.replace(params=placed)

    @property
    def model_state(self) -> Any:
        return self.state.model_state

    @model_state.setter
    def model_state(self, value: Any) -> None:
        current = self.state.model_state
        placed = jax.tree_util.tree_map(lambda new, old: place_like(np.asarray(new, old.dtype), old), value, current)
        self._state = self.state.replace(model_state=placed)

    @property
    def opt_state(self) -> Any:
        return self.state.opt_state

    def _hp_slots(self) -> dict[str, HyperparamSlot]:
        if self._slots is None:
            # Before the model is known, read the structure from an init on a dummy param.
            self._slots = find_slots(self.optimizer.init(jnp.zeros((1,), jnp.float32)))
        return self._slots

    def _init_state(self, x: Any) -> None:
        """Create params, model state and optimizer state from an example batch."""
        assert self._adapter is not None
        key = jax.random.key(self.seed)
        params, model_state = self._adapter.init(key, x)
        opt_state = self.optimizer.init(params)
        self._slots = find_slots(opt_state)
        self._input_spec = jax.tree_util.tree_map(lambda a: (tuple(a.shape), str(a.dtype)), x)
        scales = {n: jnp.ones((), jnp.float32) for n in self._slots}
        self._state = self._place_state(TrainState(
            step=jnp.zeros((), jnp.int32), params=params, model_state=model_state, opt_state=opt_state,
            hp_scales=scales, metrics=zero_metrics(list(self._metric_fns))))
        self._step, self._epochs_completed, self.batch_in_epoch = 0, 0, 0
        # Names this run in its checkpoints, so a run directory is never taken over by another.
        self.run_id = self.run_id or uuid.uuid4().hex
        self._builder = StepBuilder(self._adapter, self.optimizer, self._loss_fn, self._metric_fns,
                                    jax.random.fold_in(key, 1))
        self._compiled.clear()
        self._masks.clear()

    # ---------------------------------------------------------- placement
    def _place_state(self, state: Any) -> Any:
        """Replicate the state over the mesh; without a mesh, leave placement to jax."""
        if self.mesh is None:
            return state
        from jax.sharding import NamedSharding, PartitionSpec

        return jax.device_put(state, NamedSharding(self.mesh, PartitionSpec()))

    def _place_batch(self, tree: Any, stacked: bool) -> Any:
        """Split a batch along the data axis of the mesh (a no-op without a mesh)."""
        if self.mesh is None or tree is None:
            return tree
        from jax.sharding import NamedSharding, PartitionSpec

        spec = PartitionSpec(None, self.data_axis) if stacked else PartitionSpec(self.data_axis)
        sharding = NamedSharding(self.mesh, spec)
        if jax.process_count() > 1:
            # Every process holds the same global batch (same data, seed and order); each
            # one hands its own devices their rows, whatever the mesh's device layout.
            return jax.tree_util.tree_map(
                lambda a: jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx]), tree)
        return jax.device_put(tree, sharding)

    def _check_divisible(self, batch: int) -> None:
        if self.mesh is None:
            return
        n = self.mesh.shape[self.data_axis]
        if batch % n:
            raise ConfigError(
                f"batch size {batch} does not split evenly over the {n} devices of mesh axis "
                f"{self.data_axis!r}: use a multiple of {n}"
            )

    def _set_model(self, model: Any) -> None:
        self._model = model
        self._adapter = ModelAdapter(model)
        self._state = None
        self._slots = None
        self.run_id = None
        self.history = History()
        self.stop_reason = None

    # -------------------------------------------------------------- checking
    def _check_shapes(self, x: Any, y: Any) -> None:
        """Evaluate model, loss and metrics abstractly on a batch: shape errors before training."""
        adapter, state = self._adapter, self.state

        def probe(params, model_state, x, y):
            out, _ = adapter.apply(params, model_state, x, train=False, rng=None)
            return out, self._loss_fn(out, y), {n: f(out, y) for n, f in self._metric_fns.items()}

        out, per, mets = jax.eval_shape(probe, state.params, state.model_state, x, y)
        batch = jax.tree_util.tree_leaves(x)[0].shape[0]
        for name, v in [(self.loss_name, per), *mets.items()]:
            if v.shape != (batch,):
                raise ShapeError(
                    f"{name} gave shape {v.shape} for model outputs {shape_of(out)} and targets "
                    f"{shape_of(y)}; expected one value per example ({batch},)"
                )

    def check_monitor(self, name: str, owner: Any = None) -> None:
        """Raise ``MonitorError`` unless ``name`` will be in the epoch logs."""
        if name in self.log_names:
            return
        who = f"{type(owner).__name__} monitors" if owner is not None else "monitored metric"
        hint = ""
        if name.startswith("val_") and not self.fit_config.get("has_validation"):
            hint = " `val_` metrics exist only when fit gets validation_data=."
        raise MonitorError(
            f"{who} {name!r}, which this run does not produce. Available: "
            f"{', '.join(self.log_names)}.{hint}"
        )

    # ------------------------------------------------------------ compiled
    def _train_fn(self, k: int) -> Callable:
        key = ("train", k, tuple((n, id(fn)) for n, (fn, _) in sorted(self._schedules.items())))
        fn = self._compiled.get(key)
        if fn is None:
            step = self._builder.train_step(self._hp_slots(), {n: f for n, (f, _) in self._schedules.items()})
            body = step if k == 1 else StepBuilder.fused(step, self.scan_unroll, self._record_unroll)

            def counted(*args):
                self.trace_counts["train"] += 1  # runs at trace time only
                return body(*args)

            fn = self._compiled[key] = jit_train(counted)
        return fn

    def _record_unroll(self, unroll: int | bool) -> None:
        # Runs at trace time: tells users (and RichProgress) what "auto" chose.
        self.fit_config["scan_unroll"] = unroll

    def _eval_fn(self) -> Callable:
        fn = self._compiled.get("eval")
        if fn is None:
            step = self._builder.eval_step()

            def counted(*args):
                self.trace_counts["eval"] += 1
                return step(*args)

            fn = self._compiled["eval"] = jit_eval(counted)
        return fn

    def _mask(self, ex: Execution) -> jax.Array:
        # Cached on the device: full batches reuse one array, so no mask is sent per step.
        key = (ex.rows, ex.n_valid)
        m = self._masks.get(key)
        if m is None:
            batch = ex.rows
            rows = [np.arange(batch) < n for n in ex.n_valid]
            arr = np.asarray(rows[0] if len(rows) == 1 else np.stack(rows), np.float32)
            m = self._masks[key] = self._place_batch(arr, arr.ndim == 2) if self.mesh is not None else jax.device_put(arr)
        return m

    # ------------------------------------------------------------------ fit
    def fit(
        self,
        model: Any = None,
        data: Any = None,
        *,
        validation_data: Any = None,
        epochs: int | None = None,
        batch_size: int | None = None,
        callbacks: Iterable[Callback] | None = None,
        shuffle: bool | None = None,
        validation_batch_size: int | None = None,
        validation_freq: int | None = None,
    ) -> History:
        """Train until ``epochs`` epochs are complete (a total, not a count of new ones).

        ``fit(model, data, ...)`` with a model the trainer does not hold starts a new run;
        ``fit()`` (or ``fit(epochs=20)``) continues the current or loaded run exactly where it
        stopped, with the data, callbacks and arguments it had, each of which can be
        given anew. While it runs, SIGTERM finishes the step under way, lets the run's
        ModelCheckpoint write, runs ``on_fit_end`` and raises ``jaxfit.Preempted``
        (exit status 143); Ctrl-C does the same and raises ``KeyboardInterrupt``.

        Returns:
            The run's ``History``: ``history.history[key]`` holds one float per epoch.
        """
        if model is not None and model is not self._model:
            self._set_model(model)
            self._fit_args = {}
            self._user_callbacks = []
        if self._model is None:
            raise ConfigError("fit() needs a model the first time: trainer.fit(model, data, ...)")
        args = self._fit_args
        given = dict(data=data, validation_data=validation_data, epochs=epochs, batch_size=batch_size,
                     validation_batch_size=validation_batch_size, shuffle=shuffle,
                     validation_freq=validation_freq)
        args.update({k: v for k, v in given.items() if v is not None})
        # Defaults only for a new run: a resumed fit() keeps the run's shuffle and frequency.
        args.setdefault("epochs", 1)
        args.setdefault("shuffle", True)
        args.setdefault("validation_freq", 1)
        shuffle, validation_freq = args["shuffle"], args["validation_freq"]
        if callbacks is not None:
            self._user_callbacks = list(callbacks)
        if args.get("data") is None:
            raise DataError("fit() needs training data: trainer.fit(model, (x_train, y_train), ...)")
        epochs = args["epochs"]
        if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 0:
            raise ConfigError(f"epochs must be a non-negative int (the total to reach), got {epochs!r}")
        if not isinstance(validation_freq, int) or validation_freq < 1:
            raise ConfigError(f"validation_freq must be an int >= 1, got {validation_freq!r}")

        self.resuming = self._state is not None
        self.run_id = self.run_id or uuid.uuid4().hex
        self.callbacks = CallbackList([*self._user_callbacks, self.history])
        self.callbacks.call("setup", self)

        keys = dict(input_keys=self.input_keys, target_keys=self.target_keys)
        train = make_source(args["data"], batch_size=args.get("batch_size"), shuffle=shuffle, seed=self.seed,
                            what="training data", **keys)
        val = None
        if args.get("validation_data") is not None:
            val = make_source(args["validation_data"], batch_size=args.get("validation_batch_size") or args.get("batch_size"),
                              shuffle=False, seed=self.seed, what="validation data", **keys)
        # One first batch of each (an iterable's costs a pass of its loader to produce).
        x0, y0 = train.example()
        val_example = val.example() if val is not None else None
        self._check_divisible(jax.tree_util.tree_leaves(x0)[0].shape[0])
        if val_example is not None:
            self._check_divisible(jax.tree_util.tree_leaves(val_example[0])[0].shape[0])
        if self._state is None:
            self._init_state(x0)
        self._check_shapes(x0, y0)
        if val_example is not None:
            self._check_shapes(*val_example)

        metric_names = ["loss", *self._metric_fns]
        self.log_names = metric_names + ([f"val_{m}" for m in metric_names] if val is not None else [])
        self.log_names += [k for cb in self.callbacks for k in cb.log_keys if k not in self.log_names]
        self.fit_config = dict(epochs=int(epochs), batch_size=train.batch_size, steps_per_epoch=train.steps_per_epoch,
                               steps_per_execution=self.steps_per_execution, has_validation=val is not None,
                               validation_freq=validation_freq)
        self.stop_training, self.stop_reason, self._signal = False, None, None
        error: BaseException | None = None
        with self._signals():
            try:
                self.callbacks.call("on_fit_start", self)
                self._run(train, val, int(epochs))
                if self._signal is not None:
                    self.stop_reason = self._signal
            except BaseException as e:
                error = e
                raise
            finally:
                self._epoch_under_way = None
                if error is None and self._state is not None:
                    self._adapter.sync_module(self._state.params, self._state.model_state)
                self.callbacks.call("on_fit_end", self, {"stop_reason": self.stop_reason, "exception": error})
        if self._signal == "preempted":
            raise Preempted()
        if self._signal == "interrupted":
            raise KeyboardInterrupt
        return self.history

    def _run(self, train: Any, val: Any, epochs: int) -> None:
        cbs = self.callbacks
        k_exec = self.steps_per_execution
        first_epoch = self._epochs_completed + 1
        # Fused or single steps, timed on the first executions of each fit (see _fusion).
        self._fusion = FusionChooser(
            lambda mode: self.fit_config.__setitem__("execution", mode),
            # "auto" chose a rolled scan: 1, not True (an unrolled convolution step).
            measure=lambda: (self.scan_unroll == "auto"
                             and self.fit_config.get("scan_unroll") is not True))
        while self._epochs_completed < epochs and not self.stop_training:
            epoch = self._epochs_completed + 1
            self._epoch_under_way = epoch
            if self.batch_in_epoch == 0 and epoch == first_epoch:
                self._reset_metrics()  # later epochs start from _end_epoch's reset
            cbs.call("on_epoch_start", self)
            has_start, has_end = cbs.has("on_train_batch_start"), cbs.has("on_train_batch_end")
            steps = {1: self._train_fn(1), k_exec: self._train_fn(k_exec)}
            for ex in train.executions(epoch, self.batch_in_epoch, k_exec):
                if has_start:
                    cbs.call("on_train_batch_start", self)
                if ex.k > 1 and self.mesh is None:
                    self._state, loss = self._fusion.run(steps[ex.k], steps[1], self._state, ex, self._mask)
                else:
                    x, y = self._place_batch((ex.x, ex.y), ex.k > 1)
                    self._state, loss = steps[ex.k](self._state, x, y, self._mask(ex))
                self._step += ex.k
                self.batch_in_epoch += ex.k
                if has_end:
                    cbs.call("on_train_batch_end", self, {"loss": loss})
                if self.stop_training:
                    break
            else:
                self._end_epoch(epoch, val)
                continue
            # Stopped inside the epoch: it stays under way (batch_in_epoch > 0) so a resume
            # continues it; no epoch-end hooks for a partial epoch.
            if self.batch_in_epoch >= (train.steps_per_epoch or math.inf):
                self._end_epoch(epoch, val)

    def _end_epoch(self, epoch: int, val: Any) -> None:
        logs = self._fetch_metrics(self.state.metrics)
        self._reset_metrics()
        if val is not None and epoch % self.fit_config["validation_freq"] == 0:
            self.callbacks.call("on_validation_start", self)
            val_logs = {f"val_{k}": v for k, v in self._evaluate_source(val).items()}
            self.callbacks.call("on_validation_end", self, dict(val_logs))
            logs.update(val_logs)
        self._epochs_completed, self.batch_in_epoch = epoch, 0
        self.callbacks.call("on_epoch_end", self, logs)

    def _reset_metrics(self) -> None:
        self._state = self.state.replace(metrics=self._place_state(zero_metrics(list(self._metric_fns))))

    def _fetch_metrics(self, acc: dict) -> dict[str, float]:
        host = jax.device_get(acc)
        count = float(host["count"])
        return {k: float(host[k]) / count if count else float("nan") for k in ["loss", *self._metric_fns]}

    def running_logs(self) -> dict[str, float]:
        """Mean loss and metrics of the epoch so far. Waits for the device: call at display
        refresh or epoch end, not every step."""
        return self._fetch_metrics(self.state.metrics)

    @contextlib.contextmanager
    def _signals(self):
        if not self.handle_signals or threading.current_thread() is not threading.main_thread():
            yield
            return

        def on_signal(signum, frame):
            if self._signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C stops at once
            self._signal = "preempted" if signum == signal.SIGTERM else "interrupted"
            self.stop_training = True

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    # ------------------------------------------------------- evaluate/predict
    def _evaluate_source(self, source: Any) -> dict[str, float]:
        state = self.state
        step = self._eval_fn()
        acc = self._place_state(zero_metrics(list(self._metric_fns)))
        for ex in source.executions(0, 0, 1):
            x, y = self._place_batch((ex.x, ex.y), False)
            acc = step(state.params, state.model_state, acc, x, y, self._mask(ex))
        return self._fetch_metrics(acc)

    def evaluate(self, data: Any, *, batch_size: int | None = None) -> dict[str, float]:
        """Mean loss and metrics over ``data`` in evaluation mode (``train=False``)."""
        src = make_source(data, batch_size=batch_size or self._fit_args.get("batch_size"), shuffle=False,
                          seed=self.seed, what="evaluation data", input_keys=self.input_keys,
                          target_keys=self.target_keys)
        x0, y0 = src.example()
        self._check_divisible(jax.tree_util.tree_leaves(x0)[0].shape[0])
        self._check_shapes(x0, y0)
        return self._evaluate_source(src)

    def predict(self, x: Any, *, batch_size: int | None = None) -> Any:
        """Model outputs for ``x`` (arrays, a dict, or an iterable), as numpy arrays."""
        src = make_source(x, batch_size=batch_size or self._fit_args.get("batch_size"), shuffle=False,
                          seed=self.seed, what="prediction data", input_keys=self.input_keys,
                          target_keys=self.target_keys, need_targets=False)
        self._check_divisible(jax.tree_util.tree_leaves(src.example()[0])[0].shape[0])
        fn = self._compiled.get("predict")
        if fn is None:
            step = self._builder.predict_step() if self._state is not None else None
            if step is None:
                raise ConfigError("predict() needs a trained or loaded trainer: call fit first")

            def counted(*args):
                self.trace_counts["predict"] += 1
                return step(*args)

            fn = self._compiled["predict"] = jax.jit(counted)
        state = self.state
        outs = [(fn(state.params, state.model_state, self._place_batch(ex.x, False)), ex.n_valid[0])
                for ex in src.executions(0, 0, 1)]
        host = jax.device_get([o for o, _ in outs])
        parts = [jax.tree_util.tree_map(lambda a, n=n: a[:n], h) for h, (_, n) in zip(host, outs)]
        return jax.tree_util.tree_map(lambda *a: np.concatenate(a), *parts)

    # ---------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The whole resumable state as nested dicts of numpy arrays and Python scalars."""
        return {
            "format": STATE_FORMAT,
            "train_state": _tree.to_dict(self.state),
            "step": self._step,
            "epoch": self._epochs_completed,
            "batch_in_epoch": self.batch_in_epoch,
            "seed": self.seed,
            "run_id": self.run_id,
            "rng": _seed_key_data(self.seed).copy(),
            "input_spec": _spec_tree(self._input_spec),
            "history": self.history.state_dict(),
            "callbacks": CallbackList(self._user_callbacks).state_dict(),
            "stop_reason": self.stop_reason,
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore ``state_dict()`` output into this trainer (same model and optimizer).

        The model must be set (``Trainer.from_recipe`` or a first ``fit``); the structure
        is rebuilt from the saved input shapes and matched path by path.
        """
        if self._adapter is None:
            raise ConfigError("load_state_dict needs the model: build the trainer with Trainer.from_recipe or fit first")
        if sd.get("format") != STATE_FORMAT:
            raise ConfigError(f"unsupported state format {sd.get('format')!r}; this jaxfit reads format {STATE_FORMAT}")
        if int(sd["seed"]) != self.seed:
            raise ConfigError(f"the saved run used seed {sd['seed']}, this trainer seed {self.seed}")
        spec = _spec_from_dict(sd["input_spec"])
        self._init_state(jax.tree_util.tree_map(lambda s: jnp.zeros(s[0], s[1]), spec, is_leaf=_is_spec))
        restored = _tree.from_dict(self.state, sd["train_state"], "train_state")
        # Fresh device buffers, so the first resumed step can donate them.
        self._state = self._place_state(jax.tree_util.tree_map(lambda a: jax.device_put(a), restored))
        self._step, self._epochs_completed = int(sd["step"]), int(sd["epoch"])
        self.batch_in_epoch = int(sd["batch_in_epoch"])
        self.stop_reason = sd.get("stop_reason")
        self.run_id = sd.get("run_id") or self.run_id
        self.history.load_state_dict(sd["history"])
        CallbackList(self._user_callbacks).load_state_dict(sd.get("callbacks", {}))

    def recipe(self) -> dict[str, Any]:
        """What ``Trainer.from_recipe`` needs to rebuild this trainer (pickled by checkpoints)."""
        return {
            "trainer": dict(optimizer=self.optimizer, loss=self.loss, metrics=self.metrics, seed=self.seed,
                            steps_per_execution=self.steps_per_execution, scan_unroll=self.scan_unroll,
                            input_keys=self.input_keys, target_keys=self.target_keys,
                            handle_signals=self.handle_signals, data_axis=self.data_axis),
            "model": self._model,
            "callbacks": list(self._user_callbacks),
            "fit": dict(self._fit_args),
        }

    @classmethod
    def from_recipe(cls, recipe: dict[str, Any], **overrides: Any) -> Trainer:
        """A trainer with the model, callbacks and fit arguments of ``recipe``, no state yet.

        ``overrides`` replace constructor arguments, e.g. ``mesh=`` (a mesh names this
        machine's devices, so it is never part of a recipe).
        """
        trainer = cls(**{**recipe["trainer"], **overrides})
        trainer._set_model(recipe["model"])
        trainer._user_callbacks = list(recipe.get("callbacks", []))
        trainer._fit_args = dict(recipe.get("fit", {}))
        return trainer

    def verify_resume(self, model: Any, data: Any, *, stop_at: int | Sequence[int] | None = None,
                      callbacks: Sequence[Callback] = (), **fit_args: Any) -> Any:
        """Check that stopping, saving, loading and fitting on reproduces the uninterrupted
        run bit for bit, for this trainer's configuration on ``model`` and ``data``.

        This trainer is a template and is not trained. See
        ``jaxfit.checkpoint.verify_resume``; returns its ``ResumeReport`` (true when every
        resumed run matched).

        Example:
            >>> report = trainer.verify_resume(Net(), (x, y), epochs=3, batch_size=32)  # doctest: +SKIP
            >>> assert report, report  # doctest: +SKIP
        """
        from jaxfit.checkpoint import verify_resume

        return verify_resume(self, model, data, stop_at=stop_at, callbacks=callbacks, **fit_args)

    @classmethod
    def load(cls, path: str, **kwargs: Any) -> Trainer:
        """A trainer restored from a run directory (newest valid checkpoint) or one checkpoint;
        ``.fit()`` continues it. Loading runs the pickled recipe: see ``jaxfit.checkpoint``."""
        from jaxfit.checkpoint import load_trainer

        return load_trainer(path, **kwargs)


@functools.lru_cache(maxsize=8)
def _seed_key_data(seed: int) -> np.ndarray:
    # Computed once per seed: every checkpoint save asks for it, on the training thread.
    return np.asarray(jax.random.key_data(jax.random.key(seed)))


def _is_spec(s: Any) -> bool:
    return isinstance(s, tuple) and len(s) == 2 and isinstance(s[1], str)


def _spec_tree(spec: Any) -> Any:
    if _is_spec(spec):
        return {"shape": list(spec[0]), "dtype": spec[1]}
    if isinstance(spec, dict):
        return {"dict": {k: _spec_tree(v) for k, v in spec.items()}}
    raise ConfigError(f"inputs must be an array or a dict of arrays to be checkpointed, got {type(spec).__name__}")


def _spec_from_dict(d: Any) -> Any:
    def build(node: Any) -> Any:
        if "dict" in node:
            return {k: build(v) for k, v in node["dict"].items()}
        return (tuple(node["shape"]), node["dtype"])

    return build(d)
