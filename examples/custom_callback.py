"""Write your own callbacks: a logger that adds a key to the history, and a stateful stopper.

Two callbacks built on the public protocol only (``jaxfit.Callback`` and the ``trainer``
handed to every hook):

* ``WeightNorm`` adds the global L2 norm of the params to the epoch logs. It is computed on
  the device and fetched once per epoch, never per step, and lands in ``history.history``,
  CSVLogger, RichProgress, ... like any metric.
* ``StopAtTarget`` stops the run once a monitored value has reached a target for a number of
  consecutive epochs. Its counter is state: ``state_dict``/``load_state_dict`` put it in
  every checkpoint, so a resumed run keeps counting where it stopped.

To ship callbacks like these as a plugin, declare them in your package's pyproject.toml::

    [project.entry-points."jaxfit.callbacks"]
    StopAtTarget = "my_package.callbacks:StopAtTarget"

and ``jaxfit.callbacks.available()`` lists them next to the built-ins.

    python examples/custom_callback.py           # about 10 s on 2 CPU cores
    python examples/custom_callback.py --smoke   # a tiny run, a few seconds
"""

from __future__ import annotations

import argparse
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from sklearn.datasets import load_digits

from jaxfit import Callback, Trainer
from jaxfit.callbacks import RichProgress


@jax.jit
def _global_norm(params: Any) -> jax.Array:
    return optax.tree.norm(params)  # the L2 norm over every leaf


class WeightNorm(Callback):
    """Adds ``weight_norm`` (the L2 norm of all params) to the logs of every epoch."""

    # Run before History (order 50) so the new key is recorded.
    order = -10
    # Declared, so a monitoring callback may watch it (trainer.check_monitor accepts it).
    log_keys = ("weight_norm",)

    def on_epoch_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        logs["weight_norm"] = float(_global_norm(trainer.params))  # one scalar, once an epoch


class StopAtTarget(Callback):
    """Stops once ``monitor`` has been at least ``target`` for ``epochs`` epochs in a row."""

    def __init__(self, monitor: str, target: float, epochs: int = 2) -> None:
        self.monitor, self.target, self.epochs = monitor, target, epochs
        self.streak = 0

    def on_fit_start(self, trainer: Trainer) -> None:
        trainer.check_monitor(self.monitor, owner=self)  # a typo fails now, not hours later
        if trainer.step == 0:  # a new run; a resumed one keeps its streak
            self.streak = 0

    def on_epoch_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        self.streak = self.streak + 1 if logs[self.monitor] >= self.target else 0
        if self.streak >= self.epochs:
            trainer.stop_training = True
            trainer.stop_reason = "target_reached"

    def state_dict(self) -> dict[str, Any]:
        return {"streak": self.streak}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.streak = int(state["streak"])


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(10)(nn.relu(nn.Dense(64)(x)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="a tiny, fast run")
    args = p.parse_args()

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    if args.smoke:
        x, y = x[:256], y[:256]
    n_val = len(x) // 5
    trainer = Trainer(
        optimizer=optax.inject_hyperparams(optax.adam)(learning_rate=3e-3),
        loss="softmax_cross_entropy",
        metrics=["accuracy"],
        seed=0,
    )
    stopper = StopAtTarget("val_accuracy", target=0.95, epochs=2)
    history = trainer.fit(
        MLP(),
        (x[n_val:], y[n_val:]),
        validation_data=(x[:n_val], y[:n_val]),
        epochs=2 if args.smoke else 40,
        batch_size=32,
        callbacks=[WeightNorm(), stopper, RichProgress()],
    )
    print("weight norm per epoch:", [round(v, 2) for v in history.history["weight_norm"]])
    print(f"stopped after epoch {trainer.epoch}: {trainer.stop_reason or 'ran all epochs'}")


if __name__ == "__main__":
    main()
