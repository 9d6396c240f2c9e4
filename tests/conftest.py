"""Shared fixtures: tiny models and data so the whole suite runs in minutes on 2 CPU cores."""

from __future__ import annotations

import flax.linen as nn
import numpy as np
import optax
import pytest

from jaxfit import Callback, Trainer


class MLP(nn.Module):
    """4 -> 8 -> 3, the default tiny classifier of the suite."""

    classes: int = 3

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.classes)(nn.relu(nn.Dense(8)(x)))


class BNDropout(nn.Module):
    """A model with both a mutable collection and a dropout stream."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(8)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)
        x = nn.Dropout(0.5, deterministic=not train)(nn.relu(x))
        return nn.Dense(3)(x)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(70, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0).astype(np.int32)
    return x, y


def sgd(lr: float = 0.1):
    return optax.inject_hyperparams(optax.sgd)(learning_rate=lr)


def make_trainer(**kw) -> Trainer:
    kw.setdefault("optimizer", sgd())
    kw.setdefault("loss", "softmax_cross_entropy")
    kw.setdefault("metrics", ["accuracy"])
    kw.setdefault("seed", 0)
    return Trainer(**kw)


class Recorder(Callback):
    """Records every hook call as (hook, epoch, step)."""

    def __init__(self):
        self.calls = []

    def _rec(self, hook, trainer):
        self.calls.append((hook, trainer.epoch, trainer.step))

    def on_fit_start(self, trainer):
        self._rec("fit_start", trainer)

    def on_epoch_start(self, trainer):
        self._rec("epoch_start", trainer)

    def on_train_batch_start(self, trainer):
        self._rec("batch_start", trainer)

    def on_train_batch_end(self, trainer, logs):
        self._rec("batch_end", trainer)

    def on_validation_start(self, trainer):
        self._rec("val_start", trainer)

    def on_validation_end(self, trainer, logs):
        self._rec("val_end", trainer)

    def on_epoch_end(self, trainer, logs):
        self._rec("epoch_end", trainer)

    def on_fit_end(self, trainer, logs):
        self._rec("fit_end", trainer)
