"""Train the seed tutorial's CNN on scikit-learn's bundled digits, with callbacks.

Conv(32, 3x3) - Conv(16, 3x3) - Dense(10) on the 1,797 8x8 digit images that ship with
scikit-learn (real data, no download). The run warms up and decays the learning rate with
an optax schedule, halves it when validation loss stalls, checkpoints the best model, stops
early when nothing improves, and shows progress with rich. Run it again with ``--resume``
to continue from the newest checkpoint with ``Trainer.load``.

    python examples/digits_cnn.py                # ~10 s on 2 CPU cores, compilation included
    python examples/digits_cnn.py --epochs 30 --resume
    python examples/digits_cnn.py --smoke        # 2 epochs on 300 images
"""

from __future__ import annotations

import argparse
import os
import time

import flax.linen as nn
import numpy as np
import optax
from sklearn.datasets import load_digits

from jaxfit import Trainer
from jaxfit.callbacks import EarlyStopping, LRScheduler, ModelCheckpoint, ReduceOnPlateau, RichProgress


class CNN(nn.Module):
    """The seed tutorial's network: two 3x3 convolutions and a linear classifier."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(32, (3, 3))(x))
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        return nn.Dense(10)(x.reshape((x.shape[0], -1)))


def digits(seed: int = 0):
    """(x_train, y_train), (x_val, y_val): images (N, 8, 8, 1) in [0, 1], int labels."""
    ds = load_digits()
    x = (ds.images / 16.0).astype(np.float32)[..., None]
    y = ds.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    n_val = len(x) // 5
    return (x[n_val:], y[n_val:]), (x[:n_val], y[:n_val])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--run-dir", default="runs/digits_cnn")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir with Trainer.load")
    p.add_argument("--smoke", action="store_true", help="2 epochs on 300 images, for a quick check")
    args = p.parse_args()
    if args.smoke and not args.resume:
        args.epochs = 2

    if args.resume and os.path.isdir(args.run_dir):
        trainer = Trainer.load(args.run_dir)
        print(f"resuming {args.run_dir} at epoch {trainer.epoch}, step {trainer.step}")
        trainer.fit(epochs=args.epochs)
    else:
        (x_train, y_train), (x_val, y_val) = digits()
        if args.smoke:
            (x_train, y_train), (x_val, y_val) = (x_train[:240], y_train[:240]), (x_val[:60], y_val[:60])
        steps_per_epoch = -(-len(x_train) // args.batch_size)
        total_steps = steps_per_epoch * args.epochs
        trainer = Trainer(
            optimizer=optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9),
            loss="softmax_cross_entropy",
            metrics=["accuracy"],
            seed=0,
        )
        start = time.perf_counter()
        trainer.fit(
            CNN(),
            (x_train, y_train),
            validation_data=(x_val, y_val),
            epochs=args.epochs,
            batch_size=args.batch_size,
            callbacks=[
                LRScheduler(optax.warmup_cosine_decay_schedule(0.0, 0.05, steps_per_epoch, total_steps)),
                ReduceOnPlateau(monitor="val_loss", factor=0.5, patience=2),
                ModelCheckpoint(args.run_dir, monitor="val_accuracy", mode="max"),
                EarlyStopping(monitor="val_loss", patience=5, restore_best=True),
                RichProgress(),
            ],
        )
        print(f"trained {trainer.epoch} epochs in {time.perf_counter() - start:.1f} s")
    (_, _), (x_val, y_val) = digits()
    logs = trainer.evaluate((x_val, y_val))
    print(f"validation: loss {logs['loss']:.4f}, accuracy {logs['accuracy']:.4f}")
    print(f"checkpoints in {args.run_dir}; continue with: python examples/digits_cnn.py --resume --epochs 30")


if __name__ == "__main__":
    main()
