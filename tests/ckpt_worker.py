"""Subprocess side of the exact-resume tests: train, get killed, resume, dump the result.

Usage: python tests/ckpt_worker.py MODE RUN_DIR OUT [STEP]
  full   train uninterrupted, dump to OUT
  kill   train with checkpoints; SIGKILL itself at step STEP once the writer is idle
  kill_epoch  the same at the end of epoch STEP
  race   train with checkpoints, writes slowed down; SIGKILL itself at step STEP while
         the step-STEP checkpoint is being written (by the writer process of
         background="process", whose pid goes into the file CKPT_CHILD_PID_FILE)
  race_thread  the same with ModelCheckpoint(background="thread")
  term   train with checkpoints; SIGTERM itself at step STEP (expects exit status 143)
  resume Trainer.load(RUN_DIR).fit(), dump to OUT
  hold   train with checkpoints (no kill)

Every run with checkpoints also has a Hold callback: with CKPT_HOLD_DIR set, it prints each
step ("step N") and waits after the first step of the process until CKPT_HOLD_DIR/release
exists, having created CKPT_HOLD_DIR/held-<pid> (the concurrency tests' rendezvous).
"""

import os
import pickle
import signal
import sys

if os.environ.get("CKPT_WORKER_DEVICES"):  # before jax starts: several CPU devices, one mesh
    os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count="
                               f"{os.environ['CKPT_WORKER_DEVICES']}")

import flax.linen as nn
import jax
import numpy as np
import optax

from jaxfit import Callback, Trainer
from jaxfit.callbacks import EarlyStopping, LRScheduler, ModelCheckpoint, ReduceOnPlateau

EPOCHS = 4


class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Dense(16)(x))
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.Dropout(0.3, deterministic=not train)(x)
        return nn.Dense(3)(x)


class Killer(Callback):
    """Sends ``sig`` to this process after step ``at``, or at the end of epoch ``at`` when
    ``epoch_end`` (order 300: after ModelCheckpoint has saved)."""

    order = 300

    def __init__(self, at, sig, wait, epoch_end=False, mid_write_in=None):
        self.at, self.sig, self.wait, self.epoch_end = at, sig, wait, epoch_end
        self.mid_write_in = mid_write_in  # a run directory: kill once a write is under way there

    def _kill(self, trainer):
        if os.environ.get("CKPT_WORKER_KILL") != "1":
            return  # the resumed process restores this callback too: it must not fire again
        if self.wait:
            for cb in trainer.callbacks.find(ModelCheckpoint):
                cb.wait_until_finished()
        if self.mid_write_in is not None:
            # The writes before this step's are on disk (with a writer process, one save may
            # be queued behind another); this step's may not have created its temporary
            # directory yet: wait for it (the slowed write then holds it for seconds), so the
            # kill lands mid-write.
            import time

            for cb in trainer.callbacks.find(ModelCheckpoint):
                for save in cb._writer._pending[:-1]:
                    save.done.wait()
                child = cb._writer._child
                if child is not None:  # for the test: it must die with this process
                    with open(os.environ["CKPT_CHILD_PID_FILE"], "w") as f:
                        f.write(str(child._proc.pid))

            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not any(
                    p.startswith(".tmp-") for p in os.listdir(self.mid_write_in)):
                time.sleep(0.005)
        os.kill(os.getpid(), self.sig)

    def on_train_batch_end(self, trainer, logs):
        if not self.epoch_end and trainer.step == self.at:
            self._kill(trainer)

    def on_epoch_end(self, trainer, logs):
        if self.epoch_end and trainer.epoch == self.at:
            self._kill(trainer)


class Hold(Callback):
    """See the module docstring: a rendezvous point for the concurrency tests."""

    order = 310

    def __init__(self):
        self.fired = False

    def on_train_batch_end(self, trainer, logs):
        hold_dir = os.environ.get("CKPT_HOLD_DIR")
        if not hold_dir:
            return
        print(f"step {trainer.step}", flush=True)
        if self.fired:
            return
        self.fired = True
        import time

        open(os.path.join(hold_dir, f"held-{os.getpid()}"), "w").close()
        deadline = time.monotonic() + 240
        while not os.path.exists(os.path.join(hold_dir, "release")):
            if time.monotonic() > deadline:
                raise RuntimeError("Hold: never released")
            time.sleep(0.02)


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 6)).astype(np.float32)
    return (x, (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0)), (x[:10], np.zeros(10, np.int32))


def dump(trainer, history, out):
    result = {"params": jax.device_get(trainer.params),
              "model_state": jax.device_get(trainer.model_state),
              "history": history.history, "step": trainer.step, "epoch": trainer.epoch,
              "callbacks": {k: v for k, v in trainer.state_dict()["callbacks"].items()
                            if k not in ("Killer", "Hold") and not k.startswith("ModelCheckpoint")}}
    with open(out, "wb") as f:
        pickle.dump(result, f)


def slow_down_writes():
    """Holds every state file open for a while after writing it (before fsync and rename),
    so that the kill lands in the middle of a checkpoint write."""
    import time

    from jaxfit.checkpoint import _msgpack

    write_tree = _msgpack.write_tree

    def slow(fileobj, tree):
        write_tree(fileobj, tree)
        time.sleep(3.0)

    _msgpack.write_tree = slow


def mesh():
    n = int(os.environ.get("CKPT_WORKER_DEVICES") or 0)
    return jax.make_mesh((n,), ("data",)) if n else None


def main(mode, run_dir, out, step=None):
    if mode == "resume":
        trainer = Trainer.load(run_dir, mesh=mesh())
        dump(trainer, trainer.fit(), out)
        return
    if mode.startswith("race"):
        slow_down_writes()  # in this process, for the writer thread of "race_thread"
        # ... and in the writer process, which loads tests/slow_writes/sitecustomize.py
        here = os.path.dirname(os.path.abspath(__file__))
        os.environ["PYTHONPATH"] = os.pathsep.join(
            [os.path.join(here, "slow_writes"), os.environ.get("PYTHONPATH", "")])
        os.environ["CKPT_SLOW_WRITES"] = "1"
    train, val = data()
    trainer = Trainer(optimizer=optax.inject_hyperparams(optax.adam)(learning_rate=0.02),
                      metrics=["accuracy"], seed=3, mesh=mesh())
    # Stateful callbacks whose state must survive the kill: a per-step schedule, a plateau
    # reduction scaling it, and early stopping. The huge min_delta makes every epoch after
    # the first a plateau, so the reduction fires each epoch and early stopping ends the
    # run after epoch 3 (of EPOCHS): their counters decide the outcome.
    callbacks = [LRScheduler(optax.cosine_decay_schedule(0.02, 20)),
                 ReduceOnPlateau(monitor="val_loss", factor=0.5, patience=0, min_delta=1e3),
                 EarlyStopping(monitor="val_loss", patience=2, min_delta=1e3)]
    if mode != "full":
        callbacks.append(ModelCheckpoint(run_dir, monitor="val_loss", every_n_steps=5,
                                         keep_last=2, keep_best=1,
                                         background="thread" if mode == "race_thread"
                                         else "process" if mode == "race" else True))
        callbacks.append(Hold())
        if mode != "hold":
            sig = signal.SIGTERM if mode == "term" else signal.SIGKILL
            callbacks.append(Killer(int(step), sig, wait=mode.startswith("kill"),
                                    epoch_end=mode == "kill_epoch",
                                    mid_write_in=run_dir if mode.startswith("race") else None))
    history = trainer.fit(Net(), train, validation_data=val, epochs=EPOCHS, batch_size=16,
                          callbacks=callbacks)
    dump(trainer, history, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
