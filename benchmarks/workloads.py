"""The benchmark workloads W1-W3: data, Flax models and optimizers (see BENCHMARKS.md).

Every contender trains the same model on the same numpy arrays. Each array holds a whole
number of batches, so that no contender pays for a second compile of a partial last batch
and steps per epoch are equal across contenders.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import flax.linen as nn
import numpy as np
import optax


class MLP(nn.Module):
    """Dense-relu layers then a linear head; W1 is 64-128-128-10, W3 784-512-512-10."""

    hidden: tuple[int, ...]
    classes: int = 10

    @nn.compact
    def __call__(self, x):
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.classes)(x)


class CNN(nn.Module):
    """The seed tutorial's CNN: Conv(32)-relu-Conv(16)-relu-flatten-Dense(10), 3x3 SAME."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(32, (3, 3))(x))
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        return nn.Dense(10)(x.reshape((x.shape[0], -1)))


@dataclasses.dataclass(frozen=True)
class Workload:
    """One benchmark workload.

    Attributes:
        name: "W1", "W2" or "W3".
        description: one line for the results table.
        batch_size: examples per optimizer step.
        batches: batches per epoch (the data holds exactly this many).
        make_model: builds the Flax linen module.
        optimizer: "adam" or "sgd".
        learning_rate: the optimizer's learning rate.
        input_shape: shape of one example.
    """

    name: str
    description: str
    batch_size: int
    batches: int
    make_model: Callable[[], nn.Module]
    optimizer: str
    learning_rate: float
    input_shape: tuple[int, ...]

    def data(self) -> tuple[np.ndarray, np.ndarray]:
        """Returns `(x, y)`: float32 inputs and int32 labels, `batches * batch_size` rows."""
        n = self.batches * self.batch_size
        if self.name == "W1":
            from sklearn.datasets import load_digits

            digits = load_digits()
            x = (digits.data[:n] / 16.0).astype(np.float32)
            y = digits.target[:n].astype(np.int32)
        else:
            # Synthetic Fashion-MNIST-shaped inputs in [0, 1]: speed does not depend on
            # the pixel values, and nothing has to be downloaded.
            rng = np.random.default_rng(0)
            x = rng.random((n, *self.input_shape), dtype=np.float32)
            y = rng.integers(0, 10, size=n).astype(np.int32)
        return x, y

    def make_optimizer(self, inject: bool = False) -> optax.GradientTransformation:
        """The workload's optax optimizer, optionally with an injected learning rate."""
        fn = {"adam": optax.adam, "sgd": optax.sgd}[self.optimizer]
        if inject:
            return optax.inject_hyperparams(fn)(learning_rate=self.learning_rate)
        return fn(self.learning_rate)


WORKLOADS: dict[str, Workload] = {
    "W1": Workload(
        "W1", "MLP 64-128-128-10, digits, batch 32, Adam 1e-3 (dispatch-bound)",
        batch_size=32, batches=56, make_model=lambda: MLP((128, 128)),
        optimizer="adam", learning_rate=1e-3, input_shape=(64,),
    ),
    "W2": Workload(
        "W2", "CNN Conv32-Conv16-Dense10 on 28x28x1, batch 256, SGD 1e-4 (compute-bound)",
        batch_size=256, batches=16, make_model=CNN,
        optimizer="sgd", learning_rate=1e-4, input_shape=(28, 28, 1),
    ),
    "W3": Workload(
        "W3", "MLP 784-512-512-10 on 28x28 flattened, batch 128, Adam 1e-3 (mid)",
        batch_size=128, batches=64, make_model=lambda: MLP((512, 512)),
        optimizer="adam", learning_rate=1e-3, input_shape=(784,),
    ),
}
