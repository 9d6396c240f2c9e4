"""A warmup-cosine schedule and plateau reductions on the same learning rate.

``LRScheduler`` computes the schedule inside the jitted step; ``ReduceOnPlateau`` watching
the validation loss multiplies it from then on, so every step uses
``schedule(step) * factor ** reductions``. Keras raises a TypeError for this pairing, and
Lightning and Hugging Face cannot chain the two. ``LearningRateMonitor`` records the value
each epoch ended with, which this script prints next to the schedule's own value.

The data is a noisy regression problem whose validation loss flattens early, so the plateau
callback has something to react to.

    python examples/lr_plateau.py           # about 10 s on 2 CPU cores
    python examples/lr_plateau.py --smoke   # a tiny run, a few seconds
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import numpy as np
import optax

from jaxfit import Trainer
from jaxfit.callbacks import LearningRateMonitor, LRScheduler, ReduceOnPlateau, RichProgress


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(1)(nn.tanh(nn.Dense(32)(x)))


def noisy_regression(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype(np.float32)
    y = np.sin(x[:, :1] * 2) + 0.5 * x[:, 1:2] + rng.normal(scale=0.3, size=(n, 1))
    return x, y.astype(np.float32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="a tiny, fast run")
    args = p.parse_args()

    n, epochs, batch = (256, 6, 32) if args.smoke else (4096, 30, 64)
    x, y = noisy_regression(n)
    xv, yv = noisy_regression(n // 4, seed=1)
    steps_per_epoch = -(-n // batch)
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=0.05,
        warmup_steps=steps_per_epoch,
        decay_steps=epochs * steps_per_epoch,
        end_value=1e-3,
    )
    plateau = ReduceOnPlateau(
        monitor="val_loss",
        factor=0.5,
        patience=1 if args.smoke else 2,
        min_delta=2e-2 if args.smoke else 1e-3,
        min_lr=1e-4,
    )
    trainer = Trainer(
        optimizer=optax.inject_hyperparams(optax.sgd)(learning_rate=0.0, momentum=0.9),
        loss="mse",
        seed=0,
    )
    history = trainer.fit(
        MLP(),
        (x, y),
        validation_data=(xv, yv),
        epochs=epochs,
        batch_size=batch,
        callbacks=[LRScheduler(schedule), plateau, LearningRateMonitor(), RichProgress()],
    )

    print(f"\n{'epoch':>5} {'val_loss':>9} {'schedule':>10} {'used':>10}  plateau factor")
    for epoch, (val, used) in enumerate(
        zip(history.history["val_loss"], history.history["learning_rate"], strict=True), 1
    ):
        scheduled = float(schedule(epoch * steps_per_epoch - 1))  # the epoch's last step
        print(f"{epoch:>5} {val:>9.4f} {scheduled:>10.2e} {used:>10.2e}  {used / scheduled:.4g}")
    print(f"{plateau.reductions} plateau reduction(s); total factor {plateau.total_factor:g}")


if __name__ == "__main__":
    main()
