"""The benchmark workloads W1-W4: data, Flax models and optimizers (see BENCHMARKS.md).

W1-W3 classify `(x, y)` arrays; W4 is a language model (`benchmarks/lm1b.py`) on one array
of padded token ids, the targets being the inputs. `SCALED` holds W3 at 4x and 16x the
params and with 10x the rows, for `python -m benchmarks.scaling`.

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
        name: "W1" .. "W4", or a scaled W3 ("W3-p4", "W3-r10", ...).
        description: one line for the results table.
        batch_size: examples per optimizer step.
        batches: batches per epoch (the data holds exactly this many).
        make_model: builds the Flax linen module.
        optimizer: "adam", "sgd" or "adamw-lm1b" (lm1b's AdamW: b2 0.98, eps 1e-9,
            weight decay 0.1).
        learning_rate: the optimizer's learning rate (the peak one with a warmup).
        input_shape: shape of one example.
        family: "classify" (`data()` is `(x, y)`) or "lm" (`data()` is `(tokens,)`).
        hidden: the MLP's hidden widths (W1, W3 and the scaled W3s).
        warmup: steps of lm1b's linear warmup then rsqrt decay (0: a constant rate).
    """

    name: str
    description: str
    batch_size: int
    batches: int
    make_model: Callable[[], nn.Module]
    optimizer: str
    learning_rate: float
    input_shape: tuple[int, ...]
    family: str = "classify"
    hidden: tuple[int, ...] = ()
    warmup: int = 0

    def data(self) -> tuple[np.ndarray, ...]:
        """`(x, y)`: float32 inputs and int32 labels, or `(tokens,)` for an LM; each
        `batches * batch_size` rows."""
        n = self.batches * self.batch_size
        if self.family == "lm":
            from benchmarks.lm1b import Config, synthetic_tokens

            return (synthetic_tokens(n, Config()),)
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

    def schedule(self) -> Callable | None:
        """lm1b's warmup-then-rsqrt learning rate by step, or None for a constant rate."""
        if not self.warmup:
            return None
        from benchmarks.lm1b import rsqrt_schedule

        return rsqrt_schedule(self.learning_rate, self.warmup)

    def make_optimizer(
        self, inject: bool = False, constant: bool = False
    ) -> optax.GradientTransformation:
        """The workload's optax optimizer, optionally with an injected learning rate.

        The rate is the workload's schedule if it has one, else constant; `constant=True`
        injects the peak rate as a number, for a callback (LRScheduler) to drive.
        """
        fn = {"adam": optax.adam, "sgd": optax.sgd, "adamw-lm1b": lm1b_adamw}[self.optimizer]
        rate = self.learning_rate if constant else (self.schedule() or self.learning_rate)
        if inject:
            return optax.inject_hyperparams(fn)(learning_rate=rate)
        return fn(rate)


def lm1b_adamw(learning_rate) -> optax.GradientTransformation:
    """lm1b's optimizer: AdamW with b1 0.9, b2 0.98, eps 1e-9, weight decay 0.1."""
    return optax.adamw(learning_rate, b1=0.9, b2=0.98, eps=1e-9, weight_decay=0.1)


def _lm_model() -> nn.Module:
    from benchmarks.lm1b import TransformerLM

    return TransformerLM()


def mlp_width_for(params: int, inputs: int = 784, classes: int = 10) -> int:
    """The width h of an MLP inputs-h-h-classes with about `params` params (a multiple of 64)."""
    # (inputs + 1) h + (h + 1) h + (h + 1) classes = params, solved for h.
    a, b, c = 1.0, inputs + 2.0 + classes, classes - params
    return max(64, int(round((-b + (b * b - 4 * a * c) ** 0.5) / (2 * a) / 64)) * 64)


def mlp_params(widths: tuple[int, ...], inputs: int, classes: int = 10) -> int:
    """Params of an MLP inputs-widths-classes, biases included."""
    sizes = (inputs, *widths, classes)
    return sum((a + 1) * b for a, b in zip(sizes, sizes[1:]))


WORKLOADS: dict[str, Workload] = {
    "W1": Workload(
        "W1", "MLP 64-128-128-10, digits, batch 32, Adam 1e-3 (dispatch-bound)",
        batch_size=32, batches=56, make_model=lambda: MLP((128, 128)),
        optimizer="adam", learning_rate=1e-3, input_shape=(64,), hidden=(128, 128),
    ),
    "W2": Workload(
        "W2", "CNN Conv32-Conv16-Dense10 on 28x28x1, batch 256, SGD 1e-4 (compute-bound)",
        batch_size=256, batches=16, make_model=CNN,
        optimizer="sgd", learning_rate=1e-4, input_shape=(28, 28, 1),
    ),
    "W3": Workload(
        "W3", "MLP 784-512-512-10 on 28x28 flattened, batch 128, Adam 1e-3 (mid)",
        batch_size=128, batches=64, make_model=lambda: MLP((512, 512)),
        optimizer="adam", learning_rate=1e-3, input_shape=(784,), hidden=(512, 512),
    ),
    "W4": Workload(
        "W4", "Transformer LM, lm1b's model: 3 pre-LN decoder layers, width 64, 256 tokens, "
        "64 positions, batch 16, lm1b's AdamW with warmup (token-weighted loss)",
        batch_size=16, batches=16, make_model=_lm_model, optimizer="adamw-lm1b",
        learning_rate=1e-3, input_shape=(64,), family="lm", warmup=16,
    ),
}


def scaled(base: Workload, params: int = 1, rows: int = 1) -> Workload:
    """`base` (an MLP workload) with about `params` times the params (wider hidden layers)
    and `rows` times the rows (more batches per epoch)."""
    if params == 1:
        hidden = base.hidden
    else:
        target = params * mlp_params(base.hidden, base.input_shape[0])
        width = mlp_width_for(target, base.input_shape[0])
        hidden = (width,) * len(base.hidden)
    name = base.name + (f"-p{params}" if params != 1 else "") + (f"-r{rows}" if rows != 1 else "")
    what = "x".join(str(h) for h in hidden)
    return dataclasses.replace(
        base, name=name, hidden=hidden, batches=base.batches * rows,
        make_model=lambda: MLP(hidden),
        description=f"{base.name} with hidden {what}, {base.batches * rows} batches per epoch",
    )


# W3 as the work grows (issue 14 item 5): 1x, 4x, 16x the params, and 10x the rows.
SCALED: dict[str, Workload] = {
    w.name: w
    for w in (scaled(WORKLOADS["W3"], params=4), scaled(WORKLOADS["W3"], params=16),
              scaled(WORKLOADS["W3"], rows=10))
}


def workload(name: str) -> Workload:
    """A workload of WORKLOADS or SCALED by name."""
    if name in WORKLOADS:
        return WORKLOADS[name]
    if name in SCALED:
        return SCALED[name]
    raise KeyError(f"unknown workload {name!r}; choose from {[*WORKLOADS, *SCALED]}")
