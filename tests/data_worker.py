"""Subprocess side of the grain kill test: a grain DataLoader with 2 worker processes, a
shuffling sampler and a random augmentation, trained as a stream of 2 epochs of 6 batches.

Usage: DATA_WORKER_READS=FILE python tests/data_worker.py MODE RUN_DIR OUT [STEP]
  full    train uninterrupted, dump the result to OUT
  kill    train with checkpoints every 5 steps; SIGKILL itself after step STEP
  resume  Trainer.load(RUN_DIR).fit(), dump to OUT
Every record the data source reads (in any worker) is appended to FILE, one index a line.
"""

import os
import pickle
import signal
import sys

import numpy as np

RECORDS, BATCH, EPOCHS, PER_EPOCH = 24, 4, 2, 6  # the sampler's 2 passes are the run's 12 steps


class Source:
    """24 records; logs every read to $DATA_WORKER_READS (this process's file, also in a
    resumed process whose pipeline came from the pickled recipe), so a test can count them."""

    def __len__(self):
        return RECORDS

    def __repr__(self):  # grain checks that a restored state belongs to this source by repr
        return f"Source({RECORDS})"

    def __getitem__(self, i):
        fd = os.open(os.environ["DATA_WORKER_READS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, f"{int(i)}\n".encode())
        finally:
            os.close(fd)
        x = np.random.default_rng(int(i)).normal(size=4).astype(np.float32)
        return {"x": x, "label": np.int32((x[0] > 0) + (x[1] > 0))}


def _augment():
    import grain

    class Jitter(grain.transforms.RandomMap):
        def random_map(self, element, rng):
            return {"x": element["x"] + rng.normal(size=4).astype(np.float32) * 0.3,
                    "label": element["label"]}

    return Jitter


def loader():
    import data_worker  # by module name, so the worker processes can unpickle the parts
    import grain

    return grain.DataLoader(
        data_source=data_worker.Source(),
        sampler=grain.samplers.IndexSampler(RECORDS, shuffle=True, num_epochs=EPOCHS, seed=7),
        operations=[data_worker.Jitter(), grain.transforms.Batch(BATCH)],
        worker_count=2)


def main(mode, run_dir, out, step=None):
    import flax.linen as nn
    import jax
    import optax

    from jaxfit import Callback, Trainer
    from jaxfit.callbacks import ModelCheckpoint

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            x = nn.BatchNorm(use_running_average=not train, momentum=0.8)(nn.Dense(8)(x))
            return nn.Dense(3)(nn.relu(x))

    class Killer(Callback):
        order = 300  # after ModelCheckpoint

        def __init__(self, at):
            self.at = at

        def on_train_batch_end(self, trainer, logs):
            if os.environ.get("DATA_WORKER_KILL") == "1" and trainer.step == self.at:
                for cb in trainer.callbacks.find(ModelCheckpoint):
                    cb.wait_until_finished()
                os.kill(os.getpid(), signal.SIGKILL)

    if mode == "resume":
        trainer = Trainer.load(run_dir)
        trainer.fit()
    else:
        callbacks = []
        if mode == "kill":
            callbacks = [ModelCheckpoint(run_dir, every_n_steps=5), Killer(int(step))]
        trainer = Trainer(optimizer=optax.inject_hyperparams(optax.adam)(learning_rate=0.02),
                          metrics=["accuracy"], seed=3)
        trainer.fit(Net(), loader(), epochs=EPOCHS, steps_per_epoch=PER_EPOCH,
                    callbacks=callbacks, verbose=0)
    with open(out, "wb") as f:
        pickle.dump({"params": jax.device_get(trainer.params),
                     "model_state": jax.device_get(trainer.model_state),
                     "history": trainer.history.history, "step": trainer.step}, f)
    os._exit(0)  # skip grain's interpreter-exit cleanup of the workers' shared memory


Jitter = None
if __name__ != "__main__":
    Jitter = _augment()  # defined on import (the workers import this module by name)

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import data_worker  # noqa: F401  - the parts of the pipeline live in the importable module

    main(*sys.argv[1:])
