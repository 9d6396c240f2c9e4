"""LearningRateMonitor: hyperparameter values into the epoch logs (and so the History)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from jaxfit.callback import Callback
from jaxfit.errors import ConfigError, HyperparamError

if TYPE_CHECKING:  # pragma: no cover
    from jaxfit.trainer import Trainer


class LearningRateMonitor(Callback):
    """Adds the value of injected hyperparameters to the logs of every epoch.

    Each value is the one the epoch's last step used (``trainer.hyperparams[name]``, one
    scalar read per name per epoch), so schedules and plateau reductions show up in
    ``history.history["learning_rate"]``, CSVLogger, TensorBoard and RichProgress. It runs
    before the default order (``order = -50``) so the callbacks that read the logs see the
    values.

    Args:
        hyperparams: names to record; by default ``learning_rate`` when it is injected,
            otherwise every injected hyperparameter.

    Example:
        >>> from jaxfit.callbacks import LearningRateMonitor
        >>> monitor = LearningRateMonitor(["learning_rate", "b1"])
    """

    order = -50

    def __init__(self, hyperparams: Sequence[str] | None = None) -> None:
        if isinstance(hyperparams, str):
            hyperparams = [hyperparams]
        if hyperparams is not None and not all(isinstance(n, str) for n in hyperparams):
            raise ConfigError(
                f"LearningRateMonitor: hyperparams must be names, got {hyperparams!r}"
            )
        self.hyperparams = None if hyperparams is None else list(hyperparams)
        self._names: list[str] = []

    def on_fit_start(self, trainer: Trainer) -> None:
        injected = trainer.hyperparams.names
        if self.hyperparams is None:
            self._names = ["learning_rate"] if "learning_rate" in injected else list(injected)
            return
        missing = [n for n in self.hyperparams if n not in injected]
        if missing:
            raise HyperparamError(
                f"LearningRateMonitor: {missing} not injected into the optimizer (injected: "
                f"{', '.join(injected) or 'none'}). Inject them, e.g. "
                "optax.inject_hyperparams(optax.adam)(learning_rate=1e-3, b1=0.9)."
            )
        self._names = list(self.hyperparams)

    def on_epoch_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        hp = trainer.hyperparams
        for name in self._names:
            logs[name] = hp[name]
