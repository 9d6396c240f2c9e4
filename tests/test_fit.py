"""Trainer.fit end to end: history, counters, evaluate/predict, data forms, exactness."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import MLP, make_trainer, sgd
from flax import linen as nn

from jaxfit import Trainer


def test_history_has_one_float_per_epoch_for_train_and_val(data):
    x, y = data
    trainer = make_trainer()
    history = trainer.fit(MLP(), (x, y), validation_data=(x[:20], y[:20]), epochs=3, batch_size=16)
    assert set(history.history) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    for values in history.history.values():
        assert len(values) == 3 and all(isinstance(v, float) for v in values)
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_epoch_and_step_counters(data):
    x, y = data
    trainer = make_trainer()
    trainer.fit(MLP(), (x, y), epochs=2, batch_size=16)  # 70 samples -> 5 steps per epoch
    assert (trainer.epoch, trainer.step) == (2, 10)
    assert int(trainer.engine_state.step) == 10


def test_fit_continues_to_the_epoch_total(data):
    x, y = data
    trainer = make_trainer()
    trainer.fit(MLP(), (x, y), epochs=2, batch_size=16)
    trainer.fit(epochs=4)
    assert (trainer.epoch, trainer.step) == (4, 20)
    assert len(trainer.history.history["loss"]) == 4


def test_fit_matches_a_hand_written_optax_loop(data):
    """Same data order (the (seed, epoch) permutation), same params to float tolerance."""
    x, y = data
    model, tx, B = MLP(), optax.sgd(0.1), 16
    trainer = Trainer(optimizer=tx, loss="softmax_cross_entropy", seed=3)
    trainer.fit(model, (x, y), epochs=2, batch_size=B)

    key = jax.random.key(3)
    params = model.init({"params": jax.random.split(key)[0], "dropout": jax.random.split(key)[1]}, x[:B])["params"]
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, xb, yb):
        def loss_fn(p):
            logits = model.apply({"params": p}, xb)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

        grads = jax.grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    for epoch in (1, 2):
        perm = np.random.default_rng([3, epoch]).permutation(len(x))
        for i in range(0, len(x), B):
            idx = perm[i : i + B]  # the last batch has 6 samples
            params, opt_state = step(params, opt_state, x[idx], y[idx])
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(trainer.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_steps_per_execution_gives_the_same_run(data):
    x, y = data
    runs = []
    for k in (1, 2):
        trainer = make_trainer(steps_per_execution=k)
        trainer.fit(MLP(), (x, y), epochs=2, batch_size=16)
        runs.append(trainer)
    np.testing.assert_allclose(runs[0].history.history["loss"], runs[1].history.history["loss"], rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(runs[0].params), jax.tree_util.tree_leaves(runs[1].params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert runs[1].step == 10


def test_steps_per_execution_fires_batch_hooks_once_per_execution(data):
    from conftest import Recorder

    x, y = data
    rec = Recorder()
    make_trainer(steps_per_execution=2).fit(MLP(), (x, y), epochs=1, batch_size=16, callbacks=[rec])
    # 5 batches with K=2: executions of 2, 2, then the remainder 1.
    assert [s for h, _, s in rec.calls if h == "batch_end"] == [2, 4, 5]


def test_padded_last_batch_counts_each_sample_once():
    x = np.arange(10, dtype=np.float32).reshape(10, 1)
    y = np.zeros((10, 1), np.float32)
    import flax.linen as nn

    class Identity(nn.Module):
        @nn.compact
        def __call__(self, x):
            return x + 0 * self.param("unused", nn.initializers.zeros, (1,))

    trainer = Trainer(optimizer=optax.sgd(0.0), loss="mse", metrics=["mae"])
    trainer.fit(Identity(), (x, y), epochs=1, batch_size=4)
    logs = trainer.evaluate((x, y), batch_size=4)  # batches of 4, 4, 2 (+2 padded)
    assert logs["loss"] == pytest.approx(np.mean(x**2))
    assert logs["mae"] == pytest.approx(np.mean(x))
    assert trainer.history.history["loss"][0] == pytest.approx(np.mean(x**2))


def test_evaluate_and_predict(data):
    x, y = data
    trainer = make_trainer()
    trainer.fit(MLP(), (x, y), epochs=1, batch_size=16)
    logs = trainer.evaluate((x, y), batch_size=32)
    assert set(logs) == {"loss", "accuracy"}
    out = trainer.predict(x, batch_size=32)
    assert isinstance(out, np.ndarray) and out.shape == (70, 3)
    acc = np.mean(out.argmax(-1) == y)
    assert logs["accuracy"] == pytest.approx(acc)


def test_dict_data_with_default_and_explicit_keys(data):
    x, y = data
    a = make_trainer()
    a.fit(MLP(), {"image": x, "label": y}, epochs=1, batch_size=16)
    b = make_trainer(input_keys=["features"], target_keys=["cls"])
    b.fit(MLP(), {"features": x, "cls": y, "ignored": y}, epochs=1, batch_size=16)
    assert a.history.history["loss"] == pytest.approx(b.history.history["loss"])


def test_iterable_data_generator_function_and_list(data):
    x, y = data
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 70, 16)]

    def gen():
        yield from batches

    a, b = make_trainer(), make_trainer()
    a.fit(MLP(), gen, epochs=2)
    b.fit(MLP(), batches, validation_data=batches, epochs=2)
    assert a.history.history["loss"] == pytest.approx(b.history.history["loss"])
    # The short last batch runs at its true size: one more compile, reused every epoch.
    assert a.step == 10 and a.trace_counts["train"] == 2


def test_shuffle_depends_on_seed_and_epoch_only(data):
    from jaxfit.data import ArrayData

    x, y = data
    a = ArrayData((x, y), 16, shuffle=True, seed=5)
    b = ArrayData((x, y), 16, shuffle=True, seed=5)
    assert np.array_equal(a.order(2), b.order(2))
    assert not np.array_equal(a.order(1), a.order(2))
    first = [ex.batch[0] for ex in a.executions(2, 0)]
    resumed = [ex.batch[0] for ex in b.executions(2, 3)]
    assert all(np.array_equal(p, q) for p, q in zip(first[3:], resumed))


def test_jax_array_inputs(data):
    x, y = data
    trainer = make_trainer()
    trainer.fit(MLP(), (jnp.asarray(x), jnp.asarray(y)), epochs=1, batch_size=16)
    assert trainer.step == 5


def test_stop_training_from_a_callback_stops_after_the_step(data):
    from jaxfit import Callback

    class StopAt(Callback):
        def on_train_batch_end(self, trainer, logs):
            if trainer.step == 7:
                trainer.stop_training = True
                trainer.stop_reason = "test"

    x, y = data
    trainer = make_trainer()
    trainer.fit(MLP(), (x, y), epochs=5, batch_size=16, callbacks=[StopAt()])
    assert (trainer.step, trainer.epoch, trainer.batch_in_epoch) == (7, 1, 2)  # 1 epoch completed
    assert trainer.stop_reason == "test"
    trainer.fit(callbacks=[])  # resumes mid-epoch 2 and finishes the run
    assert (trainer.step, trainer.epoch) == (25, 5)


def test_binary_classification_with_one_output(data):
    import flax.linen as nn

    x, _ = data
    yb = (x[:, 0] > 0).astype(np.float32)
    trainer = Trainer(optimizer=sgd(0.5), loss="sigmoid_binary_cross_entropy", metrics=["accuracy"])
    trainer.fit(nn.Dense(1), (x, yb), epochs=5, batch_size=16)
    assert trainer.history.history["accuracy"][-1] > 0.8


class _Tensor:
    """Stands in for a torch tensor: converts through .detach().cpu().numpy()."""

    def __init__(self, a):
        self._a = a

    def detach(self):
        return self

    def cpu(self):
        return self

    def numpy(self):
        return self._a


class _Loader:
    """A re-iterable loader with a length, like a torch DataLoader or a grain loader."""

    def __init__(self, x, y, batch):
        self.x, self.y, self.batch = x, y, batch

    def __len__(self):
        return -(-len(self.x) // self.batch)

    def __iter__(self):
        for i in range(0, len(self.x), self.batch):
            yield _Tensor(self.x[i : i + self.batch]), _Tensor(self.y[i : i + self.batch])


def test_a_dataloader_of_tensors(data):
    x, y = data
    a, b = make_trainer(), make_trainer()
    a.fit(MLP(), _Loader(x, y, 16), epochs=2)
    b.fit(MLP(), [(x[i : i + 16], y[i : i + 16]) for i in range(0, 70, 16)], epochs=2)
    assert a.history.history["loss"] == b.history.history["loss"]
    assert a.fit_config["steps_per_epoch"] == 5


class _CountingMLP(nn.Module):
    """The suite's MLP, counting how often it is traced (its Python body runs once a trace)."""

    @nn.compact
    def __call__(self, x):
        _TRACES.append(x.shape)
        return nn.Dense(3)(nn.relu(nn.Dense(8)(x)))


_TRACES: list = []


def test_a_fit_on_shapes_already_checked_traces_nothing_before_training(data):
    # A fit checks its first batch abstractly (shape errors before any work); a later fit
    # of the run on the same shapes has nothing new to learn from that trace.
    x, y = data
    trainer = make_trainer()
    _TRACES.clear()
    trainer.fit(_CountingMLP(), (x, y), epochs=1, batch_size=16)
    first = len(_TRACES)
    trainer.fit(epochs=3)
    assert len(_TRACES) == first and trainer.epoch == 3
    # Other shapes are checked again: a batch the model cannot take fails before a step.
    with pytest.raises(Exception, match=r"has shape \(4, 8\)"):
        trainer.fit(data=(x[:, :3], y), epochs=4, batch_size=16)
    assert trainer.step == 15
