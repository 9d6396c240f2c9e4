"""The training loop: epochs of executions of the engine's step, with the hooks around them.

Read it in one sitting: ``fit`` installs the signal handlers and runs ``on_fit_start`` ...
``on_fit_end``; ``_run`` walks epochs and executions; ``_end_epoch`` fetches the epoch's
metric sums once, validates and calls ``on_epoch_end``.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import warnings
from importlib import metadata
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from jaxfit._fusion import FusionChooser
from jaxfit.callback import Callback
from jaxfit.engine import batch_rows
from jaxfit.errors import ConfigError, Preempted
from jaxfit.history import History
from jaxfit.step import LossStep

if TYPE_CHECKING:  # pragma: no cover
    from jaxfit.trainer import Trainer


def rows_of(batch: Any) -> int | None:
    return batch_rows(batch)


def check_fit_args(args: dict[str, Any]) -> None:
    epochs = args["epochs"]
    if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 0:
        raise ConfigError(f"epochs must be a non-negative int (the total to reach), got {epochs!r}")
    freq = args["validation_freq"]
    if isinstance(freq, bool) or not isinstance(freq, int) or freq < 1:
        raise ConfigError(f"validation_freq must be an int >= 1, got {freq!r}")
    if args["verbose"] not in (0, 1, 2, "auto"):
        raise ConfigError(f"verbose must be 0 (silent), 1 (progress bar) or 2 (one line per epoch), got {args['verbose']!r}")


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
    if 0 < epochs <= trainer._epochs_completed and trainer.batch_in_epoch == 0:
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
        _run(trainer, train, val, epochs)
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


def _executions(trainer: Trainer, train: Any, epoch: int) -> Iterator[Any]:
    return train.executions(epoch, trainer.batch_in_epoch, trainer.steps_per_execution)


def _run(trainer: Trainer, train: Any, val: Any, epochs: int) -> None:
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
    while trainer._epochs_completed < epochs and not trainer.stop_training:
        epoch = trainer._epochs_completed + 1
        trainer._epoch_under_way = epoch
        if trainer.batch_in_epoch == 0 and epoch == first_epoch:
            _reset_metrics(trainer)  # later epochs start from _end_epoch's reset
        cbs.call("on_epoch_start", trainer)
        has_start, has_end = cbs.has("on_train_batch_start"), cbs.has("on_train_batch_end")
        schedules = {n: f for n, (f, _) in trainer._schedules.items()}
        steps = {k: engine.train_fn(k, schedules, trainer.scan_unroll, record_unroll) for k in {1, k_exec}}
        for ex in _executions(trainer, train, epoch):
            if has_start:
                cbs.call("on_train_batch_start", trainer)
            if ex.k > 1 and trainer.mesh is None:
                trainer._es, loss = fusion.run(steps[ex.k], steps[1], trainer._es, ex, trainer._mask)
            else:
                batch = trainer._place_batch(ex.batch, ex.k > 1)
                trainer._es, loss = steps[ex.k](trainer._es, batch, trainer._mask(ex))
            trainer._step += ex.k
            trainer.batch_in_epoch += ex.k
            if has_end:
                cbs.call("on_train_batch_end", trainer, {"loss": loss} if loss is not None else {})
            if trainer.stop_training:
                break
        else:
            _end_epoch(trainer, epoch, val)
            continue
        # Stopped inside the epoch: it stays under way (batch_in_epoch > 0) so a resume
        # continues it; no epoch-end hooks for a partial epoch.
        if trainer.batch_in_epoch >= (train.steps_per_epoch or math.inf):
            _end_epoch(trainer, epoch, val)


def _end_epoch(trainer: Trainer, epoch: int, val: Any) -> None:
    logs = trainer._engine.compute("train", trainer.engine_state.metrics)  # type: ignore[union-attr]
    _reset_metrics(trainer)
    if val is not None and epoch % trainer.fit_config["validation_freq"] == 0:
        trainer.callbacks.call("on_validation_start", trainer)
        val_logs = {f"val_{k}": v for k, v in trainer._evaluate_source(val).items()}
        trainer.callbacks.call("on_validation_end", trainer, dict(val_logs))
        logs.update(val_logs)
    trainer._epochs_completed, trainer.batch_in_epoch = epoch, 0
    trainer.callbacks.call("on_epoch_end", trainer, logs)


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
