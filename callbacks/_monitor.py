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
import warnings
from typing import TYPE_CHECKING, Any

from jaxfit.callback import Callback
from jaxfit.errors import ConfigError, MonitorError

from ._checks import check_number

if TYPE_CHECKING:  # pragma: no cover
    from jaxfit.trainer import Trainer

MODES = ("auto", "min", "max")
#: When a monitoring callback looks at its value: at each epoch end (Keras) or at each
#: validation end, those every ``validation_steps_freq`` steps included (Lightning).
CHECK_ON = ("epoch", "validation")

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


def check_check_on(owner: str, check_on: Any) -> str:
    if check_on not in CHECK_ON:
        raise ConfigError(
            f"{owner}: check_on must be 'epoch' (decide at each epoch end, as Keras does) or "
            f"'validation' (at each validation end, steps included, as Lightning does), got "
            f"check_on = {check_on!r}"
        )
    return str(check_on)


def check_timing(trainer: Trainer, owner: Callback, monitor: str | None, check_on: str) -> None:
    """At ``on_fit_start``: a monitor checked at each validation must be a validation
    metric; one checked at epoch ends of a run that validates by steps but has no known
    epoch length (a stream without ``steps_per_epoch``) may never be checked: say so."""
    name, config = type(owner).__name__, getattr(trainer, "fit_config", None) or {}
    if check_on == "validation":
        if not config.get("has_validation"):
            raise MonitorError(
                f"{name}(check_on='validation') decides at each validation, but this fit has "
                "no validation_data=. Pass validation_data= (and validation_steps_freq=N to "
                "validate every N steps), or use check_on='epoch'."
            )
        if monitor is not None and not monitor.startswith("val_"):
            available = ", ".join(k for k in trainer.log_names if k.startswith("val_"))
            raise MonitorError(
                f"{name}(check_on='validation') monitors {monitor!r}, which validation logs do "
                f"not hold (they have: {available}). Monitor a val_ metric, or use "
                "check_on='epoch' to watch train metrics at epoch ends."
            )
    elif (monitor is not None and config.get("validation_steps_freq")
          and config.get("steps_per_epoch") is None and config.get("epochs") is None):
        warnings.warn(
            f"{name} monitors {monitor!r} at epoch ends (check_on='epoch'), but this run "
            "validates every validation_steps_freq steps and its epochs have no known length "
            "(an iterable without steps_per_epoch): an endless stream never ends an epoch, so "
            f"{name} would never act. Pass check_on='validation' to decide at each "
            "validation, or steps_per_epoch= to give the stream epochs.",
            UserWarning, stacklevel=2)


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
        check_on: ``"epoch"`` (the default: the value of each epoch's logs, Keras's way) or
            ``"validation"`` (the value of each validation's logs, those every
            ``validation_steps_freq`` steps included, Lightning's way; ``monitor`` is then a
            ``val_`` metric). Subclasses decide in :meth:`check`, called at the right hook.

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

    def __init__(self, monitor: str = "val_loss", mode: str = "auto", min_delta: float = 0.0,
                 check_on: str = "epoch"):
        owner = type(self).__name__
        self.check_on = check_check_on(owner, check_on)
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
        check_timing(trainer, self, self.monitor, self.check_on)

    def check(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        """Act on one monitored value: the logs of an epoch end (``check_on="epoch"``) or
        of a validation end (``check_on="validation"``). Subclasses override it."""

    def on_epoch_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        if self.check_on == "epoch":
            self.check(trainer, logs)

    def on_validation_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        if self.check_on == "validation":
            self.check(trainer, logs)

    def monitored(self, logs: dict[str, Any]) -> float:
        """The monitored value from epoch logs, as a float."""
        return float(logs[self.monitor])
