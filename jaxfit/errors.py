"""Exception types raised by jaxfit and its callbacks."""

from __future__ import annotations


class JaxfitError(Exception):
    """Base class of jaxfit's own errors."""


class ConfigError(JaxfitError, ValueError):
    """A trainer, fit or callback argument is invalid. Raised before any training."""


class DataError(JaxfitError, ValueError):
    """The training, validation or prediction data cannot be used as given."""


class ShapeError(JaxfitError, ValueError):
    """Model outputs do not fit the targets, or a restored array has the wrong shape."""


class MonitorError(JaxfitError, KeyError):
    """A callback monitors a metric that the run will not produce."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class HyperparamError(JaxfitError, KeyError):
    """A hyperparameter cannot be read or written the way it was asked for."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class CallbackError(JaxfitError, RuntimeError):
    """A callback hook raised; the original exception is the ``__cause__``.

    Attributes:
        callback: the callback instance whose hook raised.
        hook: the hook's name, e.g. ``"on_epoch_end"``.
    """

    def __init__(self, callback: object, hook: str, error: BaseException) -> None:
        self.callback = callback
        self.hook = hook
        name = type(callback).__name__
        super().__init__(f"callback {name}.{hook} raised {type(error).__name__}: {error}")


class Preempted(SystemExit):
    """Raised by ``Trainer.fit`` after a SIGTERM: the step under way finished, the run's
    ModelCheckpoint wrote a checkpoint and ``on_fit_end`` ran. Its exit status is 143
    (128 + SIGTERM), so a scheduler sees a preempted job; ``Trainer.load(run).fit()``
    continues it."""

    def __init__(self, message: str = "training preempted by SIGTERM") -> None:
        super().__init__(143)
        self.message = message

    def __str__(self) -> str:
        return self.message
