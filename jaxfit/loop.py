"""The training loop: epochs of executions of the engine's step, with the hooks around them.

Read it in one sitting: ``fit`` installs the signal handlers and runs ``on_fit_start`` ...
``on_fit_end``; ``_run`` walks epochs and executions; ``_end_epoch`` fetches the epoch's
metric sums once, validates and calls ``on_epoch_end``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import signal
import threading
import warnings
from importlib import metadata
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import jax
import numpy as np

from jaxfit._fusion import FusionChooser
from jaxfit.callback import Callback
from jaxfit.data import Execution
from jaxfit.errors import ConfigError, DataError, Preempted
from jaxfit.history import History
from jaxfit.step import LossStep

if TYPE_CHECKING:  # pragma: no cover
    from jaxfit.trainer import Trainer


def _positive(value: Any) -> bool:
    return bool(not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value >= 1)


def check_fit_args(args: dict[str, Any]) -> None:
    epochs = args.get("epochs")
    if epochs is None and args.get("max_steps") is None:
        epochs = args["epochs"] = 1
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 0):
        raise ConfigError(f"epochs must be a non-negative int (the total to reach), got {epochs!r}")
    freq = args["validation_freq"]
    if isinstance(freq, bool) or not isinstance(freq, int) or freq < 1:
        raise ConfigError(f"validation_freq must be an int >= 1, got {freq!r}")
    for name, meaning in (("steps_per_epoch", "batches per epoch, taken from an iterable or stream"),
                          ("max_steps", "the total number of train steps at which the run ends"),
                          ("validation_steps_freq", "validate every N train steps")):
        if args.get(name) is not None and not _positive(args[name]):
            raise ConfigError(f"{name} must be an int >= 1 ({meaning}), got {args[name]!r}")
    if args["verbose"] not in (0, 1, 2, "auto"):
        raise ConfigError("verbose must be 0 (silent), 1 (progress bar) or 2 (one line per epoch), "
                          f"got {args['verbose']!r}")


def check_sources(given: dict[str, Any], train: Any, val: Any) -> None:
    """Arguments that an iterable of batches would silently ignore are errors."""
    for name, src, what in (("batch_size", train, "training data"),
                            ("validation_batch_size", val, "validation data")):
        if given.get(name) is not None and hasattr(src, "stream"):
            raise DataError(
                f"{name}={given[name]} was given, but the {what} is an iterable of batches "
                f"({type(src.source).__name__}), which sets its own batch size: each item it "
                f"yields is one batch and runs as it is. Leave {name} out, or batch in the "
                "pipeline (e.g. grain's .batch(n)).")


def epochs_of(args: dict[str, Any], steps_per_epoch: int | None) -> int | None:
    """The epochs to reach: as given, or with only ``max_steps`` the epochs it spans (None:
    unknown, an iterable without a length)."""
    if args.get("epochs") is not None:
        return int(args["epochs"])
    return -(-args["max_steps"] // steps_per_epoch) if steps_per_epoch else None


def progress_callbacks(callbacks: list[Callback], verbose: int | str) -> list[Callback]:
    """The user's callbacks plus, unless one shows progress or ``verbose=0``, the default
    progress plugin (the ``jaxfit.progress`` entry point ``default``, as Keras shows a bar)."""
    if verbose == 0 or any(getattr(cb, "is_progress", False) for cb in callbacks):
        return list(callbacks)
    found = [ep for ep in metadata.entry_points(group="jaxfit.progress") if ep.name == "default"]
    if not found:
        return list(callbacks)
    return [*callbacks, found[0].load()(verbose=1 if verbose == "auto" else verbose)]


def fit(trainer: Trainer, train: Any, val: Any) -> History:
    """Run the fit whose sources and configuration the trainer has prepared."""
    epochs = trainer.fit_config["epochs"]
    max_steps = trainer.fit_config.get("max_steps")
    if max_steps is not None and max_steps <= trainer._step:
        warnings.warn(
            f"fit: nothing to train: the run is at step {trainer._step} and max_steps={max_steps} "
            f"is the total to reach. To train n more steps, pass max_steps={trainer._step} + n; "
            "to train by epochs instead, clear it: fit(epochs=N, max_steps=None).",
            UserWarning, stacklevel=3)
    elif epochs is not None and 0 < epochs <= trainer._epochs_completed and trainer.batch_in_epoch == 0:
        warnings.warn(
            f"fit: nothing to train: the run has completed {trainer._epochs_completed} epochs and "
            f"epochs={epochs} is the total to reach, not a number of new epochs. To train "
            f"n more, pass epochs={trainer._epochs_completed} + n (e.g. fit(epochs="
            f"{trainer._epochs_completed + epochs})); to start over, fit a new model object.",
            UserWarning, stacklevel=3)
    error: BaseException | None = None
    first_step = trainer._step
    try:
        trainer.callbacks.call("on_fit_start", trainer)
        _run(trainer, train, val, math.inf if epochs is None else epochs)
        if trainer._signal is not None:
            trainer.stop_reason = trainer._signal
    except BaseException as e:
        error = e
        raise
    finally:
        trainer._epoch_under_way = None
        step = trainer._step_obj
        if error is None and isinstance(step, LossStep):
            step.adapter.sync_module(trainer.state.params, trainer.state.model_state)
        trainer.callbacks.call("on_fit_end", trainer, {"stop_reason": trainer.stop_reason, "exception": error})
    if trainer._signal == "preempted":
        if trainer._step == first_step:
            raise Preempted("training preempted by SIGTERM before its first step: nothing was "
                            "trained in this fit, so no checkpoint was due")
        raise Preempted()
    if trainer._signal == "interrupted":
        raise KeyboardInterrupt
    return trainer.history


PREFETCH = 2  # executions on their way to the device: the one running and the next


def _executions(trainer: Trainer, train: Any, epoch: int) -> Iterator[Execution]:
    """The epoch's executions from where the run is, each placed on the device one execution
    ahead: the next batch's host-to-device copy overlaps the current step (jax dispatches
    asynchronously). No more than ``max_steps`` needs are drawn from the data."""
    max_steps = trainer.fit_config.get("max_steps")
    limit = None if max_steps is None else max(max_steps - trainer._step, 0)
    yield from prefetched(trainer, train.executions(epoch, trainer.batch_in_epoch, trainer.steps_per_execution,
                                                    position=trainer._data_position, limit=limit))


def prefetched(trainer: Trainer, executions: Iterable[Execution]) -> Iterator[Execution]:
    """``executions`` placed on the device ``PREFETCH - 1`` ahead of the one handed out:
    training, evaluation and prediction all read their data through it."""
    ahead: collections.deque[Execution] = collections.deque()
    for ex in executions:
        ahead.append(_placed(trainer, ex))
        if len(ahead) == PREFETCH:
            yield ahead.popleft()
    yield from ahead


_HOST_IS_DEVICE = jax.default_backend() == "cpu"


def _placed(trainer: Trainer, ex: Execution) -> Execution:
    if trainer.mesh is None:
        if _HOST_IS_DEVICE:
            # On the CPU the "device" is host memory: a device_put ahead is a copy that
            # overlaps nothing, and costs a dispatch-bound step ~25% (W1). jit takes numpy.
            return ex
        return dataclasses.replace(ex, batch=jax.device_put(ex.batch))
    return dataclasses.replace(ex, batch=trainer._place_batch(ex.batch, ex.k > 1))


def first_batch(trainer: Trainer, train: Any) -> Any:
    """The first batch this fit trains on: an iterable opens at the run's position (and
    keeps that iterator for the first epoch), so a resume inspects nothing twice."""
    if trainer._es is None or not hasattr(train, "stream"):
        return train.example()
    return train.example(trainer._epochs_completed + 1, trainer.batch_in_epoch, trainer._data_position)


def _run(trainer: Trainer, train: Any, val: Any, epochs: float) -> None:
    cbs, engine = trainer.callbacks, trainer._engine
    assert engine is not None
    k_exec = trainer.steps_per_execution
    first_epoch = trainer._epochs_completed + 1
    # Fused or single steps, timed on the first executions of each fit (see _fusion).
    fusion = FusionChooser(
        lambda mode: trainer.fit_config.__setitem__("execution", mode),
        # "auto" chose a rolled scan: 1, not True (an unrolled convolution step).
        measure=lambda: (trainer.scan_unroll == "auto" and trainer.fit_config.get("scan_unroll") is not True))
    record_unroll = lambda u: trainer.fit_config.__setitem__("scan_unroll", u)  # noqa: E731 - trace time
    max_steps, val_steps = trainer.fit_config.get("max_steps"), trainer.fit_config.get("validation_steps_freq")
    # A run already at max_steps trains nothing (and ends no epoch with no steps in it).
    while trainer._epochs_completed < epochs and not trainer.stop_training and not _at_max_steps(trainer):
        epoch = trainer._epochs_completed + 1
        trainer._epoch_under_way = epoch
        if trainer.batch_in_epoch == 0 and epoch == first_epoch:
            _reset_metrics(trainer)  # later epochs start from _end_epoch's reset
        cbs.call("on_epoch_start", trainer)
        cbs.select_batch_hooks(trainer)
        if _pending_validation(trainer, val, train.steps_per_epoch, epoch):
            break
        has_start, has_end = cbs.has("on_train_batch_start"), cbs.has("on_train_batch_end")
        schedules = {n: f for n, (f, _) in trainer._schedules.items()}
        steps = {k: engine.train_fn(k, schedules, trainer.scan_unroll, record_unroll) for k in {1, k_exec}}
        for ex in _executions(trainer, train, epoch):
            if has_start:
                cbs.call("on_train_batch_start", trainer)
            k = ex.k
            if k > 1 and trainer.mesh is None:
                trainer._es, loss = fusion.run(steps[k], steps[1], trainer._es, ex, trainer._mask)
            else:
                trainer._es, loss = steps[k](trainer._es, ex.batch, trainer._mask(ex))
            trainer._step += k
            trainer.batch_in_epoch += k
            trainer._data_position = ex.position
            # Known before the batch hooks, so that a checkpoint they write records it as due.
            trainer._validation_pending = val_steps is not None and val is not None and _step_validation_due(
                trainer, val_steps, k, train.steps_per_epoch, epoch)
            if has_end:
                cbs.call("on_train_batch_end", trainer, {"loss": loss} if loss is not None else {})
            if trainer._validation_pending:
                _validate(trainer, val, {"step": trainer._step})
            if max_steps is not None and trainer._step >= max_steps:
                trainer.stop_training = True
                trainer.stop_reason = trainer.stop_reason or "max_steps"
            if trainer.stop_training:
                break
        else:
            _end_epoch(trainer, epoch, val)
            continue
        # Stopped inside the epoch: it stays under way (batch_in_epoch > 0) so a resume
        # continues it; no epoch-end hooks for a partial epoch.
        if trainer.batch_in_epoch >= (train.steps_per_epoch or math.inf):
            _end_epoch(trainer, epoch, val)


def _at_max_steps(trainer: Trainer) -> bool:
    max_steps = trainer.fit_config.get("max_steps")
    return max_steps is not None and trainer._step >= max_steps


def _pending_validation(trainer: Trainer, val: Any, per_epoch: int | None, epoch: int) -> bool:
    """Run the step validation a resumed checkpoint left due (a batch hook wrote it before
    the validation of its step ran), as the uninterrupted run did; True when it stopped the run."""
    if not trainer._validation_pending or val is None:
        return False
    _validate(trainer, val, {"step": trainer._step})
    if not trainer.stop_training:
        return False
    if trainer.batch_in_epoch >= (per_epoch or math.inf):
        _end_epoch(trainer, epoch, val)
    return True


def _step_validation_due(trainer: Trainer, every: int | None, k: int, per_epoch: int | None,
                         epoch: int) -> bool:
    """A validation every ``every`` steps is due, unless the epoch ends at this step and
    validates anyway (no second run on the same state)."""
    if not every or trainer._step // every == (trainer._step - k) // every:
        return False
    return not (trainer.batch_in_epoch == per_epoch and epoch % trainer.fit_config["validation_freq"] == 0)


def _end_epoch(trainer: Trainer, epoch: int, val: Any) -> None:
    metrics = trainer.engine_state.metrics
    _reset_metrics(trainer)  # dispatched before the fetch below waits for the epoch's steps
    logs = trainer._engine.compute("train", metrics)  # type: ignore[union-attr]
    if val is not None and epoch % trainer.fit_config["validation_freq"] == 0:
        logs.update(_validate(trainer, val))
    trainer._epochs_completed, trainer.batch_in_epoch = epoch, 0
    trainer.callbacks.call("on_epoch_end", trainer, logs)


def _validate(trainer: Trainer, val: Any, extra: dict[str, Any] | None = None) -> dict[str, float]:
    """Evaluate the validation data; ``on_validation_end`` gets the ``val_`` logs (and, for a
    validation every ``validation_steps_freq`` steps, the ``step``)."""
    trainer._validation_pending = False  # a checkpoint from here on has it (or is after it)
    trainer.callbacks.call("on_validation_start", trainer)
    val_logs = {f"val_{k}": v for k, v in trainer._evaluate_source(val).items()}
    trainer.callbacks.call("on_validation_end", trainer, {**val_logs, **(extra or {})})
    return val_logs


def _reset_metrics(trainer: Trainer) -> None:
    assert trainer._engine is not None
    trainer._es = trainer.engine_state.replace(metrics=trainer._place_state(trainer._engine.zero_metrics("train")))


@contextlib.contextmanager
def signals(trainer: Trainer) -> Iterator[None]:
    """SIGTERM and SIGINT stop the fit at the next step boundary (a second Ctrl-C at once);
    the previous handlers are back in place when the fit ends."""
    if not trainer.handle_signals or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(signum: int, frame: Any) -> None:
        if trainer._signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        trainer._signal = "preempted" if signum == signal.SIGTERM else "interrupted"
        trainer.stop_training = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
