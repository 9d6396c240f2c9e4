"""``Trainer``: the public face. It holds a run's configuration and state; the loop
(``jaxfit.loop``) drives the engine's compiled step (``jaxfit.engine``) and the callbacks."""

from __future__ import annotations

import uuid
from typing import Any, Callable, Iterable, Sequence, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxfit import _state, loop
from jaxfit._placement import place_host
from jaxfit._reduce import resolve
from jaxfit._tree import batch_rows, same_structure
from jaxfit.callback import Callback, CallbackList
from jaxfit.data import Execution, make_source, split_validation
from jaxfit.engine import Engine, EngineState
from jaxfit.errors import ConfigError, DataError, MonitorError, ShapeError
from jaxfit.history import History
from jaxfit.hyperparams import HyperParams, HyperparamSlot, find_slots, place_like
from jaxfit.losses import LOSSES
from jaxfit.metrics import resolve_metric
from jaxfit.step import LossStep, Step, loss_form

STATE_FORMAT = _state.STATE_FORMAT


class _RunsValue:
    """The default of ``fit(max_steps=...)``: the run's own value (none for a new run).
    ``None`` given explicitly clears a resumed run's ``max_steps``."""

    def __repr__(self) -> str:
        return "<the run's>"


RUNS_VALUE = _RunsValue()


class Trainer:
    """Trains a flax model with an optax optimizer, driving callbacks around jitted steps.

    Args:
        optimizer: an optax ``GradientTransformation``. Hyperparameters wrapped with
            ``optax.inject_hyperparams`` can be read and written through
            ``trainer.hyperparams`` and driven by ``LRScheduler`` / ``ReduceOnPlateau``.
            Not needed with ``step=`` (a custom step holds its own optimizers).
        loss: a loss name (``"softmax_cross_entropy"``, ``"sigmoid_binary_cross_entropy"``,
            ``"mse"``, ``"mae"``, ``"huber"``); ``fn(outputs, targets)`` returning one value
            per example or a batch mean (the simple form); or ``fn(model, batch, ctx)``
            returning the loss it normalises itself, or ``(loss, metrics)`` (the full form,
            ``jaxfit.step``; ``docs/custom_training.md``).
        metrics: with the simple form: names (``"accuracy"``, ``"top_5_accuracy"``,
            ``"mse"``, ...), functions ``fn(outputs, targets)``, or epoch-level metric
            objects (``jaxfit.metrics.AUC()``, ``MeanAveragePrecision()``).
        seed: seeds initialisation, the per-epoch shuffle and every step's RNG keys.
        step: a ``jaxfit.Step``: custom training logic over a state you define (several
            optimizers, EMA params, loss scaling), instead of ``optimizer`` and ``loss``.
        steps_per_execution: fuse this many steps into one compiled ``lax.scan``; batch
            hooks then fire once per execution, as in Keras.
        scan_unroll: ``unroll`` of that scan: an int, ``True`` (fully unrolled) or
            ``"auto"`` (the default), which unrolls fully on the CPU when the step has a
            convolution and keeps the scan rolled otherwise; on a single device the first
            executions of each fit are then timed fused and as single steps, and the faster
            way is kept: ``trainer.fit_config["scan_unroll"]`` / ``["execution"]``.
        input_keys, target_keys: for dict batches and the simple loss form, which keys
            are model inputs and targets (default: targets are ``"label"``/``"labels"``/
            ``"y"``/``"target(s)"``, inputs the rest).
        handle_signals: while ``fit`` runs, turn SIGTERM / SIGINT into a clean stop that
            checkpoints (see ``fit``).
        mesh: a ``jax.sharding.Mesh`` to train on (``docs/scaling.md``). Params are laid
            out as their flax partitioning metadata says (``nn.with_partitioning`` mesh
            axes, ``nn.with_logical_partitioning`` names mapped by ``rules``, nnx
            ``out_sharding``), else by ``param_rules``, else replicated; optimizer state
            and a custom step's EMA copies are sharded like their params; each batch is
            split over ``data_axes``. The state is initialised directly sharded and every
            program keeps that layout. No annotations and no rules: data-parallel. With
            several processes (``jax.distributed.initialize()`` first), every process runs
            the same ``fit`` on the same data and feeds its own devices their rows.
        rules: flax ``logical_axis_rules``, ``[(logical_name, mesh_axis | None), ...]``,
            for ``nn.with_logical_partitioning`` names (needs ``mesh``).
        param_rules: ``[(path_regex, PartitionSpec), ...]`` for params without metadata:
            the first regex that ``re.search``-matches the param's path (``"Dense_0/kernel"``)
            gives its layout (needs ``mesh``).
        data_axes: the mesh axes a batch's leading dim is split over, e.g.
            ``("data", "fsdp")``; by default ``(data_axis,)``.
        data_axis: the one mesh axis batches are split along when ``data_axes`` is not given.

    Example:
        >>> import numpy as np, optax, flax.linen as nn
        >>> from jaxfit import Trainer
        >>> x, y = np.random.rand(64, 4).astype("float32"), np.arange(64) % 3
        >>> trainer = Trainer(optimizer=optax.inject_hyperparams(optax.sgd)(learning_rate=0.1),
        ...                   loss="softmax_cross_entropy", metrics=["accuracy"], seed=0,
        ...                   )
        >>> history = trainer.fit(nn.Dense(3), (x, y), epochs=2, batch_size=16, verbose=0)
        >>> len(history.history["loss"])
        2
    """

    def __init__(
        self,
        optimizer: optax.GradientTransformation | None = None,
        loss: str | Callable = "softmax_cross_entropy",
        metrics: Sequence[str | Callable] = (),
        seed: int = 0,
        *,
        step: Step | None = None,
        steps_per_execution: int = 1,
        scan_unroll: int | bool | str = "auto",
        input_keys: Sequence[str] | None = None,
        target_keys: Sequence[str] | None = None,
        handle_signals: bool = True,
        mesh: jax.sharding.Mesh | None = None,
        data_axis: str = "data",
        rules: Sequence[tuple[str, Any]] = (),
        param_rules: Sequence[tuple[str, Any]] = (),
        data_axes: Sequence[str] | None = None,
    ) -> None:
        if isinstance(metrics, (str, bytes)) or callable(metrics):
            metrics = [metrics]
        if step is not None:
            if not isinstance(step, Step):
                raise ConfigError(f"step must be a jaxfit.Step subclass instance, got {type(step).__name__}")
            if metrics:
                raise ConfigError("a custom step returns its own logs: give Trainer(step=...) no metrics=")
        elif not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
            raise ConfigError(
                f"optimizer must be an optax GradientTransformation, got {type(optimizer).__name__}. "
                "Example: optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)"
            )
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ConfigError(f"seed must be an int, got {seed!r}")
        if isinstance(steps_per_execution, bool) or not isinstance(steps_per_execution, int) or steps_per_execution < 1:
            raise ConfigError(f"steps_per_execution must be an int >= 1, got {steps_per_execution!r}")
        if scan_unroll != "auto" and (not isinstance(scan_unroll, int) or scan_unroll < 1):
            raise ConfigError(f'scan_unroll must be "auto", True or an int >= 1, got {scan_unroll!r}')
        self.form = "custom" if step is not None else loss_form(loss)
        if self.form == "simple":  # unknown names fail here, not at the first fit
            resolve(loss, LOSSES, "loss")
            names = [resolve_metric(m)[0] for m in metrics]
            dupes = sorted({n for n in names if names.count(n) > 1 or n in ("loss", "count")})
            if dupes:
                raise ConfigError(f"metric name {dupes[0]!r} is used twice; give the function a distinct __name__")
        elif self.form == "full" and metrics:
            raise ConfigError(
                "Trainer(metrics=[...]) goes with the simple loss form fn(outputs, targets); a "
                "full-form loss fn(model, batch, ctx) returns its metrics itself: "
                'return loss, {"accuracy": ...}'
            )
        self.optimizer, self.loss, self.metrics, self.custom_step = optimizer, loss, list(metrics), step
        self.seed = int(seed)
        self.steps_per_execution, self.scan_unroll = steps_per_execution, scan_unroll
        self.input_keys, self.target_keys = input_keys, target_keys
        self.handle_signals = handle_signals
        if mesh is not None and data_axes is None and data_axis not in mesh.axis_names:
            raise ConfigError(f"data_axis {data_axis!r} is not an axis of the mesh {tuple(mesh.axis_names)}")
        if mesh is None and (rules or param_rules or data_axes is not None):
            raise ConfigError("rules=, param_rules= and data_axes= lay the state out on a mesh: "
                              "pass mesh=jax.make_mesh(...) too")
        self._plan = None
        if mesh is not None:
            from jaxfit.sharding import ShardingPlan

            # jax.make_mesh defaults to Explicit axes, under which flax layers (dropout's
            # select, for one) reject mixed shardings: the plan uses the mesh's devices with
            # Auto axes and lets XLA propagate shardings inside the step.
            self._plan = ShardingPlan(mesh, rules=rules, param_rules=param_rules,
                                      data_axes=(data_axis,) if data_axes is None else tuple(data_axes))
            mesh = self._plan.mesh
        self.mesh, self.data_axis = mesh, data_axis
        self.rules, self.param_rules = list(rules), list(param_rules)
        self.data_axes = None if data_axes is None else tuple(data_axes)
        self.loss_name = getattr(loss, "__name__", loss) if self.form != "custom" else type(step).__name__

        self.hyperparams = HyperParams(self)
        self.history = History()
        self.stop_training = False
        self.stop_reason: str | None = None
        self.callbacks = CallbackList([])
        self._model: Any = None
        self._step_obj: Step | None = None
        self._engine: Engine | None = None
        self._es: EngineState | None = None
        self._batch_spec: Any = None
        self._user_callbacks: list[Callback] = []
        self._fit_args: dict[str, Any] = {}
        self._schedules: dict[str, tuple[Callable, Any]] = {}
        self._epochs_completed = 0
        self._epoch_under_way: int | None = None
        self.batch_in_epoch = 0
        self._step = 0
        self._data_position: Any = None  # an iterable's position after the last batch trained on
        self._validation_pending = False  # a step validation is due at this step and has not run
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
        """Train steps (batches) completed since the run began: a host counter that never
        syncs. With ``optax.MultiSteps`` it counts micro-batches; the optimizer's own update
        count is in its state (and drives ``LRScheduler``)."""
        return self._step

    @property
    def model(self) -> Any:
        return self._model

    @property
    def trace_counts(self) -> dict[str, int]:
        """How often each program was traced (a retrace means a recompile)."""
        return self._engine.trace_counts if self._engine is not None else {"train": 0, "eval": 0, "predict": 0}

    @property
    def engine_state(self) -> EngineState:
        if self._es is None:
            raise ConfigError("the trainer has no state yet: call fit(model, data) first (or Trainer.load)")
        return self._es

    @property
    def state(self) -> Any:
        """The step's state: a ``TrainState(params, model_state, opt_state)`` for a loss, the
        custom step's own state otherwise. Device arrays that the next step donates."""
        return self.engine_state.state

    @state.setter
    def state(self, value: Any) -> None:
        self._es = self.engine_state.replace(state=value)

    def _field(self, name: str) -> Any:
        state = self.state
        if not hasattr(state, name):
            raise ConfigError(f"the custom step's state has no {name!r}; read trainer.state instead")
        return getattr(state, name)

    @property
    def params(self) -> Any:
        """The current params (device arrays; the next train step donates them, so copy
        with ``jax.device_get`` to keep them)."""
        assert self._step_obj is not None
        return self._step_obj.params(self.state)

    @params.setter
    def params(self, value: Any) -> None:
        assert self._step_obj is not None
        self.state = self._step_obj.replace_params(self.state, _placed_like(value, self.params, "params"))

    @property
    def model_state(self) -> Any:
        return self._field("model_state")

    @model_state.setter
    def model_state(self, value: Any) -> None:
        self.state = self.state.replace(model_state=_placed_like(value, self.model_state, "model_state"))

    @property
    def opt_state(self) -> Any:
        return self._field("opt_state")

    def _hp_slots(self) -> dict[str, HyperparamSlot]:
        if self._engine is not None and self._es is not None:
            return self._engine.slots
        if self.optimizer is None:
            return {}
        # Before the model is known, read the structure from an init on a dummy param.
        return find_slots(self.optimizer.init(jnp.zeros((1,), jnp.float32)))

    def _set_model(self, model: Any) -> None:
        self._model = model
        self._step_obj = self.custom_step or LossStep(model, self.optimizer, self.loss, self.metrics,
                                                      input_keys=self.input_keys, target_keys=self.target_keys)
        self._engine = Engine(self._step_obj, self.seed)
        self._es, self._batch_spec, self.run_id = None, None, None
        self.history = History()
        self.stop_reason = None

    def _init_state(self, batch: Any, initial_params: Any = None) -> None:
        """Create the step's state from an example batch (and given initial params)."""
        assert self._engine is not None and self._step_obj is not None
        es = self._engine.init_state(self._model, batch, plan=self._plan)
        if initial_params is not None:
            if not isinstance(self._step_obj, LossStep):
                raise ConfigError("initial_params= is for the built-in step; a custom step's init sets its params")
            es = self._engine.wrap(self._step_obj.with_params(es.state, initial_params), batch)
        self._batch_spec = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), batch)
        self._es = self._place_state(es)
        self._step, self._epochs_completed, self.batch_in_epoch = 0, 0, 0
        self._data_position = None
        self._validation_pending = False
        self._masks.clear()

    # ---------------------------------------------------------- placement
    def _place_state(self, state: Any) -> Any:
        """The EngineState on its plan's shardings, anything else (metric sums) replicated
        over the mesh; without a mesh, leave placement to jax."""
        if self._plan is None:
            return state
        if isinstance(state, EngineState) and self._engine is not None and self._engine.shardings is not None:
            return jax.device_put(state, self._engine.shardings)
        return jax.device_put(state, self._plan.replicated)

    def _place_host_state(self, state: Any) -> Any:
        """A restored (host) EngineState onto fresh device buffers (the first resumed step
        donates them); on a mesh each device receives only its slices."""
        if self._plan is None:
            return jax.tree_util.tree_map(lambda a: jax.device_put(a), state)
        assert self._engine is not None and self._engine.shardings is not None
        return place_host(state, self._engine.shardings)

    def _place_batch(self, tree: Any, stacked: bool) -> Any:
        """Split a batch along the data axis of the mesh (a no-op without a mesh)."""
        if self.mesh is None or tree is None:
            return tree
        assert self._plan is not None
        sharding = self._plan.batch_sharding(stacked)
        if jax.process_count() > 1:
            # Every process holds the same global batch (same data, seed and order); each
            # one hands its own devices their rows, whatever the mesh's device layout.
            return jax.tree_util.tree_map(
                lambda a: jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx]), tree)
        return jax.device_put(tree, sharding)

    def _devices_on_data_axis(self) -> int:
        return 1 if self._plan is None else self._plan.data_size

    def _data_axes_desc(self) -> str:
        axes = self._plan.data_axes if self._plan is not None else (self.data_axis,)
        return f"mesh axis {axes[0]!r}" if len(axes) == 1 else f"mesh axes {axes}"

    def _check_divisible(self, batch: int | None) -> None:
        n = self._devices_on_data_axis()
        if batch is not None and batch % n:
            raise ConfigError(
                f"batch size {batch} does not split evenly over the {n} devices of "
                f"{self._data_axes_desc()}: use a multiple of {n}"
            )

    def _mask(self, ex: Execution) -> jax.Array | None:
        # Cached on the device: full batches reuse one array, so no mask is sent per step.
        if ex.rows is None:
            return None
        key = (ex.rows, ex.n_valid)
        m = self._masks.get(key)
        if m is None:
            rows = [np.arange(ex.rows) < cast(int, n) for n in ex.n_valid]  # ints when rows is set
            arr = np.asarray(rows[0] if len(rows) == 1 else np.stack(rows), np.float32)
            placed = self._place_batch(arr, arr.ndim == 2) if self.mesh is not None else jax.device_put(arr)
            m = self._masks[key] = placed
        return m

    def _source(self, data: Any, what: str, *, batch_size: Any, shuffle: bool = False,
                drop_remainder: bool = False, steps_per_epoch: int | None = None) -> Any:
        return make_source(data, batch_size=batch_size, shuffle=shuffle, seed=self.seed, what=what,
                           drop_remainder=drop_remainder, pad_multiple=self._devices_on_data_axis(),
                           steps_per_epoch=steps_per_epoch)

    def _check_padding(self, src: Any, what: str, mode: str) -> None:
        """Refuse a mesh-padded last batch where the padding could change the result.

        Padded rows are masked out of per-example losses and metrics and cut off
        predictions (evaluation mode keeps rows independent); but BatchNorm statistics in
        training, a full-form loss or a custom step see the whole batch.
        """
        if not getattr(src, "partial_rows", 0) % self._devices_on_data_axis():
            return
        step = self._step_obj
        simple = isinstance(step, LossStep) and step.form == "simple"
        batch_state = bool(jax.tree_util.tree_leaves(self.state.model_state)) if simple else True
        if mode == "predict" or (simple and (mode == "eval" or not batch_state)):
            return
        raise ConfigError(
            f"{what}: its last batch of {src.partial_rows} samples does not split over the "
            f"{self._devices_on_data_axis()} devices of {self._data_axes_desc()}, and padding "
            "it would change what this model or loss computes over the batch (batch "
            "statistics, a full-form loss, a custom step). Pass drop_remainder=True to fit, "
            "or use a number of samples that splits evenly."
        )

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
        drop_remainder: bool | None = None,
        validation_split: float | None = None,
        steps_per_epoch: int | None = None,
        max_steps: int | None | _RunsValue = RUNS_VALUE,
        validation_steps_freq: int | None = None,
        initial_params: Any = None,
        verbose: int | str | None = None,
    ) -> History:
        """Train until ``epochs`` epochs are complete (a total, not a count of new ones).

        ``fit(model, data, ...)`` with a model the trainer does not hold starts a new run;
        ``fit()`` (or ``fit(epochs=20)``) continues the current or loaded run exactly where it
        stopped, with the data, callbacks and arguments it had, each of which can be
        given anew. While it runs, SIGTERM finishes the step under way, lets the run's
        ModelCheckpoint write, runs ``on_fit_end`` and raises ``jaxfit.Preempted``
        (exit status 143); Ctrl-C does the same and raises ``KeyboardInterrupt``.

        Args:
            data: training batches: arrays (``(x, y)``, a dict, or inputs alone for a
                full-form loss or custom step), or a re-iterable of batches.
            drop_remainder: leave out the last, partial batch of array data (by default it
                runs at its true size: one more compile, and every sample counts once).
            steps_per_epoch: for an iterable: an epoch is this many batches of one stream
                (an infinite one, or one whose passes run into each other), Keras's meaning.
            max_steps: end the run at this total of train steps (Lightning's meaning; a
                total kept by a resumed ``fit()``, like ``epochs``). Without ``epochs`` the
                epochs are then unlimited. A run it stops mid-epoch resumes mid-epoch. Left
                out, a resumed run keeps its ``max_steps``; ``max_steps=None`` clears it, so
                ``fit(epochs=20, max_steps=None)`` trains by epochs alone.
            validation_steps_freq: also validate every this many train steps (callbacks
                see it in ``on_validation_end``, whose logs then hold ``step``; History
                records it in ``history.validations``; monitors act on it with
                ``check_on="validation"``); ``validation_freq`` counts epochs. See
                ``docs/data.md``.
            initial_params: params to start a new run from instead of the model's
                initialisation: a whole params tree, or the subtrees to replace (a
                pretrained backbone). Used once: a resumed run never re-applies them.
            validation_split: a fraction in (0, 1): the last samples of array data (before
                any shuffling, as in Keras) are held out as validation data.
            verbose: 0 silent, 1 a progress bar, 2 one line per epoch (Keras's meaning);
                by default 1, through the ``jaxfit.progress`` plugin, unless a progress
                callback is given.

        Returns:
            The run's ``History``: ``history.history[key]`` holds one float per epoch.
        """
        if model is None and self._model is None and self.custom_step is not None:
            model = self.custom_step  # a custom step may hold its modules itself
        if model is not None and model is not self._model:
            self._set_model(model)
            self._fit_args, self._user_callbacks = {}, []
        if self._model is None:
            raise ConfigError("fit() needs a model the first time: trainer.fit(model, data, ...)")
        args = self._fit_args
        # initial_params start a new run once and are never kept (a resume must not re-apply
        # them); a recipe may carry them for its first fit (verify_resume does).
        initial_params = args.pop("initial_params", None) if initial_params is None else initial_params
        if max_steps is None:
            args.pop("max_steps", None)  # given as None: the run no longer ends at a step count
        max_steps = None if isinstance(max_steps, _RunsValue) else max_steps
        given = dict(data=data, validation_data=validation_data, epochs=epochs, batch_size=batch_size,
                     validation_batch_size=validation_batch_size, shuffle=shuffle,
                     validation_freq=validation_freq, drop_remainder=drop_remainder, verbose=verbose,
                     validation_split=validation_split, steps_per_epoch=steps_per_epoch,
                     max_steps=max_steps, validation_steps_freq=validation_steps_freq)
        args.update({k: v for k, v in given.items() if v is not None})
        # Defaults only for a new run: a resumed fit() keeps the run's shuffle and frequency.
        for key, default in (("shuffle", True), ("validation_freq", 1),
                             ("drop_remainder", False), ("verbose", 1)):
            args.setdefault(key, default)
        if callbacks is not None:
            if isinstance(callbacks, Callback):
                raise ConfigError(
                    f"callbacks= takes a list, got one {type(callbacks).__name__}: "
                    f"callbacks=[{type(callbacks).__name__}(...)]"
                )
            self._user_callbacks = list(callbacks)
        if args.get("data") is None:
            raise DataError("fit() needs training data: trainer.fit(model, (x_train, y_train), ...)")
        loop.check_fit_args(args)
        if self._es is not None and initial_params is not None:
            raise ConfigError("initial_params= starts a new run; this trainer continues one "
                              "(fit(model, data) with a new model starts anew)")

        self.resuming = self._es is not None
        self.run_id = self.run_id or _new_run_id()
        self.callbacks = CallbackList([*loop.progress_callbacks(self._user_callbacks, args["verbose"]),
                                       self.history])
        self.stop_training, self.stop_reason, self._signal = False, None, None
        # From here on SIGTERM / Ctrl-C stop the fit cleanly, during set-up and
        # initialisation too (they take effect before the first step).
        with loop.signals(self):
            try:
                return self._prepare_and_run(args, initial_params, given)
            finally:
                self.callbacks.call("teardown", self)

    def _prepare_and_run(self, args: dict[str, Any], initial_params: Any, given: dict[str, Any]) -> History:
        self.callbacks.call("setup", self)

        data, val_data = split_validation(args["data"], args.get("validation_data"), args.get("validation_split"))
        train = self._source(data, "training data", batch_size=args.get("batch_size"),
                             shuffle=args["shuffle"], drop_remainder=args["drop_remainder"],
                             steps_per_epoch=args.get("steps_per_epoch"))
        val = None
        if val_data is not None:
            val = self._source(val_data, "validation data",
                               batch_size=args.get("validation_batch_size") or args.get("batch_size"))
        loop.check_sources(given, train, val)
        first = loop.first_batch(self, train)
        self._check_divisible(batch_rows(first))
        if self._es is None:
            self._init_state(first, initial_params)
        self._check_padding(train, "training data", "train")
        self._check_batch(first, "train", "training data")
        assert self._engine is not None  # set with the model (_set_model)
        log = self._engine.log_names("train")
        if val is not None:
            val_first = val.example()
            self._check_padding(val, "validation data", "eval")
            self._check_divisible(batch_rows(val_first))
            self._check_batch(val_first, "eval", "validation data")
            log = log + [f"val_{m}" for m in self._engine.log_names("eval")]
        self._check_targets(train, first)
        self.log_names = log + [k for cb in self.callbacks for k in cb.log_keys if k not in log]
        self.fit_config = dict(epochs=loop.epochs_of(args, train.steps_per_epoch), batch_size=train.batch_size,
                               steps_per_epoch=train.steps_per_epoch, max_steps=args.get("max_steps"),
                               validation_steps_freq=args.get("validation_steps_freq"),
                               steps_per_execution=self.steps_per_execution, has_validation=val is not None,
                               validation_freq=args["validation_freq"])
        return loop.fit(self, train, val)

    def _check_batch(self, batch: Any, which: str, what: str) -> None:
        """Trace the step on ``batch`` abstractly: shape errors before any work, naming the data."""
        assert self._engine is not None
        try:
            self._engine.check(self.engine_state, batch, which)
        except (ShapeError, DataError, ConfigError):
            raise
        except Exception as e:
            if which == "train":
                raise
            raise ShapeError(f"{what} does not fit the model: {type(e).__name__}: {e}") from e

    def _check_targets(self, source: Any, first: Any) -> None:
        step = self._step_obj
        if not isinstance(step, LossStep):
            return
        if hasattr(source, "data"):  # arrays: every label, once
            step.check_targets(source.data, self.state)
        else:  # an iterable: its batches are not known ahead; the first one is checked
            step.check_targets(first, self.state,
                               "training data (checked on the iterable's first batch only)")

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

    def running_logs(self) -> dict[str, float]:
        """Loss and metrics of the epoch so far. Waits for the device: call at display
        refresh or epoch end, not every step."""
        assert self._engine is not None
        return self._engine.compute("train", self.engine_state.metrics)

    # ------------------------------------------------------- evaluate/predict
    def _evaluate_source(self, source: Any) -> dict[str, float]:
        assert self._engine is not None
        state, step = self.state, self._engine.eval_fn()
        acc = self._place_state(self._engine.zero_metrics("eval"))
        # The next batch is produced (and off the CPU, copied) while this one runs, as in fit.
        for i, ex in enumerate(loop.prefetched(self, source.executions(0, 0, 1))):
            acc = step(state, acc, ex.batch, self._mask(ex), np.int32(i))
        return self._engine.compute("eval", acc)

    def evaluate(self, data: Any, *, batch_size: int | None = None) -> dict[str, float]:
        """Loss and metrics over ``data`` in evaluation mode (``train=False``)."""
        src = self._source(data, "evaluation data", batch_size=batch_size or self._fit_args.get("batch_size"))
        first = src.example()
        self._check_padding(src, "evaluation data", "eval")
        self._check_divisible(batch_rows(first))
        self._check_batch(first, "eval", "evaluation data")
        return self._evaluate_source(src)

    def predict(self, x: Any, *, batch_size: int | None = None) -> Any:
        """Model outputs for the inputs ``x`` (arrays — a tuple is several inputs — or an
        iterable of input batches), as numpy arrays."""
        if self._es is None or self._engine is None:
            raise ConfigError("predict() needs a trained or loaded trainer: call fit first")
        src = self._source(x, "prediction data", batch_size=batch_size or self._fit_args.get("batch_size"))
        self._check_divisible(batch_rows(src.example()))
        fn, state = self._engine.predict_fn(), self.state
        outs = [(fn(state, ex.batch, self._mask(ex), np.int32(i)), ex.n_valid[0])
                for i, ex in enumerate(loop.prefetched(self, src.executions(0, 0, 1)))]
        host = jax.device_get([o for o, _ in outs])
        parts = [jax.tree_util.tree_map(lambda a, n=n: a[:n] if n is not None else a, h)
                 for h, (_, n) in zip(host, outs)]
        return jax.tree_util.tree_map(lambda *a: np.concatenate(a), *parts)

    # ---------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The whole resumable state as nested dicts of numpy arrays and Python scalars."""
        return _state.state_dict(self)

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore ``state_dict()`` output into this trainer (same model and step). The
        structure is rebuilt abstractly from the saved batch shapes (nothing is
        initialised or compiled) and matched path by path."""
        _state.load_state_dict(self, sd)

    def recipe(self) -> dict[str, Any]:
        """What ``Trainer.from_recipe`` needs to rebuild this trainer (pickled by checkpoints)."""
        return _state.recipe(self)

    @classmethod
    def from_recipe(cls, recipe: dict[str, Any], **overrides: Any) -> Trainer:
        """A trainer with the model, callbacks and fit arguments of ``recipe``, no state yet.

        ``overrides`` replace constructor arguments, e.g. ``mesh=`` (a mesh names this
        machine's devices, so it is never part of a recipe): the run's ``rules``,
        ``param_rules`` and ``data_axes`` lay the state out on that mesh, whatever mesh or
        device count saved it; without ``mesh=`` the run resumes on one device.
        """
        return _state.from_recipe(cls, recipe, overrides)

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


def _new_run_id() -> str:
    """A fresh run id. With several processes, process 0's for all: they train one run, whose
    checkpoints (written by all of them) name it, and each checks the run directory by it."""
    run_id = uuid.uuid4().hex
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        mine = np.frombuffer(bytes.fromhex(run_id), np.uint8)
        run_id = bytes(np.asarray(multihost_utils.broadcast_one_to_all(mine), np.uint8)).hex()
    return run_id


def _placed_like(value: Any, current: Any, what: str) -> Any:
    """``value`` with the structure, dtypes and placement of ``current`` (no recompile)."""
    if not same_structure(value, current):
        raise ShapeError(f"new {what} must have the same tree structure as trainer.{what}")
    return jax.tree_util.tree_map(lambda new, old: place_like(np.asarray(new, old.dtype), old), value, current)
