"""Timer: stop training cleanly after a wall-clock budget."""

from __future__ import annotations

import datetime
import re
import time
from typing import TYPE_CHECKING, Any

from jaxfit.callback import Callback
from jaxfit.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from jaxfit.trainer import Trainer

STOP_REASON = "timer"
_CLOCK = re.compile(r"^(?:(\d+):)?(\d+):(\d+):(\d+(?:\.\d*)?)$")


def parse_duration(duration: float | int | str | datetime.timedelta) -> float:
    """Seconds from a number of seconds, a ``timedelta`` or ``"[DD:]HH:MM:SS"``."""
    if isinstance(duration, datetime.timedelta):
        seconds = duration.total_seconds()
    elif isinstance(duration, str):
        match = _CLOCK.match(duration.strip())
        if not match:
            raise ConfigError(
                f"Timer: duration {duration!r} is not 'HH:MM:SS' or 'DD:HH:MM:SS'; "
                "e.g. '00:12:00:00' is twelve hours (a number of seconds or a timedelta works too)"
            )
        days, hours, minutes, secs = match.groups()
        seconds = ((int(days or 0) * 24 + int(hours)) * 60 + int(minutes)) * 60 + float(secs)
    elif isinstance(duration, (int, float)) and not isinstance(duration, bool):
        seconds = float(duration)
    else:
        raise ConfigError(
            f"Timer: duration must be seconds, a timedelta or 'HH:MM:SS', got {duration!r}"
        )
    if not seconds > 0:
        raise ConfigError(f"Timer: duration must be positive, got {duration!r}")
    return seconds


class Timer(Callback):
    """Stops training once ``duration`` of training time has passed.

    The budget covers the whole run: time spent before a resume counts (it is part of the
    callback state), so a job preempted and continued stops at the same total. The check is
    a clock read on the host after each execution of the train step (no device sync); the
    run stops at the end of that step with ``trainer.stop_reason = "timer"``, so
    checkpoints and ``on_fit_end`` hooks run as at any clean stop. ``check="epoch"`` checks
    only at epoch ends, finishing the epoch under way.

    Time is measured from ``on_fit_start`` to ``on_fit_end`` of each fit: compilation and
    validation count, time between fits does not.

    Args:
        duration: seconds, a ``datetime.timedelta``, or ``"[DD:]HH:MM:SS"``.
        check: ``"step"`` or ``"epoch"``.

    Example:
        >>> from jaxfit.callbacks import Timer
        >>> timer = Timer("00:02:30:00")  # two and a half hours
        >>> timer.duration
        9000.0
    """

    def __init__(
        self, duration: float | int | str | datetime.timedelta, check: str = "step"
    ) -> None:
        if check not in ("step", "epoch"):
            raise ConfigError(f"Timer: check must be 'step' or 'epoch', got check = {check!r}")
        self.duration = parse_duration(duration)
        self.check = check
        self._elapsed_before = 0.0  # seconds of earlier fits of this run
        self._started: float | None = None

    def on_fit_start(self, trainer: Trainer) -> None:
        if trainer.step == 0:
            self._elapsed_before = 0.0
        self._started = time.monotonic()

    def time_elapsed(self) -> float:
        """Seconds of training so far in this run."""
        running = 0.0 if self._started is None else time.monotonic() - self._started
        return self._elapsed_before + running

    def time_remaining(self) -> float:
        """Seconds left in the budget (never negative)."""
        return max(self.duration - self.time_elapsed(), 0.0)

    def _maybe_stop(self, trainer: Trainer) -> None:
        if self.time_elapsed() >= self.duration:
            trainer.stop_training = True
            if trainer.stop_reason is None:
                trainer.stop_reason = STOP_REASON

    def wants_batch_hooks(self, trainer: Trainer) -> bool:
        return self.check == "step"

    def on_train_batch_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        if self.check == "step":
            self._maybe_stop(trainer)

    def on_epoch_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        self._maybe_stop(trainer)

    def on_fit_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        self._elapsed_before = self.time_elapsed()
        self._started = None

    def state_dict(self) -> dict[str, Any]:
        return {"elapsed": self.time_elapsed()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._elapsed_before = float(state["elapsed"])
        self._started = None
