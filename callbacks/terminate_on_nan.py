"""TerminateOnNaN: stop at the first non-finite loss, without a host sync per step."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from jaxfit.callback import Callback

from ._checks import EveryNSteps, check_every

if TYPE_CHECKING:  # pragma: no cover
    from jaxfit.trainer import Trainer

STOP_REASON = "terminate_on_nan"


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    leaves = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


class TerminateOnNaN(Callback):
    """Stops training when the loss becomes NaN or infinite, and keeps such weights unsaved.

    The check costs nothing per step: the engine already sums the loss of every step of the
    epoch on the device, and a single non-finite loss makes that sum non-finite. So every
    ``every_n_steps`` steps (and at every epoch end) this callback reads the epoch-so-far
    loss once (``trainer.running_logs()``), which covers every step since the epoch began.
    On a non-finite value it sets ``trainer.stop_training``, ``trainer.stop_reason =
    "terminate_on_nan"`` and :attr:`detected`; the run stops at the end of the step under
    way.

    NaN weights never reach a checkpoint: ``ModelCheckpoint`` writes nothing once
    ``trainer.stop_reason == "terminate_on_nan"`` (this callback runs before it, order -50
    against 100, so an epoch-end save sees the verdict on that epoch), and it skips any save
    whose params are not finite. :meth:`check` tests the weights on demand, for other
    writers.

    A NaN guard inside the step (skip the update, count it) is
    ``optax.apply_if_finite``; this callback is for stopping the run.

    Args:
        every_n_steps: how often to look at the epoch-so-far loss during an epoch (one
            device sync each time); ``None`` looks only at epoch ends.

    Attributes:
        detected: True once a non-finite loss or weight was seen.
        detected_at_step: ``trainer.step`` when it was seen (the NaN may be up to
            ``every_n_steps`` steps older).

    Example:
        >>> from jaxfit.callbacks import TerminateOnNaN
        >>> guard = TerminateOnNaN(every_n_steps=50)
        >>> guard.detected
        False
    """

    order = -50

    def __init__(self, every_n_steps: int | None = 100) -> None:
        self.every_n_steps = check_every("TerminateOnNaN", "every_n_steps", every_n_steps)
        self.detected = False
        self.detected_at_step: int | None = None
        self._every = EveryNSteps(self.every_n_steps)

    def on_fit_start(self, trainer: Trainer) -> None:
        self.detected = False
        self.detected_at_step = None
        self._every.start(trainer.step)

    def wants_batch_hooks(self, trainer: Trainer) -> bool:
        return self.every_n_steps is not None

    def on_train_batch_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        if not self._every.due(trainer.step):
            return
        loss = trainer.running_logs().get("loss", 0.0)
        if not math.isfinite(loss):
            self._stop(trainer)

    def on_epoch_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        if not all(math.isfinite(float(logs[k])) for k in ("loss",) if k in logs):
            self._stop(trainer)

    def check(self, trainer: Trainer) -> bool:
        """Whether the current weights may be saved: False once anything non-finite was seen.

        For writers of weights other than ModelCheckpoint (an export, an EMA copy).

        Tests every float array of ``trainer.params`` and ``trainer.model_state`` on the
        device and reads back one bool (a sync, cheap beside writing a checkpoint). A
        non-finite weight stops the run as a non-finite loss does.
        """
        if self.detected:
            return False
        if not bool(_all_finite((trainer.params, trainer.model_state))):
            self._stop(trainer)
            return False
        return True

    def _stop(self, trainer: Trainer) -> None:
        if not self.detected:
            self.detected = True
            self.detected_at_step = int(trainer.step)
        trainer.stop_training = True
        trainer.stop_reason = STOP_REASON
