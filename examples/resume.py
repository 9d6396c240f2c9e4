"""Take a break and resume: stop a run with Ctrl-C (or SIGTERM), then ``Trainer.load(run).fit()``.

1. A child process trains a small CNN with Dropout (Adam, a warmup-cosine ``LRScheduler``,
   ``ModelCheckpoint`` every epoch) and is interrupted in the middle of an epoch: it sends
   itself SIGINT, the signal Ctrl-C sends, after a fixed step, so every run of this example
   stops at the same place. jaxfit finishes the step, writes a checkpoint of it and ends
   ``fit`` with ``KeyboardInterrupt`` (SIGTERM: ``jaxfit.Preempted``, exit status 143).
2. This process reads the checkpoint as plain data (nothing unpickled): the params and the
   optimizer state are two separate entries, and the optimizer state holds Adam's moments,
   its step count and the injected learning rate.
3. ``Trainer.load(run)`` rebuilds the trainer; both params and optimizer state come back bit
   for bit, and ``fit()`` carries on from the same step of the same epoch.
4. The same run trained without a break ends with exactly the same weights and history.

    python examples/resume.py                    # about half a minute on a laptop CPU
    python examples/resume.py --smoke            # seconds
    python examples/resume.py --signal term      # a preemption instead of Ctrl-C
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import flax.linen as nn
import numpy as np
import optax

from jaxfit import Callback, Preempted, Trainer
from jaxfit.callbacks import LearningRateMonitor, LRScheduler, ModelCheckpoint
from jaxfit.checkpoint import read_checkpoint
from jaxfit.datasets import load_digits_images
from jaxfit.plotting import plot_command

SIGNALS = {"int": signal.SIGINT, "term": signal.SIGTERM}


class CNN(nn.Module):
    """Two convolutions and a Dropout: the dropout RNG must resume exactly too."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        x = nn.Dropout(0.25, deterministic=not train)(x.reshape((x.shape[0], -1)))
        return nn.Dense(10)(x)


class SignalAt(Callback):
    """Sends this process ``signum`` after optimizer step ``step`` (once, even after a resume)."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum, self.fired = step, int(signum), False

    def on_train_batch_end(self, trainer, logs):
        if trainer.step == self.step and not self.fired:
            self.fired = True
            os.kill(os.getpid(), self.signum)  # what Ctrl-C (or a scheduler's SIGTERM) does

    def state_dict(self):
        return {"fired": self.fired}

    def load_state_dict(self, state):
        self.fired = bool(state["fired"])


def settings(smoke: bool) -> dict:
    data = load_digits_images()
    if smoke:
        data = data.subset(512, 128)
    batch_size, epochs = 32, 3 if smoke else 8
    steps_per_epoch = -(-len(data.x_train) // batch_size)
    return dict(data=data, batch_size=batch_size, epochs=epochs, steps_per_epoch=steps_per_epoch,
                stop_at=steps_per_epoch * (epochs // 2) + steps_per_epoch // 2)  # fmt: skip


def train(s: dict, callbacks: list[Callback]) -> Trainer:
    """The run, identical in the child and in the uninterrupted reference."""
    total = s["epochs"] * s["steps_per_epoch"]
    schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, s["steps_per_epoch"], total)
    trainer = Trainer(
        optimizer=optax.inject_hyperparams(optax.adam)(learning_rate=0.0),
        loss="softmax_cross_entropy",
        metrics=["accuracy"],
        seed=0,
    )
    data = s["data"]
    trainer.fit(CNN(), (data.x_train, data.y_train), validation_data=(data.x_val, data.y_val),
                epochs=s["epochs"], batch_size=s["batch_size"],
                callbacks=[LRScheduler(schedule), LearningRateMonitor(), *callbacks])  # fmt: skip
    return trainer


def child(run_dir: str, smoke: bool, signal_name: str) -> None:
    s = settings(smoke)
    print(f"training {s['epochs']} epochs of {s['steps_per_epoch']} steps; "
          f"SIG{signal_name.upper()} after step {s['stop_at']}", flush=True)  # fmt: skip
    checkpoint = ModelCheckpoint(run_dir, every_n_epochs=1)
    try:
        trainer = train(s, [checkpoint, SignalAt(s["stop_at"], SIGNALS[signal_name])])
    except KeyboardInterrupt:
        print("interrupted (KeyboardInterrupt); the checkpoint of the last step is on disk")
        sys.exit(130)  # the shell's status for a Ctrl-C
    except Preempted:
        print("preempted (jaxfit.Preempted, exit status 143); the checkpoint of the last step "
              "is on disk")  # fmt: skip
        raise
    print(f"finished without interruption at step {trainer.step}")


def flat(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """{"a/b/c": array} from nested dicts, to compare states leaf by leaf."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = np.asarray(value)
    return out


def identical(a: dict, b: dict) -> bool:
    fa, fb = flat(a), flat(b)
    return fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k]) for k in fa)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="a slice of the data, 3 epochs")
    p.add_argument("--signal", choices=sorted(SIGNALS), default="int", help="Ctrl-C or SIGTERM")
    p.add_argument("--run-dir", default=None, help="a new or empty folder (default: a temp dir)")
    p.add_argument("--out", default=None,
                   help="the PNG of the run's curves (default: history.png in the run directory)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args.run_dir, args.smoke, args.signal)

    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="jaxfit-resume-"))
    if run_dir.exists() and any(run_dir.iterdir()):
        raise SystemExit(f"{run_dir} is not empty: pass a new --run-dir (nothing is overwritten)")
    print(f"== 1. train in a child process, stop it mid-epoch ({run_dir}) ==")
    cmd = [sys.executable, __file__, "--child", "--run-dir", str(run_dir), "--signal", args.signal]
    proc = subprocess.run(cmd + (["--smoke"] if args.smoke else []), capture_output=True, text=True)
    for line in (proc.stdout + proc.stderr).strip().splitlines()[-4:]:
        print(f"  [child] {line}")
    expected_status = {"int": 130, "term": 143}[args.signal]
    if proc.returncode != expected_status:
        raise SystemExit(f"the child exited {proc.returncode}, expected {expected_status}")
    print(f"child exit status {proc.returncode}")

    print("== 2. the checkpoint, read as data (no unpickling) ==")
    ckpt_dir, manifest, state = read_checkpoint(run_dir)
    saved = state["train_state"]["state"]  # the step's state: params, model_state, opt_state
    print(f"{ckpt_dir.name}: step {manifest['step']}, epoch {manifest['epoch']} done, "
          f"batch {state['batch_in_epoch']} of the next")  # fmt: skip
    params, opt = flat(saved["params"]), flat(saved["opt_state"])
    print(f"  params: {len(params)} arrays, {sum(v.size for v in params.values()):,} values "
          f"({', '.join(sorted({k.split('/')[0] for k in params}))})")  # fmt: skip
    moments = {m: sum(f"/{m}/" in k for k in opt) for m in ("mu", "nu")}
    injected = ", ".join(f"{k.split('/')[-1]}={float(v):.3g}" for k, v in opt.items()
                         if k.startswith("hyperparams/"))  # fmt: skip
    print(f"  opt_state: {len(opt)} arrays: Adam's step count {int(opt['inner_state/0/count'])}, "
          f"its moments mu and nu ({moments['mu']} + {moments['nu']} arrays shaped like the "
          f"params), the injected {injected}")  # fmt: skip

    print("== 3. Trainer.load(run).fit() ==")
    trainer = Trainer.load(str(run_dir))
    live = trainer.state_dict()["train_state"]["state"]
    print(f"loaded at step {trainer.step} (epoch {trainer.epoch} done, {trainer.batch_in_epoch} "
          f"batches into the next); params restored bit for bit: "
          f"{identical(live['params'], saved['params'])}; optimizer state restored bit for bit: "
          f"{identical(live['opt_state'], saved['opt_state'])}")  # fmt: skip
    history = trainer.fit()
    print(f"resumed run finished: step {trainer.step}, "
          f"val_accuracy {history.history['val_accuracy'][-1]:.4f}")  # fmt: skip

    print("== 4. the same run without a break ==")
    reference = train(settings(args.smoke), [])
    same_state = identical(
        trainer.state_dict()["train_state"], reference.state_dict()["train_state"]
    )
    ours, theirs = history.history, reference.history.history
    same_history = ours.keys() == theirs.keys() and all(
        np.array_equal(ours[k], theirs[k], equal_nan=True) for k in ours
    )
    print(f"resumed == uninterrupted: train state identical {same_state}, history identical "
          f"{same_history}")  # fmt: skip
    print(f"wrote {plot_command(run_dir, args.out)}")  # default: RUN/history.png


if __name__ == "__main__":
    main()
