"""Subprocess side of the exact-resume tests: train, get killed, resume, dump the result.

Usage: python tests/ckpt_worker.py MODE RUN_DIR OUT [STEP]
  full   train uninterrupted, dump to OUT
  kill   train with checkpoints; SIGKILL itself at step STEP once the writer is idle
  kill_epoch  the same at the end of epoch STEP
  race   train with checkpoints; SIGKILL itself at step STEP with a write possibly under way
  term   train with checkpoints; SIGTERM itself at step STEP (expects exit status 143)
  resume Trainer.load(RUN_DIR).fit(), dump to OUT
"""

import os
import pickle
import signal
import sys

import flax.linen as nn
import jax
import numpy as np
import optax

from jaxfit import Callback, Trainer
from jaxfit.callbacks import ModelCheckpoint

EPOCHS = 4


class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Dense(16)(x))
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.Dropout(0.3, deterministic=not train)(x)
        return nn.Dense(3)(x)


class HalveLR(Callback):
    """A stateful host-side callback (like ReduceOnPlateau): halves the learning rate every
    other epoch, counting epochs in its own checkpointed state."""

    def __init__(self):
        self.count = 0

    def on_epoch_end(self, trainer, logs):
        self.count += 1
        if self.count % 2 == 0:
            trainer.hyperparams["learning_rate"] = trainer.hyperparams["learning_rate"] / 2

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = int(state["count"])


class Killer(Callback):
    """Sends ``sig`` to this process after step ``at``, or at the end of epoch ``at`` when
    ``epoch_end`` (order 300: after ModelCheckpoint has saved)."""

    order = 300

    def __init__(self, at, sig, wait, epoch_end=False):
        self.at, self.sig, self.wait, self.epoch_end = at, sig, wait, epoch_end

    def _kill(self, trainer):
        if os.environ.get("CKPT_WORKER_KILL") != "1":
            return  # the resumed process restores this callback too: it must not fire again
        if self.wait:
            for cb in trainer.callbacks.find(ModelCheckpoint):
                if cb._writer is not None:
                    cb._writer.wait()
        os.kill(os.getpid(), self.sig)

    def on_train_batch_end(self, trainer, logs):
        if not self.epoch_end and trainer.step == self.at:
            self._kill(trainer)

    def on_epoch_end(self, trainer, logs):
        if self.epoch_end and trainer.epoch == self.at:
            self._kill(trainer)


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 6)).astype(np.float32)
    return (x, (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0)), (x[:10], np.zeros(10, np.int32))


def dump(trainer, history, out):
    result = {"params": jax.device_get(trainer.params),
              "model_state": jax.device_get(trainer.model_state),
              "history": history.history, "step": trainer.step, "epoch": trainer.epoch}
    with open(out, "wb") as f:
        pickle.dump(result, f)


def main(mode, run_dir, out, step=None):
    if mode == "resume":
        trainer = Trainer.load(run_dir)
        dump(trainer, trainer.fit(), out)
        return
    train, val = data()
    trainer = Trainer(optimizer=optax.inject_hyperparams(optax.adam)(learning_rate=0.02),
                      metrics=["accuracy"], seed=3)
    callbacks = [HalveLR()]
    if mode != "full":
        callbacks.append(ModelCheckpoint(run_dir, monitor="val_loss", every_n_steps=5,
                                         keep_last=2, keep_best=1))
        sig = signal.SIGTERM if mode == "term" else signal.SIGKILL
        callbacks.append(Killer(int(step), sig, wait=mode.startswith("kill"),
                                epoch_end=mode == "kill_epoch"))
    history = trainer.fit(Net(), train, validation_data=val, epochs=EPOCHS, batch_size=16,
                          callbacks=callbacks)
    dump(trainer, history, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
