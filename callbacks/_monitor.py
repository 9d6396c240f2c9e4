"""The monitor logic shared by EarlyStopping, ReduceOnPlateau and ModelCheckpoint.

One rule, Keras's: in ``"min"`` mode a value improves on ``best`` when
``value < best - min_delta``; in ``"max"`` mode when ``value > best + min_delta``. The
comparison is on absolute differences, so it is correct for negative metrics too (a relative
threshold, as in ``optax.contrib.reduce_on_plateau``, never fires below zero). NaN never
improves on anything.

Where the first ``best`` comes from differs between Keras's callbacks, and jaxfit follows
each: Keras 3's EarlyStopping takes the first monitored value as the first best, whatever
it is (``first_is_best = True``: a first ``+inf`` in ``"min"`` mode is an improvement and
does not count towards patience), while its ReduceLROnPlateau starts from ``+inf`` /
``-inf`` (the default here: a first ``+inf`` in ``"min"`` mode is no improvement). The one
place jaxfit departs from Keras: a NaN first value is not taken as the best (Keras would,
and then no later value could ever improve on it).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from jaxfit.callback import Callback
from jaxfit.errors import ConfigError

from ._checks import check_number

if TYPE_CHECKING:  # pragma: no cover
    from jaxfit.trainer import Trainer

MODES = ("auto", "min", "max")

# Metric names (without the "val_" prefix) whose direction ``mode="auto"`` infers. Anything
# else needs an explicit mode: guessing wrong would silently optimise the wrong way.
_LOWER_IS_BETTER = ("loss", "mse", "mae", "rmse", "error", "perplexity", "crossentropy")
_HIGHER_IS_BETTER = ("acc", "auc", "precision", "recall", "f1", "iou", "dice", "r2")


def infer_mode(monitor: str) -> str:
    """``"min"`` or ``"max"`` for a monitored name, from what it measures.

    ``loss``-like names (``loss``, ``val_loss``, ``mse``, ``mae``, ``..._error``) are
    minimised; accuracy-like names (``accuracy``, ``top_5_accuracy``, ``auc``, ``f1``, ...)
    are maximised.

    Raises:
        ConfigError: when the name says neither; pass ``mode="min"`` or ``mode="max"``.
    """
    name = monitor.removeprefix("val_").lower()
    if any(word in name for word in _LOWER_IS_BETTER):
        return "min"
    if any(word in name for word in _HIGHER_IS_BETTER):
        return "max"
    raise ConfigError(
        f"cannot tell whether {monitor!r} should be minimised or maximised: mode='auto' "
        "knows loss/error-like names (min) and accuracy-like names (max). Pass mode='min' "
        "or mode='max'."
    )


class MonitorCallback(Callback):
    """Base class of callbacks that watch one logged quantity and track its best value.

    Subclasses call :meth:`is_improvement` on each new value and keep ``best`` up to date;
    ``on_fit_start`` checks that the run logs ``monitor`` (subclasses that override it call
    ``super().on_fit_start(trainer)``).

    Args:
        monitor: a key of the ``on_epoch_end`` logs, e.g. ``"val_loss"``, ``"accuracy"``.
        mode: ``"min"``, ``"max"``, or ``"auto"`` (inferred from the name; see
            :func:`infer_mode`).
        min_delta: the smallest change that counts as an improvement (absolute, >= 0).

    Example:
        >>> from jaxfit.callbacks import MonitorCallback
        >>> class BestTracker(MonitorCallback):
        ...     def on_epoch_end(self, trainer, logs):
        ...         if self.is_improvement(logs[self.monitor]):
        ...             self.best = logs[self.monitor]
        >>> t = BestTracker(monitor="val_accuracy")
        >>> t.mode, t.is_improvement(0.5)
        ('max', True)
    """

    #: Take the first monitored value as the first best (Keras's EarlyStopping) rather
    #: than comparing it with ``worst`` (Keras's ReduceLROnPlateau and ModelCheckpoint).
    first_is_best: bool = False

    def __init__(self, monitor: str = "val_loss", mode: str = "auto", min_delta: float = 0.0):
        owner = type(self).__name__
        if not isinstance(monitor, str) or not monitor:
            raise ConfigError(
                f"{owner}: monitor must be a log key such as 'val_loss', got {monitor!r}"
            )
        if mode not in MODES:
            raise ConfigError(f"{owner}: mode must be one of {MODES}, got mode = {mode!r}")
        self.monitor = monitor
        self.mode = infer_mode(monitor) if mode == "auto" else mode
        self.min_delta = check_number(owner, "min_delta", min_delta)
        self.best = self.worst
        self.has_best = False  # whether ``best`` holds a monitored value yet

    @property
    def worst(self) -> float:
        """The starting ``best``: +inf when minimising, -inf when maximising."""
        return math.inf if self.mode == "min" else -math.inf

    def is_improvement(self, value: float, reference: float | None = None) -> bool:
        """Whether ``value`` beats ``reference`` (default: ``best``) by more than min_delta.

        With ``first_is_best`` and no best recorded yet (:meth:`record_best`), any value
        but NaN is an improvement on ``best``, as in Keras's EarlyStopping.
        """
        if reference is None and self.first_is_best and not self.has_best:
            return not math.isnan(value)
        ref = self.best if reference is None else reference
        if self.mode == "min":
            return bool(value < ref - self.min_delta)
        return bool(value > ref + self.min_delta)

    def record_best(self, value: float) -> None:
        """Make ``value`` the best seen so far."""
        self.best = value
        self.has_best = True

    def reset_best(self) -> None:
        """Forget the best seen: the next value is compared with ``worst`` (or taken)."""
        self.best = self.worst
        self.has_best = False

    def on_fit_start(self, trainer: Trainer) -> None:
        trainer.check_monitor(self.monitor, owner=self)

    def monitored(self, logs: dict[str, Any]) -> float:
        """The monitored value from epoch logs, as a float."""
        return float(logs[self.monitor])
