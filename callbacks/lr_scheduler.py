"""LRScheduler: drive an injected hyperparameter with a schedule computed inside the step."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from jaxfit.callback import Callback
from jaxfit.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from jaxfit.trainer import Trainer

BY = ("step", "epoch")


class LRScheduler(Callback):
    """Sets an injected hyperparameter from a schedule, on the device, at every step.

    The schedule is handed to the jitted train step
    (``trainer.hyperparams.attach_schedule``), which computes ``schedule(k) * scale``
    before update ``k`` (0 for the first): no host work and no sync per step, no
    recompilation, exact with ``steps_per_execution`` and on resume. ``k`` is the
    optimizer's own update count, which is checkpointed with its state: inside
    ``optax.MultiSteps`` it advances once per real update, not per micro-batch, so training
    with ``LRScheduler(s)`` matches passing ``s`` to ``optax.inject_hyperparams`` directly.

    At each epoch end the value the epoch's last step applied goes into the logs under the
    hyperparameter's name (``logs["learning_rate"]``; declared in ``log_keys``), so the
    History, ``python -m jaxfit plot``, CSVLogger and TensorBoard record it.

    ``scale`` is 1.0 unless a ``ReduceOnPlateau`` on the same hyperparameter lowers it:
    the two compose, a plateau multiplying whatever the schedule says from then on.

    With ``by="epoch"`` the schedule receives the 0-based epoch index instead (as Keras's
    LearningRateScheduler does): step ``k`` of the run uses ``schedule(epoch of k)``, still
    computed inside the step from the step count, so it stays exact on a resume mid-epoch.
    That needs the number of steps per epoch, known for array data and for iterables with
    a ``len()`` (the number of batches per epoch).

    Any injected numeric hyperparameter can be scheduled, not only the learning rate
    (Adam's ``b1``, a weight decay, ...), one LRScheduler per hyperparameter. The
    hyperparameter must be injected as a number: one that optax already computes from a
    schedule (``inject_hyperparams(adam)(learning_rate=schedule)``) is refused.

    Args:
        schedule: an optax schedule or any jax-traceable ``fn(count) -> value`` (use
            ``jnp.where``, not ``if``, on the count).
        hyperparam: the injected hyperparameter to drive.
        by: ``"step"`` (the count is the step) or ``"epoch"`` (the 0-based epoch index).

    Example:
        >>> import optax
        >>> from jaxfit.callbacks import LRScheduler
        >>> sched = LRScheduler(optax.warmup_cosine_decay_schedule(0.0, 1e-2, 100, 2000))
        >>> b1 = LRScheduler(optax.linear_schedule(0.85, 0.95, 1000), hyperparam="b1")
    """

    order = -100
    log_keys: tuple[str, ...] = ("learning_rate",)

    def __init__(
        self,
        schedule: Callable[[Any], Any],
        hyperparam: str = "learning_rate",
        by: str = "step",
    ) -> None:
        if not callable(schedule):
            raise ConfigError(
                f"LRScheduler: schedule must be an optax schedule or fn(count) -> value, "
                f"got {type(schedule).__name__}"
            )
        if by not in BY:
            raise ConfigError(f"LRScheduler: by must be one of {BY}, got by = {by!r}")
        if not isinstance(hyperparam, str) or not hyperparam:
            raise ConfigError(f"LRScheduler: hyperparam must be a name, got {hyperparam!r}")
        self.schedule = schedule
        self.hyperparam = hyperparam
        self.by = by
        if hyperparam != "learning_rate":
            self.log_keys = (hyperparam,)

    @property
    def state_key(self) -> str:
        # One scheduler per hyperparameter: a second one (b1 next to the learning rate)
        # gets its own checkpoint entry without the user overriding anything.
        base = type(self).__name__
        return base if self.hyperparam == "learning_rate" else f"{base}[{self.hyperparam}]"

    def on_fit_start(self, trainer: Trainer) -> None:
        hp = trainer.hyperparams
        hp.check_writable(self.hyperparam, owner=self)
        fn = self.schedule if self.by == "step" else self._epoch_schedule(trainer)
        _check_traceable(fn, self.schedule)
        # by="epoch" counts batches (epochs are made of them); by="step" follows the
        # optimizer's own update count, as inject_hyperparams(opt)(lr=schedule) does.
        hp.attach_schedule(self.hyperparam, fn, owner=self, count="steps" if self.by == "epoch" else "updates")

    def on_epoch_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        # The value the epoch's last step applied (schedule times any plateau factor): one
        # scalar read per epoch.
        logs[self.hyperparam] = trainer.hyperparams[self.hyperparam]

    def on_fit_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        # Leave the trainer as it was: between fits the hyperparameter is plain again (it
        # keeps the last value used), and the next fit attaches the schedule anew.
        if trainer.hyperparams.schedule_of(self.hyperparam) is not None:
            trainer.hyperparams.detach_schedule(self.hyperparam)

    def _epoch_schedule(self, trainer: Trainer) -> Callable[[Any], Any]:
        per_epoch = trainer.fit_config.get("steps_per_epoch")
        if not per_epoch:
            raise ConfigError(
                "LRScheduler(by='epoch') needs the number of steps per epoch, which this "
                "fit does not know (the training data is an iterable without len()). Give the "
                "iterable a __len__ (the number of batches it yields per epoch), or use "
                "by='step' with a schedule over steps."
            )
        # Anchor the count at the start of the epoch under way (a resume may start
        # mid-epoch), so a later fit with another batch size still counts epochs right.
        # Between fits trainer.epoch is the number of completed epochs: the 0-based index
        # of the epoch this fit starts or finishes.
        first_epoch = trainer.epoch
        first_step = trainer.step - trainer.batch_in_epoch
        schedule, per_epoch = self.schedule, int(per_epoch)

        def by_epoch(step: jax.Array) -> jax.Array:
            return schedule(first_epoch + jnp.maximum(step - first_step, 0) // per_epoch)

        return by_epoch


def _check_traceable(fn: Callable[[Any], Any], schedule: Callable[[Any], Any]) -> None:
    """Fail at fit start, not mid-compile, when the schedule cannot run inside jit."""
    try:
        out = jax.eval_shape(fn, jax.ShapeDtypeStruct((), jnp.int32))
    except Exception as e:  # any tracing failure: the message says which and why
        raise ConfigError(
            f"LRScheduler: the schedule {schedule!r} cannot run inside the jitted step "
            f"({type(e).__name__}: {str(e).splitlines()[0]}). It receives the step count as a "
            "traced int32 array: use jnp.where / jnp.minimum instead of Python if/min on it."
        ) from e
    if getattr(out, "shape", None) != ():
        raise ConfigError(
            "LRScheduler: the schedule must return a scalar, got shape "
            f"{getattr(out, 'shape', out)}"
        )
