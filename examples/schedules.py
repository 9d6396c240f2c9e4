"""Which optax learning-rate schedule trains a small Flax CNN best? One run per schedule.

This redoes the study of the tutorial "Optax: Learning Rate Schedules for Flax (JAX) Networks":
Conv(32, 3x3)-Conv(16, 3x3)-Dense(10) trained with SGD on Fashion-MNIST for 10 epochs at batch
size 256, once per optax schedule. Every schedule goes through jaxfit's ``LRScheduler``, which
computes it inside the jitted step, so no step pays a host round trip for its learning rate.

It prints a table of the final validation accuracy and wall time of each run, and writes a PNG
with the learning rate every run actually used (read back from ``trainer.hyperparams`` while
training, not recomputed from the schedule) and the validation-accuracy curves.

Each schedule's own parameters are sized to the run (warmups of one epoch, boundaries at 30%,
60% and 80% of the steps, three SGDR cycles), so the study keeps its shape with any data size or
number of epochs; they are this example's choice, not copied from the tutorial. Without the
Fashion-MNIST files (and offline) it falls back to scikit-learn's digits and says so. On digits a
run is 60 steps (1,438 images at batch 256, 10 epochs) instead of 2,350: schedules that decay
early fall behind, and the accuracies are not the tutorial's 0.867-0.891 on Fashion-MNIST.

    python examples/schedules.py                  # the full study (Fashion-MNIST: ~2,350 steps/run)
    python examples/schedules.py --smoke          # 4 schedules, a slice of the data, 2 epochs
    python examples/schedules.py --only constant,sgdr --out lr.png
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import flax.linen as nn
import optax
from _helpers.hyperparam_trace import HyperparamTrace
from rich.console import Console
from rich.table import Table

from jaxfit import Trainer
from jaxfit.callbacks import LRScheduler
from jaxfit.datasets import load_image_dataset
from jaxfit.plotting import Panel, distinct_colors, plot_curves

# The tutorial sums the per-example loss over a batch of 256 and steps with SGD at 1e-4. jaxfit
# averages the loss over the batch, so the same step size is 1e-4 * 256.
TUTORIAL_LR = 1e-4 * 256
# Every schedule compiles its own train step (the schedule runs inside it), so a smoke run
# trains a few that between them cover warmup, decay, joins and restarts.
SMOKE = ["constant", "cosine_onecycle", "join_schedules", "sgdr"]


class CNN(nn.Module):
    """The tutorial's network: two 3x3 convolutions and a linear classifier."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(32, (3, 3))(x))
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        return nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))


def make_schedules(lr: float, steps_per_epoch: int, epochs: int) -> dict[str, optax.Schedule]:
    """The schedules of the study, sized to the run: ``epochs * steps_per_epoch`` steps."""
    total, epoch = epochs * steps_per_epoch, steps_per_epoch
    # Boundaries at 30%, 60% and 80% of the run, each halving the rate.
    halvings = {max(1, int(total * f)): 0.5 for f in (0.3, 0.6, 0.8)}
    restart = dict(init_value=0.0, peak_value=lr, warmup_steps=max(1, total // 20),
                   decay_steps=max(2, total // 3), end_value=0.0)  # fmt: skip
    return {
        "constant": optax.constant_schedule(lr),
        "cosine_decay": optax.cosine_decay_schedule(lr, decay_steps=total),
        "cosine_onecycle": optax.cosine_onecycle_schedule(total, peak_value=lr),
        "exponential_decay": optax.exponential_decay(lr, transition_steps=epoch, decay_rate=0.7),
        "linear_onecycle": optax.linear_onecycle_schedule(total, peak_value=lr),
        "linear": optax.linear_schedule(lr, lr / 100, transition_steps=total),
        "piecewise_constant": optax.piecewise_constant_schedule(lr, halvings),
        "piecewise_interpolate_linear": optax.piecewise_interpolate_schedule(
            "linear", lr, halvings
        ),
        "piecewise_interpolate_cosine": optax.piecewise_interpolate_schedule(
            "cosine", lr, halvings
        ),
        "polynomial": optax.polynomial_schedule(lr, lr / 100, power=2, transition_steps=total),
        "warmup_cosine_decay": optax.warmup_cosine_decay_schedule(
            0.0, lr, warmup_steps=epoch, decay_steps=total
        ),
        "warmup_exponential_decay": optax.warmup_exponential_decay_schedule(
            0.0, lr, warmup_steps=epoch, transition_steps=epoch, decay_rate=0.7
        ),
        # Warm up for an epoch, hold for four, then cosine-decay: three schedules joined.
        "join_schedules": optax.join_schedules(
            [
                optax.linear_schedule(0.0, lr, epoch),
                optax.constant_schedule(lr),
                optax.cosine_decay_schedule(lr, decay_steps=max(1, total - 5 * epoch)),
            ],
            boundaries=[epoch, 5 * epoch],
        ),
        "sgdr": optax.sgdr_schedule([restart] * 3),  # three warm restarts
    }


def run_one(name, schedule, data, args) -> dict:
    """Trains one CNN with ``schedule`` and returns its curves, final accuracy and time."""
    applied = HyperparamTrace("learning_rate", every_n_steps=args.lr_every)
    trainer = Trainer(
        optimizer=optax.inject_hyperparams(optax.sgd)(learning_rate=args.lr),
        loss="softmax_cross_entropy",
        metrics=["accuracy"],
        seed=args.seed,
    )
    start = time.perf_counter()
    history = trainer.fit(
        CNN(data.num_classes),
        (data.x_train, data.y_train),
        validation_data=(data.x_val, data.y_val),
        epochs=args.epochs,
        batch_size=args.batch_size,
        callbacks=[LRScheduler(schedule), applied],
    )
    seconds = time.perf_counter() - start
    val_acc = history.history["val_accuracy"]
    return {"name": name, "val_accuracy": val_acc, "seconds": seconds,
            "lr_steps": applied.steps, "lr_values": applied.values}  # fmt: skip


def print_table(results: list[dict], console: Console) -> None:
    best = max(r["val_accuracy"][-1] for r in results)
    table = Table(title="learning-rate schedules: final validation accuracy")
    table.add_column("schedule")
    table.add_column("val accuracy", justify="right")
    table.add_column("best epoch acc", justify="right")
    table.add_column("final lr", justify="right")
    table.add_column("wall time (s)", justify="right")
    for r in results:
        final = r["val_accuracy"][-1]
        table.add_row(
            r["name"],
            f"[bold green]{final:.4f}[/]" if final == best else f"{final:.4f}",
            f"{max(r['val_accuracy']):.4f}",
            f"{r['lr_values'][-1]:.3g}",
            f"{r['seconds']:.1f}",
        )
    console.print(table)
    console.print("wall time includes initialising and compiling each run "
                  "(every schedule is a new train step)")  # fmt: skip


def plot_study(results: list[dict], path: Path) -> Path:
    """One small learning-rate panel per schedule, then every validation-accuracy curve."""
    colors = dict(zip([r["name"] for r in results], distinct_colors(len(results))))
    panels = [
        Panel(r["name"], "optimizer step", "learning rate",
              {r["name"]: (r["lr_steps"], r["lr_values"])}, colors=colors)  # fmt: skip
        for r in results
    ]
    accuracy = {r["name"]: (list(range(1, len(r["val_accuracy"]) + 1)), r["val_accuracy"])
                for r in results}  # fmt: skip
    # The accuracy panel takes two whole rows, its legend beside it: 14 curves need the room.
    ncols = min(7, len(results))
    panels.append(Panel("validation accuracy of every schedule", "epoch", "accuracy", accuracy,
                        colors=colors, span=ncols, rows=2, legend="outside"))  # fmt: skip
    return plot_curves(
        panels, path, title="learning rate as applied at each step (read back from the trainer)",
        ncols=ncols, panel_size=(3.0, 2.6),
    )  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    smoke_help = f"{len(SMOKE)} of the schedules, a slice of the data, 2 epochs"
    p.add_argument("--smoke", action="store_true", help=smoke_help)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=TUTORIAL_LR, help="base learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST IDX files")
    p.add_argument("--out", default="runs/schedules/schedules.png", help="the PNG to write")
    p.add_argument("--only", default=None, help="comma-separated schedule names")
    args = p.parse_args(argv)
    if args.smoke:
        args.epochs, args.batch_size = min(args.epochs, 2), min(args.batch_size, 64)
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    console = Console()
    # Smoke runs never download: they use Fashion-MNIST only if it is already on disk.
    data = load_image_dataset(args.data_dir, download=not args.smoke)
    if data.fallback_reason:
        console.print(f"[yellow]note:[/] {data.fallback_reason}")
    if args.smoke:
        data = data.subset(512, 256)
    console.print(f"data: {data.describe(with_reason=False)}")
    steps_per_epoch = -(-len(data.x_train) // args.batch_size)
    schedules = make_schedules(args.lr, steps_per_epoch, args.epochs)
    names = args.only.split(",") if args.only else SMOKE if args.smoke else list(schedules)
    unknown = sorted(set(names) - set(schedules))
    if unknown:
        raise SystemExit(f"unknown schedule(s) {unknown}; choose from: {', '.join(schedules)}")
    if args.smoke and not args.only:
        console.print(f"smoke run: {len(names)} of the {len(schedules)} schedules")
    args.lr_every = max(1, steps_per_epoch * args.epochs // 200)  # ~200 points per curve
    results = []
    for i, name in enumerate(names, 1):
        result = run_one(name, schedules[name], data, args)
        console.print(
            f"[{i}/{len(names)}] {name}: val accuracy {result['val_accuracy'][-1]:.4f} "
            f"in {result['seconds']:.1f} s"
        )
        results.append(result)
    print_table(results, console)
    path = plot_study(results, Path(args.out))
    console.print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
