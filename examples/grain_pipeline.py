"""Train from a grain pipeline, stop in the middle of an epoch, resume without replaying it.

1. The training data is a grain ``MapDataset``: the digits images, shuffled, randomly
   shifted by a pixel (a random augmentation), in batches of 32. It is given to ``fit`` as a
   function of the epoch, so each epoch is shuffled differently and a resume knows which.
   Batches are dicts: ``"label"`` is the target, the other key (``"image"``) the input.
2. A run checkpoints every 10 steps and is stopped mid-epoch. The checkpoint holds the
   pipeline's own iterator state (grain's ``get_state()``) next to the step and the epoch.
3. ``Trainer.load(run).fit()`` continues the stream from that state: the pipeline produces
   no batch of the epoch a second time (the example counts them), and the run ends with the
   same weights and history, bit for bit, as the same run trained without a stop.

    pip install "jaxfit[grain]"
    python examples/grain_pipeline.py            # about a minute on a laptop CPU
    python examples/grain_pipeline.py --smoke    # seconds
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import flax.linen as nn
import grain
import jax
import numpy as np
import optax

from jaxfit import Callback, Trainer
from jaxfit.callbacks import ModelCheckpoint
from jaxfit.checkpoint import read_checkpoint
from jaxfit.datasets import load_digits_images

BATCH = 32


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = nn.Dropout(0.2, deterministic=not train)(x.reshape((x.shape[0], -1)))
        return nn.Dense(10)(x)


class Pipeline:
    """``pipeline(epoch)``: that epoch's grain dataset. Counts the images it reads."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x, self.y, self.reads = x, y, 0

    def _read(self, i: int) -> dict:
        self.reads += 1
        return {"image": self.x[i], "label": self.y[i]}

    def __call__(self, epoch: int) -> grain.MapDataset:
        def shift(example: dict, rng: np.random.Generator) -> dict:
            dy, dx = rng.integers(-1, 2, size=2)
            return {"image": np.roll(example["image"], (dy, dx), axis=(0, 1)), "label": example["label"]}

        return (grain.MapDataset.range(len(self.x))
                .shuffle(seed=epoch)        # another order every epoch
                .map(self._read)
                .random_map(shift, seed=epoch)
                .batch(BATCH))


class StopAt(Callback):
    """Stops the run after ``step`` (a stand-in for a preemption or a Ctrl-C)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, logs):
        if trainer.step == self.step:
            trainer.stop_training = True


def trainer() -> Trainer:
    return Trainer(optimizer=optax.inject_hyperparams(optax.adam)(learning_rate=3e-3),
                   metrics=["accuracy"], seed=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a small, fast run")
    args = parser.parse_args()
    data = load_digits_images()
    if args.smoke:
        data = data.subset(320, 96)
    epochs = 2 if args.smoke else 6
    per_epoch = -(-len(data.x_train) // BATCH)
    stop_at = per_epoch + per_epoch // 2 + 1  # in the middle of epoch 2
    val = (data.x_val, data.y_val)
    fit_args = dict(validation_data=val, epochs=epochs, verbose=0)

    print(f"{data.describe()}; {per_epoch} batches of {BATCH} per epoch, {epochs} epochs")
    straight = trainer()
    straight.fit(CNN(), Pipeline(data.x_train, data.y_train), **fit_args)

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        stopped = trainer()
        stopped.fit(CNN(), Pipeline(data.x_train, data.y_train), **fit_args,
                    callbacks=[ModelCheckpoint(run, every_n_steps=10), StopAt(stop_at)])
        _, _, saved = read_checkpoint(run)  # plain data: nothing unpickled
        print(f"stopped at step {saved['step']}, epoch {saved['epoch'] + 1}, batch "
              f"{saved['batch_in_epoch']}; the pipeline's position in the checkpoint: {saved['data']}")

        resumed = Trainer.load(run)
        pipeline = resumed._fit_args["data"]  # the pipeline the run was given, restored
        pipeline.reads = 0
        resumed.fit(callbacks=[])
        left = len(data.x_train) - saved["batch_in_epoch"] * BATCH + (epochs - 2) * len(data.x_train)
        print(f"resumed: the pipeline read {pipeline.reads} images, the {left} the run had left "
              "(nothing replayed)")
        assert pipeline.reads == left, (pipeline.reads, left)

    same = all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(straight.params),
                                                     jax.tree_util.tree_leaves(resumed.params)))
    same_history = straight.history.history == resumed.history.history
    print(f"weights equal to the uninterrupted run: {same}; history equal: {same_history}")
    print(f"final val_accuracy {resumed.history.history['val_accuracy'][-1]:.3f}")
    assert same and same_history


if __name__ == "__main__":
    main()
