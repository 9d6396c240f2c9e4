"""HyperparamTrace: a callback that records the hyperparameter values the optimizer applied.

Used by ``examples/schedules.py`` and ``examples/lr_on_the_fly.py`` to plot learning rates as
they were used,
read back from the trainer rather than recomputed from a schedule.
"""

from __future__ import annotations

from jaxfit import Callback, HyperparamError


class HyperparamTrace(Callback):
    """Records ``trainer.hyperparams[name]`` every ``every_n_steps`` optimizer steps.

    The value is read from the optimizer state after the step, so it is the value that step
    applied: the schedule, any plateau factor and any change made by hand are all in it.
    Each read waits for the device (one scalar): keep ``every_n_steps`` coarse on models
    whose steps take well under a millisecond.

    Example:
        >>> trace = HyperparamTrace("learning_rate", every_n_steps=10)
        >>> # trainer.fit(model, data, callbacks=[trace]); then plot trace.steps, trace.values
    """

    def __init__(self, name: str = "learning_rate", every_n_steps: int = 1) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got every_n_steps = {every_n_steps}")
        self.name, self.every_n_steps = name, every_n_steps
        self.steps: list[int] = []  # trainer.step after the step: 1 for the first step
        self.values: list[float] = []

    @property
    def state_key(self) -> str:
        return f"HyperparamTrace[{self.name}]"

    def on_fit_start(self, trainer):
        # Fail before anything is compiled, not at the first step.
        if self.name not in trainer.hyperparams.names:
            injected = ", ".join(trainer.hyperparams.names) or "none"
            raise HyperparamError(
                f"HyperparamTrace: {self.name!r} is not injected into the optimizer "
                f"(injected: {injected})."
            )

    def on_train_batch_end(self, trainer, logs):
        if trainer.step % self.every_n_steps == 0:
            self.steps.append(trainer.step)
            self.values.append(trainer.hyperparams[self.name])
