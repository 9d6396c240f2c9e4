"""Train the seed tutorial's CNN on scikit-learn's bundled digits, with callbacks.

Conv(32, 3x3) - Conv(16, 3x3) - Dense(10) on the 1,797 8x8 digit images that ship with
scikit-learn (real data, no download). The run warms up and decays the learning rate with
an optax schedule, halves it when validation loss stalls, checkpoints the best model, stops
early when nothing improves, and shows progress with rich.

Every run gets a new run directory, ``runs/digits_cnn/version_N`` (N = 0, 1, ...), so the
script can be run again and again; ``--run-dir`` names one instead (it must be new or
empty). ``--resume`` continues the newest version (or ``--run-dir``) with
``Trainer.load``:

* a run that was interrupted (Ctrl-C, a kill, a crash) continues exactly where it stopped;
* a run that finished (early-stopped, or all its epochs done) trains further with
  ``--epochs N``, a total: EarlyStopping's patience starts over (its best value and best
  weights are kept, so ``restore_best`` still returns the best epoch of the whole run), and
  the learning rate decays along a cosine from the value the last step used to 0 at epoch N
  (the original schedule was sized for the first run's epochs and has already reached 0).
  ReduceOnPlateau keeps its state and its reductions.

    python examples/digits_cnn.py                # ~10 s on 2 CPU cores, compilation included
    python examples/digits_cnn.py --resume --epochs 30
    python examples/digits_cnn.py --smoke        # 2 epochs on 300 images
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

from jaxfit import Trainer
from jaxfit.callbacks import (
    EarlyStopping,
    LRScheduler,
    ModelCheckpoint,
    ReduceOnPlateau,
    RichProgress,
)

RUNS = Path("runs/digits_cnn")


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


def versions(root: Path) -> list[int]:
    """The N of every ``version_N`` folder under ``root``, ascending."""
    if not root.is_dir():
        return []
    found = (re.fullmatch(r"version_(\d+)", p.name) for p in root.iterdir() if p.is_dir())
    return sorted(int(m.group(1)) for m in found if m)


def holds_a_run(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def run_dir_for(args: argparse.Namespace) -> Path:
    """The run directory this invocation uses; exits with a message naming the ways out."""
    if args.run_dir is not None:
        run_dir = Path(args.run_dir)
        if args.resume and not holds_a_run(run_dir):
            sys.exit(f"error: --resume: {run_dir} holds no run to resume. Train one there first: "
                     f"python examples/digits_cnn.py --run-dir {run_dir}")
        if not args.resume and holds_a_run(run_dir):
            # Refused before any work; ModelCheckpoint would refuse it too (it never mixes
            # two runs in one directory).
            sys.exit(f"error: {run_dir} already holds a run. Continue it with "
                     f"`python examples/digits_cnn.py --resume --run-dir {run_dir}`, or train a "
                     f"new one in a new directory (`--run-dir NEW`, or no --run-dir for the next "
                     f"{RUNS}/version_N); from Python, Trainer.load({str(run_dir)!r}).fit().")
        return run_dir
    found = versions(RUNS)
    if args.resume:
        if not found:
            sys.exit(f"error: --resume: no run under {RUNS} yet. Train one first: "
                     "python examples/digits_cnn.py")
        return RUNS / f"version_{found[-1]}"
    return RUNS / f"version_{found[-1] + 1 if found else 0}"


def train_new(args: argparse.Namespace, run_dir: Path) -> Trainer:
    (x_train, y_train), (x_val, y_val) = digits()
    if args.smoke:
        x_train, y_train, x_val, y_val = x_train[:240], y_train[:240], x_val[:60], y_val[:60]
    steps_per_epoch = -(-len(x_train) // args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    warmup_cosine = optax.warmup_cosine_decay_schedule(0.0, 0.05, steps_per_epoch, total_steps)
    trainer = Trainer(
        optimizer=optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9),
        loss="softmax_cross_entropy",
        metrics=["accuracy"],
        seed=0,
    )
    trainer.fit(
        CNN(),
        (x_train, y_train),
        validation_data=(x_val, y_val),
        epochs=args.epochs,
        batch_size=args.batch_size,
        callbacks=[
            LRScheduler(warmup_cosine),
            ReduceOnPlateau(monitor="val_loss", factor=0.5, patience=2),
            ModelCheckpoint(run_dir, monitor="val_accuracy", mode="max"),
            EarlyStopping(monitor="val_loss", patience=5, restore_best=True),
            RichProgress(),
        ],
    )
    return trainer


def cosine_from(base: float, start_step: int, steps: int):
    """A schedule over the run's step count: ``base`` at ``start_step``, 0 ``steps`` later."""
    decay = optax.cosine_decay_schedule(base, max(steps, 1))

    def further(count):
        return decay(jnp.maximum(count - start_step, 0))

    return further


def train_further(trainer: Trainer, epochs: int) -> None:
    """Prepare a finished run to train on to ``epochs``: see the module docstring."""
    recipe = trainer.recipe()
    callbacks, fit_args = recipe["callbacks"], recipe["fit"]
    for stop in (cb for cb in callbacks if isinstance(cb, EarlyStopping)):
        # Patience starts over; best and best weights stay, so restore_best still gives
        # the best epoch of the whole run.
        stop.wait, stop.stopped_epoch = 0, 0
    x_train = fit_args["data"][0]
    steps_per_epoch = math.ceil(len(x_train) / fit_args["batch_size"])
    remaining = (epochs - trainer.epoch) * steps_per_epoch
    for sched in (cb for cb in callbacks if isinstance(cb, LRScheduler)):
        # The value the last step used is schedule(step) * (ReduceOnPlateau's factor): the
        # new schedule starts from the same value, with the factor still applied on top.
        hp = trainer.hyperparams
        base = hp[sched.hyperparam] / hp.scale(sched.hyperparam)
        sched.schedule = cosine_from(base, trainer.step, remaining)
    print(f"training further to epoch {epochs}: EarlyStopping's patience starts over, the "
          f"learning rate decays from {trainer.hyperparams['learning_rate']:.3g} to 0 "
          f"at epoch {epochs}")


def resume(args: argparse.Namespace, run_dir: Path, epochs_given: bool) -> Trainer:
    trainer = Trainer.load(str(run_dir))
    recipe = trainer.recipe()
    planned = recipe["fit"].get("epochs", trainer.epoch)
    stopped = any(cb.stopped_epoch for cb in recipe["callbacks"] if isinstance(cb, EarlyStopping))
    finished = stopped or trainer.stop_reason == "early_stopping" or trainer.epoch >= planned
    print(f"resuming {run_dir} at epoch {trainer.epoch}, step {trainer.step}"
          + (f" (finished: {trainer.stop_reason or 'all epochs done'})" if finished else ""))
    if not epochs_given:
        if finished:
            print(f"nothing to do: the run has finished. Train further with "
                  f"--resume --run-dir {run_dir} --epochs N (N > {trainer.epoch})")
            return trainer
        trainer.fit()  # an interrupted run: exactly where it stopped
        return trainer
    if args.epochs <= trainer.epoch:
        print(f"nothing to do: the run has trained {trainer.epoch} epochs already; --epochs is "
              f"the total to reach, pass more than {trainer.epoch}")
        return trainer
    if finished:
        train_further(trainer, args.epochs)
    trainer.fit(epochs=args.epochs)
    return trainer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=None,
                   help="the total number of epochs to reach (default 15; --smoke: 2)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--run-dir", default=None,
                   help=f"the run directory (default: a new {RUNS}/version_N; with --resume, "
                        "the newest)")  # fmt: skip
    p.add_argument("--resume", action="store_true",
                   help="continue the run with Trainer.load; with --epochs, train a finished "
                        "run further")  # fmt: skip
    p.add_argument("--smoke", action="store_true", help="2 epochs on 300 images, for a quick check")
    args = p.parse_args()
    epochs_given = args.epochs is not None
    if not epochs_given:
        args.epochs = 2 if args.smoke else 15

    run_dir = run_dir_for(args)  # before any work: a conflict costs no time
    trainer = resume(args, run_dir, epochs_given) if args.resume else train_new(args, run_dir)
    # The time of the fit is in RichProgress's summary above ("Trained ... in").
    (_, _), (x_val, y_val) = digits()
    logs = trainer.evaluate((x_val, y_val))
    print(f"validation: loss {logs['loss']:.4f}, accuracy {logs['accuracy']:.4f}")
    further = max(30, trainer.epoch + 15)
    print(f"checkpoints in {run_dir}; train further with: python examples/digits_cnn.py "
          f"--resume --run-dir {run_dir} --epochs {further}")


if __name__ == "__main__":
    main()
