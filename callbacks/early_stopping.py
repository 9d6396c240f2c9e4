"""EarlyStopping: stop when a monitored quantity has stopped improving."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from flax import serialization

from ._checks import check_count
from ._monitor import MonitorCallback

if TYPE_CHECKING:  # pragma: no cover
    from jaxfit.trainer import Trainer


class EarlyStopping(MonitorCallback):
    """Stops training when ``monitor`` has not improved for ``patience`` epochs.

    Keras 3's rule, epoch by epoch (epochs numbered from 1 as ``trainer.epoch`` is):

    ========================================  =============================================
    the epoch's value                         what happens
    ========================================  =============================================
    epoch <= ``start_from_epoch``             ignored (warm-up): nothing counts
    the first monitored value (not NaN)       best := value; wait := 0 (as in Keras 3:
                                              even ``+inf`` in ``"min"`` mode), unless a
                                              ``baseline`` is set and not beaten
    improves on best by more than min_delta   best := value (weights kept if restore_best);
                                              wait := 0, unless a ``baseline`` is set and
                                              not beaten
    does not improve                          wait += 1; if wait >= patience (and not the
                                              first epoch): stop, ``stop_reason =
                                              "early_stopping"``
    ========================================  =============================================

    ``wait`` grows before the test, so ``patience=0`` and ``patience=1`` both stop at the
    first epoch that does not improve (as in Keras 3); ``patience=2`` allows one.

    ``restore_best=True`` keeps a host copy of the best epoch's params and model state (the
    train step donates its buffers, so a device reference would be deleted by the next
    step) and puts it back when ``fit`` returns, whether the run stopped early or ran all
    its epochs, as Keras 3 does. It is not put back when ``fit`` ends by an exception,
    Ctrl-C or preemption, so that ``fit()`` can continue the interrupted run exactly. The
    copy is part of the callback state, so it survives a resume (and is in every checkpoint:
    one extra copy of the params).

    ``check_on="validation"`` applies the same table at each validation end instead
    (Lightning's EarlyStopping): the validations every ``validation_steps_freq`` steps and
    those at epoch ends, so ``patience`` counts validations and a run trained by
    ``max_steps`` on an endless stream stops at the validation that exhausts it (the step
    is ``stopped_step``, the best one ``best_step``). The first validation can stop a run
    (a NaN first value with ``patience=0``); the "not the first epoch" rule is per epoch.
    ``start_from_epoch`` still counts epochs: validations within them are not monitored.

    State (``best``, ``wait``, ``best_epoch``, ``stopped_epoch``, ``best_step``,
    ``stopped_step``, the best weights) is reset when a run starts from step 0 and kept
    when a run continues.

    Args:
        monitor: the log key to watch, e.g. ``"val_loss"`` (needs ``validation_data``).
        mode: ``"min"``, ``"max"`` or ``"auto"`` (from the name).
        patience: epochs (validations, with ``check_on="validation"``) without improvement
            before stopping.
        min_delta: the smallest absolute change that counts as an improvement.
        start_from_epoch: epochs of warm-up that are not monitored.
        restore_best: put the best epoch's weights back at the end of ``fit``.
        baseline: a value to beat; until it is beaten, ``wait`` keeps growing even when the
            value improves, so a run that has not reached the baseline after ``patience``
            epochs stops at its first epoch without improvement.
        check_on: ``"epoch"`` (decide at epoch ends) or ``"validation"`` (at each
            validation end, mid-epoch step validations included).

    Example:
        >>> from jaxfit.callbacks import EarlyStopping
        >>> stop = EarlyStopping(monitor="val_loss", patience=3, restore_best=True)
        >>> stop.mode
        'min'
    """

    first_is_best = True  # Keras 3's EarlyStopping starts from best = None

    def __init__(
        self,
        monitor: str = "val_loss",
        mode: str = "auto",
        patience: int = 0,
        min_delta: float = 0.0,
        start_from_epoch: int = 0,
        restore_best: bool = False,
        baseline: float | None = None,
        check_on: str = "epoch",
    ) -> None:
        super().__init__(monitor, mode, min_delta, check_on)
        self.patience = check_count("EarlyStopping", "patience", patience)
        self.start_from_epoch = check_count("EarlyStopping", "start_from_epoch", start_from_epoch)
        self.restore_best = bool(restore_best)
        self.baseline = None if baseline is None else float(baseline)
        self._reset()

    def _reset(self) -> None:
        self.reset_best()
        self.wait = 0
        self.best_epoch = 0
        self.stopped_epoch = 0
        self.best_step = 0
        self.stopped_step = 0
        self.best_weights: dict[str, Any] | None = None  # host numpy state dicts

    def on_fit_start(self, trainer: Trainer) -> None:
        super().on_fit_start(trainer)
        if trainer.step == 0:
            self._reset()

    def check(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        epoch = trainer.epoch
        if epoch <= self.start_from_epoch:
            return
        value = self.monitored(logs)
        if self.restore_best and self.best_weights is None:
            # Whatever happens next, the first monitored epoch is the best seen so far.
            self._keep_weights(trainer, epoch)
        self.wait += 1
        if self.is_improvement(value):
            self.record_best(value)
            if self.restore_best:
                self._keep_weights(trainer, epoch)
            self.best_epoch, self.best_step = epoch, trainer.step
            if self.baseline is None or self.is_improvement(value, self.baseline):
                self.wait = 0
            return
        if self.wait >= self.patience and (epoch > 1 or self.check_on == "validation"):
            self.stopped_epoch, self.stopped_step = epoch, trainer.step
            trainer.stop_training = True
            trainer.stop_reason = "early_stopping"

    def _keep_weights(self, trainer: Trainer, epoch: int) -> None:
        # device_get copies to host memory: the next step donates (deletes) these buffers.
        self.best_weights = {
            "params": serialization.to_state_dict(jax.device_get(trainer.params)),
            "model_state": serialization.to_state_dict(jax.device_get(trainer.model_state)),
        }
        self.best_epoch = epoch

    def on_fit_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        if not self.restore_best or self.best_weights is None or logs.get("exception") is not None:
            return
        if trainer.stop_reason in ("interrupted", "preempted"):
            return
        trainer.params = serialization.from_state_dict(trainer.params, self.best_weights["params"])
        if self.best_weights["model_state"]:
            trainer.model_state = serialization.from_state_dict(
                trainer.model_state, self.best_weights["model_state"]
            )

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "has_best": self.has_best,
            "wait": self.wait,
            "best_epoch": self.best_epoch,
            "stopped_epoch": self.stopped_epoch,
            "best_step": self.best_step,
            "stopped_step": self.stopped_step,
            "best_weights": self.best_weights,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = float(state["best"])
        # Checkpoints written before has_best existed: a best other than the start value
        # was recorded from a monitored value.
        self.has_best = bool(state.get("has_best", self.best != self.worst))
        self.wait = int(state["wait"])
        self.best_epoch = int(state["best_epoch"])
        self.stopped_epoch = int(state["stopped_epoch"])
        self.best_step = int(state.get("best_step", 0))  # absent from older checkpoints
        self.stopped_step = int(state.get("stopped_step", 0))
        weights = state.get("best_weights")
        self.best_weights = None if weights is None else _as_numpy(weights)


def _as_numpy(tree: Any) -> Any:
    return jax.tree.map(np.asarray, tree)
