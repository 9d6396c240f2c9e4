"""flax.linen and flax.nnx models: train flag, dropout stream, mutable collections, init."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import optax
from conftest import MLP, BNDropout, make_trainer
from flax import nnx

from jaxfit import Trainer


def test_init_is_deterministic_from_the_seed(data):
    x, y = data
    a, b, c = make_trainer(seed=1), make_trainer(seed=1), make_trainer(seed=2)
    for t in (a, b, c):
        t.fit(MLP(), (x, y), epochs=0, batch_size=16)
    leaves = [jax.tree_util.tree_leaves(t.params) for t in (a, b, c)]
    assert all(np.array_equal(p, q) for p, q in zip(leaves[0], leaves[1]))
    assert not all(np.array_equal(p, q) for p, q in zip(leaves[0], leaves[2]))


def test_batch_stats_update_in_training_and_are_used_in_evaluation(data):
    x, y = data
    trainer = make_trainer()
    trainer.fit(BNDropout(), (x, y), epochs=1, batch_size=16)
    stats = jax.device_get(trainer.model_state["batch_stats"])
    assert not np.allclose(stats["BatchNorm_0"]["mean"], 0.0)
    before = jax.device_get(trainer.model_state)
    trainer.evaluate((x, y))
    after = jax.device_get(trainer.model_state)
    assert all(np.array_equal(p, q) for p, q in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after)))


def test_train_flag_and_dropout_stream(data):
    """train=True draws dropout from the "dropout" stream; evaluation is deterministic."""
    seen = []

    class Probe(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            seen.append(train)
            return nn.Dense(3)(nn.Dropout(0.5, deterministic=not train)(x))

    x, y = data
    trainer = make_trainer()
    trainer.fit(Probe(), (x, y), epochs=1, batch_size=16)
    assert True in seen and False in seen
    p1, p2 = trainer.predict(x), trainer.predict(x)
    assert np.array_equal(p1, p2)


def test_dropout_runs_are_reproducible_from_the_seed(data):
    x, y = data
    losses = []
    for _ in range(2):
        t = make_trainer()
        t.fit(BNDropout(), (x, y), epochs=2, batch_size=16)
        losses.append(t.history.history["loss"])
    assert losses[0] == losses[1]


class NNXNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.lin = nnx.Linear(4, 8, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.out = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(self.drop(nnx.relu(self.bn(self.lin(x)))))


def test_nnx_model_trains_and_switches_train_eval(data):
    x, y = data
    trainer = Trainer(optimizer=optax.inject_hyperparams(optax.adam)(learning_rate=1e-2), metrics=["accuracy"])
    trainer.fit(NNXNet(nnx.Rngs(0)), (x, y), validation_data=(x, y), epochs=3, batch_size=16)
    h = trainer.history.history
    assert h["loss"][-1] < h["loss"][0]
    assert np.array_equal(trainer.predict(x), trainer.predict(x))  # eval mode: no dropout
    merged = trainer._step_obj.adapter.merged(trainer.params, trainer.model_state)
    assert isinstance(merged, NNXNet)


def test_nnx_model_with_train_argument(data):
    class WithTrain(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(4, 3, rngs=rngs)
            self.drop = nnx.Dropout(0.5, rngs=rngs)

        def __call__(self, x, train: bool):
            return self.drop(self.lin(x), deterministic=not train)

    x, y = data
    trainer = make_trainer()
    trainer.fit(WithTrain(nnx.Rngs(0)), (x, y), epochs=1, batch_size=16)
    assert np.array_equal(trainer.predict(x), trainer.predict(x))


def test_nnx_module_stays_usable_and_holds_the_trained_state(data):
    x, y = data
    module = NNXNet(nnx.Rngs(0))
    trainer = make_trainer()
    trainer.fit(module, (x, y), epochs=2, batch_size=16)
    module.eval()
    np.testing.assert_allclose(np.asarray(module(x)), trainer.predict(x), rtol=1e-5, atol=1e-6)


def test_linen_init_is_compiled_once_per_module_and_shape(data):
    from jaxfit.models import _jitted_init

    assert _jitted_init(MLP(), ()) is _jitted_init(MLP(), ())
    assert _jitted_init(MLP(), ()) is not _jitted_init(MLP(classes=4), ())
