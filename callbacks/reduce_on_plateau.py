"""ReduceOnPlateau: lower a hyperparameter when a monitored quantity stops improving."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from jaxfit.errors import ConfigError

from ._checks import check_count, check_number
from ._monitor import MonitorCallback

if TYPE_CHECKING:  # pragma: no cover
    from jaxfit.trainer import Trainer


class ReduceOnPlateau(MonitorCallback):
    """Multiplies a hyperparameter by ``factor`` when ``monitor`` has plateaued.

    Keras's ReduceLROnPlateau, epoch by epoch, in this order:

    ==========================================  ===========================================
    condition                                   action
    ==========================================  ===========================================
    in cooldown (``cooldown_counter > 0``)      ``cooldown_counter -= 1``; ``wait := 0``
    value beats best by more than min_delta     ``best := value``; ``wait := 0``
    else, if no longer in cooldown              ``wait += 1``
    ... and ``wait >= patience``                if the value in use ``> min_lr``: reduce
                                                (below), ``cooldown_counter := cooldown``,
                                                ``wait := 0``; at ``min_lr`` nothing
                                                happens and ``wait`` keeps counting
    ==========================================  ===========================================

    An epoch that ends a cooldown (the counter reaches 0) can already count towards
    ``wait``. ``patience=0`` reduces at every epoch that does not improve (outside
    cooldown). Improvement is absolute (``value < best - min_delta`` in ``"min"`` mode),
    so negative metrics work. ``best`` starts at ``+inf`` (``"min"``) or ``-inf``
    (``"max"``), as in Keras's ReduceLROnPlateau: a first value equal to it (a diverged
    first epoch) is no improvement and counts towards ``patience``.

    How it reduces:

    * The hyperparameter is plain (no schedule attached): ``new = max(old * factor,
      min_lr)`` is written with ``trainer.hyperparams[name] = new``.
    * A schedule drives it (an ``LRScheduler`` on the same hyperparameter): the schedule's
      multiplier is lowered instead (``trainer.hyperparams.set_scale``), so every later
      step uses ``schedule(step) * factor**n`` — a warmup-cosine schedule and plateau
      reductions compose. ``min_lr`` bounds each reduction at the moment it is made: the
      multiplier is lowered at most until the value in use equals ``min_lr``, and no
      reduction is made when it is already ``<= min_lr``. The schedule's own movement is
      left alone, so a schedule that decays (or warms up) afterwards still moves the value
      below (or above) ``min_lr``.

    "The value in use" is ``trainer.hyperparams[name]``, the value the last step used. It
    goes into the epoch's logs under the hyperparameter's name (``logs["learning_rate"]``,
    declared in ``log_keys``) before any reduction, so the History records the value each
    epoch applied and ``python -m jaxfit plot`` draws it.

    ``check_on="validation"`` applies the same table at each validation end instead, the
    validations every ``validation_steps_freq`` steps included: ``patience`` and
    ``cooldown`` then count validations, and the value in use is also written into that
    validation's logs (``history.validations`` records it). The epoch logs still get it.

    State (``best``, ``wait``, ``cooldown_counter``, the number of reductions and the total
    factor applied) survives a resume; the reduced value itself lives in the optimizer
    state (or the schedule multiplier, in the train state) and is checkpointed with it.

    Args:
        monitor: the log key to watch, e.g. ``"val_loss"`` (needs ``validation_data``).
        mode: ``"min"``, ``"max"`` or ``"auto"`` (from the name).
        factor: the multiplier of each reduction, in (0, 1).
        patience: epochs (validations, with ``check_on="validation"``) without improvement
            before reducing.
        min_delta: the smallest absolute change that counts as an improvement.
        cooldown: epochs after a reduction during which no further reduction is counted.
        min_lr: the lowest value a reduction sets.
        hyperparam: the injected hyperparameter to reduce.
        verbose: print a line at each reduction.
        check_on: ``"epoch"`` (decide at epoch ends) or ``"validation"`` (at each
            validation end, mid-epoch step validations included).

    Example:
        >>> from jaxfit.callbacks import ReduceOnPlateau
        >>> plateau = ReduceOnPlateau(monitor="val_loss", factor=0.5, patience=2)
        >>> plateau.mode, plateau.factor
        ('min', 0.5)
    """

    log_keys: tuple[str, ...] = ("learning_rate",)

    def __init__(
        self,
        monitor: str = "val_loss",
        mode: str = "auto",
        factor: float = 0.1,
        patience: int = 10,
        min_delta: float = 1e-4,
        cooldown: int = 0,
        min_lr: float = 0.0,
        hyperparam: str = "learning_rate",
        verbose: bool = False,
        check_on: str = "epoch",
    ) -> None:
        super().__init__(monitor, mode, min_delta, check_on)
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < 1:
            raise ConfigError(
                f"ReduceOnPlateau: factor must be in the range (0, 1), got factor = {factor!r}"
            )
        self.factor = float(factor)
        self.patience = check_count("ReduceOnPlateau", "patience", patience)
        self.cooldown = check_count("ReduceOnPlateau", "cooldown", cooldown)
        self.min_lr = check_number("ReduceOnPlateau", "min_lr", min_lr)
        self.hyperparam = hyperparam
        if hyperparam != "learning_rate":
            self.log_keys = (hyperparam,)
        self.verbose = bool(verbose)
        self._reset()

    @property
    def state_key(self) -> str:
        base = type(self).__name__
        return base if self.hyperparam == "learning_rate" else f"{base}[{self.hyperparam}]"

    def _reset(self) -> None:
        self.reset_best()
        self.wait = 0
        self.cooldown_counter = 0
        self.reductions = 0
        self.total_factor = 1.0

    def in_cooldown(self) -> bool:
        return self.cooldown_counter > 0

    def on_fit_start(self, trainer: Trainer) -> None:
        super().on_fit_start(trainer)
        trainer.hyperparams.check_writable(self.hyperparam, owner=self)
        if trainer.step == 0:
            self._reset()

    def on_epoch_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        # The value this epoch applied, before a reduction changes it for the next.
        logs[self.hyperparam] = trainer.hyperparams[self.hyperparam]
        super().on_epoch_end(trainer, logs)

    def check(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        # The value the steps before this check applied, before a reduction changes it.
        logs[self.hyperparam] = trainer.hyperparams[self.hyperparam]
        value = self.monitored(logs)
        if self.in_cooldown():
            self.cooldown_counter -= 1
            self.wait = 0
        if self.is_improvement(value):
            self.record_best(value)
            self.wait = 0
        elif not self.in_cooldown():
            self.wait += 1
            if self.wait >= self.patience and self._reduce(trainer):
                self.cooldown_counter = self.cooldown
                self.wait = 0

    def _reduce(self, trainer: Trainer) -> bool:
        """Apply one reduction; False when the value in use is already at ``min_lr``."""
        hp, name = trainer.hyperparams, self.hyperparam
        old = hp[name]
        # Compare in float32 as the optimizer stores it: a value written as min_lr reads
        # back rounded and must count as "at min_lr".
        if not old > np.float32(self.min_lr):
            return False
        # Multiply by factor itself unless min_lr clips, so n reductions give factor**n.
        step_factor = self.factor if old * self.factor >= self.min_lr else self.min_lr / old
        new = old * step_factor
        if hp.schedule_of(name) is not None:
            hp.set_scale(name, hp.scale(name) * step_factor)
        else:
            hp[name] = new
        self.reductions += 1
        self.total_factor *= step_factor
        if self.verbose:
            at = f"Epoch {trainer.epoch}" if self.check_on == "epoch" else f"Step {trainer.step}"
            print(f"{at}: ReduceOnPlateau lowered {name} from {old:.4g} to {new:.4g}")
        return True

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "wait": self.wait,
            "cooldown_counter": self.cooldown_counter,
            "reductions": self.reductions,
            "total_factor": self.total_factor,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = float(state["best"])
        self.has_best = self.best != self.worst
        self.wait = int(state["wait"])
        self.cooldown_counter = int(state["cooldown_counter"])
        self.reductions = int(state["reductions"])
        self.total_factor = float(state["total_factor"])
