"""Change Adam's learning rate on the fly, schedule its b1, and compose a plateau with a schedule.

Three ways to move an optimizer hyperparameter while a model trains, none of which recompiles
the jitted train step (each part prints how many times the step was traced):

1. By hand: ``trainer.hyperparams["learning_rate"] = 1e-4`` between two ``fit`` calls, and from
   a callback in the middle of an epoch. The next step uses the new value.
2. Adam's ``b1`` on a schedule, as in the ``optax.inject_hyperparams`` documentation, then the
   same schedule driven by jaxfit's ``LRScheduler(schedule, hyperparam="b1")``: both runs end
   with the same weights.
3. A warmup-cosine ``LRScheduler`` with ``ReduceOnPlateau`` on top: every step uses
   ``schedule(step) * factor ** reductions``, checked against the values read back.

It writes a PNG of the values every step used, read back from the trainer.

    python examples/lr_on_the_fly.py            # about a minute on a laptop CPU
    python examples/lr_on_the_fly.py --smoke    # seconds
"""

from __future__ import annotations

import argparse
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import optax
from _helpers.hyperparam_trace import HyperparamTrace

from jaxfit import Callback, HyperparamError, Trainer
from jaxfit.callbacks import LRScheduler, ReduceOnPlateau
from jaxfit.datasets import load_digits_images
from jaxfit.plotting import Panel, plot_curves


class MLP(nn.Module):
    """A small classifier for 8x8 digit images."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(128)(x.reshape((x.shape[0], -1))))
        return nn.Dense(10)(x)


class SetAtStep(Callback):
    """Writes ``value`` into hyperparameter ``name`` once ``trainer.step`` reaches ``step``."""

    def __init__(self, name: str, step: int, value: float) -> None:
        self.name, self.step, self.value = name, step, value

    def on_train_batch_end(self, trainer, logs):
        if trainer.step == self.step:
            trainer.hyperparams[self.name] = self.value  # used from the next step on


class ScaleAtEpochStart(Callback):
    """Records the plateau multiplier in force during each epoch."""

    def __init__(self) -> None:
        self.scales: list[float] = []

    def on_epoch_start(self, trainer):
        self.scales.append(trainer.hyperparams.scale("learning_rate"))


def new_trainer(optimizer) -> Trainer:
    return Trainer(optimizer=optimizer, loss="softmax_cross_entropy", metrics=["accuracy"], seed=0)


def by_hand(data, args) -> HyperparamTrace:
    print("== 1. Adam's learning rate changed by hand ==")
    trainer = new_trainer(optax.inject_hyperparams(optax.adam)(learning_rate=1e-3))
    trace = HyperparamTrace("learning_rate")
    half, mid_step = args.epochs // 2, args.steps_per_epoch * args.epochs * 3 // 4
    trainer.fit(MLP(), (data.x_train, data.y_train), validation_data=(data.x_val, data.y_val),
                epochs=half, batch_size=args.batch_size,
                callbacks=[trace, SetAtStep("learning_rate", mid_step, 3e-5)])  # fmt: skip
    val_loss = trainer.history.history["val_loss"][-1]
    print(f"after epoch {trainer.epoch}: learning_rate {trainer.hyperparams['learning_rate']:.3g}, "
          f"val_loss {val_loss:.4f}")  # fmt: skip
    trainer.hyperparams["learning_rate"] = 1e-4  # by hand, between two fits
    print(f"set learning_rate = {trainer.hyperparams['learning_rate']:.3g}; training on")
    trainer.fit(epochs=args.epochs)  # continues the run: same data, callbacks and position
    used = dict(zip(trace.steps, trace.values))
    last_before = half * args.steps_per_epoch
    print(f"step {last_before} used {used[last_before]:.3g}, step {last_before + 1} used "
          f"{used[last_before + 1]:.3g}; after step {mid_step} the callback set 3e-05, "
          f"step {mid_step + 1} used {used[mid_step + 1]:.3g}")  # fmt: skip
    print(f"train step traced {trainer.trace_counts['train']} time(s): no recompilation")
    return trace


def scheduled_b1(data, args) -> tuple[HyperparamTrace, HyperparamTrace]:
    print("== 2. Adam's b1 on a schedule ==")
    n = args.steps_per_epoch * args.epochs // 2
    # The optax docs build b1 with piecewise_interpolate_schedule('linear', init_value=0.1,
    # boundaries_and_scales={100: 1.0}) and call it "linear from 0.1 to 1.0"; but the scale
    # multiplies the value, so that schedule stays at 0.1 (and b1 = 1.0 would freeze Adam's
    # first moment and zero its bias correction). A scale of 9 gives the ramp the docs mean,
    # ending at Adam's usual 0.9.
    b1 = optax.piecewise_interpolate_schedule("linear", 0.1, boundaries_and_scales={n: 9.0})
    fit_args = dict(validation_data=(data.x_val, data.y_val), epochs=args.epochs,
                    batch_size=args.batch_size)  # fmt: skip

    # (a) As in the optax docs: the schedule goes into inject_hyperparams and optax runs it.
    adam = optax.inject_hyperparams(optax.adam)
    optax_way = new_trainer(adam(learning_rate=1e-3, b1=b1, b2=0.99))
    trace_a = HyperparamTrace("b1")
    optax_way.fit(MLP(), (data.x_train, data.y_train), callbacks=[trace_a], **fit_args)
    try:
        optax_way.hyperparams["b1"] = 0.5
    except HyperparamError as e:  # optax would silently ignore this write: jaxfit refuses it
        print(f"writing a scheduled b1 is refused: {str(e).split(':')[0]}")

    # (b) The jaxfit way: b1 injected as a number, driven by LRScheduler (writable later on).
    jaxfit_way = new_trainer(adam(learning_rate=1e-3, b1=0.1, b2=0.99))
    trace_b = HyperparamTrace("b1")
    jaxfit_way.fit(MLP(), (data.x_train, data.y_train),
                   callbacks=[LRScheduler(b1, hyperparam="b1"), trace_b], **fit_args)  # fmt: skip
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(
        jax.tree_util.tree_leaves(jax.device_get(optax_way.params)),
        jax.tree_util.tree_leaves(jax.device_get(jaxfit_way.params))))  # fmt: skip
    print(f"b1 went {trace_a.values[0]:.3f} -> {trace_a.values[-1]:.3f}; the two runs' weights "
          f"differ by at most {diff:.2g}")  # fmt: skip
    print(f"train step traced {optax_way.trace_counts['train']} and "
          f"{jaxfit_way.trace_counts['train']} time(s)")  # fmt: skip
    return trace_a, trace_b


def plateau_on_schedule(data, args):
    print("== 3. ReduceOnPlateau on a warmup-cosine schedule ==")
    total = args.steps_per_epoch * args.epochs
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, 3e-3, warmup_steps=args.steps_per_epoch, decay_steps=total, end_value=3e-4
    )
    trace, scales = HyperparamTrace("learning_rate"), ScaleAtEpochStart()
    plateau = ReduceOnPlateau(monitor="val_loss", factor=0.5, patience=1, verbose=True)
    trainer = new_trainer(optax.inject_hyperparams(optax.adam)(learning_rate=0.0))
    trainer.fit(MLP(), (data.x_train, data.y_train), validation_data=(data.x_val, data.y_val),
                epochs=args.epochs, batch_size=args.batch_size,
                callbacks=[LRScheduler(schedule), plateau, trace, scales])  # fmt: skip
    # Step s (1-based) is the schedule's count s - 1, times the multiplier of its epoch.
    epoch_of = (np.asarray(trace.steps) - 1) // args.steps_per_epoch
    scale = np.asarray(scales.scales)[epoch_of]
    expected = np.asarray([schedule(s - 1) for s in trace.steps]) * scale
    err = float(np.max(np.abs(np.asarray(trace.values) - expected) / np.maximum(expected, 1e-12)))
    now = trainer.hyperparams.scale("learning_rate")
    print(f"{plateau.reductions} reduction(s), multiplier now {now:.3g}; every step used "
          f"schedule(step) x multiplier (max relative error {err:.1e})")  # fmt: skip
    print(f"train step traced {trainer.trace_counts['train']} time(s): no recompilation")
    return trace, schedule


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="a slice of the data, few epochs")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--out", default="runs/lr_on_the_fly/lr_on_the_fly.png", help="the PNG to write")
    args = p.parse_args(argv)
    data = load_digits_images()
    args.batch_size = 32
    if args.smoke:
        data, args.epochs = data.subset(256, 128), min(args.epochs, 4)
    args.steps_per_epoch = -(-len(data.x_train) // args.batch_size)
    print(f"data: {data.describe()}, batch size {args.batch_size}")

    manual = by_hand(data, args)
    b1_optax, b1_jaxfit = scheduled_b1(data, args)
    composed, schedule = plateau_on_schedule(data, args)
    schedule_alone = [float(schedule(s - 1)) for s in composed.steps]
    path = plot_curves(
        [
            Panel("1. changed by hand", "optimizer step", "learning rate",
                  {"used": (manual.steps, manual.values)}, logy=True),
            Panel("2. Adam's b1 on a schedule", "optimizer step", "b1",
                  {"optax inject_hyperparams": (b1_optax.steps, b1_optax.values),
                   "jaxfit LRScheduler": (b1_jaxfit.steps, b1_jaxfit.values)},
                  linestyles={"jaxfit LRScheduler": "--"}),
            Panel("3. warmup-cosine x plateau", "optimizer step", "learning rate",
                  {"schedule alone": (composed.steps, schedule_alone),
                   "used": (composed.steps, composed.values)},
                  colors={"schedule alone": "#7f7f7f"}, linestyles={"schedule alone": "--"}),
        ],
        Path(args.out),
        title="hyperparameters as the optimizer used them, step by step",
    )  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
