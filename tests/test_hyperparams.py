"""trainer.hyperparams: reads, writes without recompiling, errors, schedules in the step."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from conftest import MLP, make_trainer

from jaxfit import HyperparamError, Trainer


def test_read_gives_python_floats_and_write_keeps_dtype(data):
    x, y = data
    trainer = make_trainer()
    trainer.fit(MLP(), (x, y), epochs=1, batch_size=16)
    lr = trainer.hyperparams["learning_rate"]
    assert isinstance(lr, float) and lr == pytest.approx(0.1)
    trainer.hyperparams["learning_rate"] = 1  # a Python int must not make it int32
    stored = trainer.opt_state.hyperparams["learning_rate"]
    assert stored.dtype == np.float32
    assert trainer.hyperparams["learning_rate"] == 1.0


def test_writes_and_the_short_last_batch_do_not_recompile(data):
    x, y = data  # 70 samples, batch 16: the last batch has 6, at its true size every epoch
    trainer = make_trainer()
    trainer.fit(MLP(), (x, y), validation_data=(x, y), epochs=1, batch_size=16)
    for i, lr in enumerate([0.05, 0.01, 3e-3]):
        trainer.hyperparams["learning_rate"] = lr
        trainer.fit(epochs=2 + i)
    # One program per batch shape (16 and 6), compiled in the first fit and never again.
    assert trainer.trace_counts == {"train": 2, "eval": 2, "predict": 0}


def test_write_changes_the_update(data):
    x, y = data
    trainer = make_trainer()
    trainer.fit(MLP(), (x, y), epochs=1, batch_size=16)
    trainer.hyperparams["learning_rate"] = 0.0
    before = jax.device_get(trainer.params)
    trainer.fit(epochs=2)
    after = jax.device_get(trainer.params)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after)))


def test_nested_in_chain_and_multisteps(data):
    x, y = data
    tx = optax.MultiSteps(optax.chain(optax.clip_by_global_norm(1.0),
                                      optax.inject_hyperparams(optax.adam)(learning_rate=1e-2)), every_k_schedule=2)
    trainer = make_trainer(optimizer=tx)
    trainer.fit(MLP(), (x, y), epochs=1, batch_size=16)
    assert "learning_rate" in trainer.hyperparams.names and "b1" in trainer.hyperparams
    trainer.hyperparams["b1"] = 0.5
    assert trainer.hyperparams["b1"] == 0.5


def test_same_name_injected_twice_is_qualified_by_path(data):
    x, y = data
    tx = optax.multi_transform(
        {"a": optax.inject_hyperparams(optax.sgd)(learning_rate=0.1),
         "b": optax.inject_hyperparams(optax.sgd)(learning_rate=0.2)},
        lambda p: jax.tree_util.tree_map_with_path(lambda path, _: "a" if "Dense_0" in str(path) else "b", p),
    )
    trainer = make_trainer(optimizer=tx)
    trainer.fit(MLP(), (x, y), epochs=1, batch_size=16)
    names = trainer.hyperparams.names
    assert len(names) == 2 and all(n.endswith(".learning_rate") for n in names)
    assert sorted(trainer.hyperparams[n] for n in names) == pytest.approx([0.1, 0.2])


def test_unknown_name_lists_injected_ones_and_says_how_to_inject(data):
    x, y = data
    trainer = make_trainer()
    trainer.fit(MLP(), (x, y), epochs=0, batch_size=16)
    with pytest.raises(HyperparamError, match=r"'momentum' is not injected.*injected: learning_rate.*inject_hyperparams"):
        trainer.hyperparams["momentum"] = 0.9


def test_not_injected_at_all(data):
    x, y = data
    trainer = make_trainer(optimizer=optax.adam(1e-3))
    trainer.fit(MLP(), (x, y), epochs=0, batch_size=16)
    with pytest.raises(HyperparamError, match=r"injected: none"):
        trainer.hyperparams["learning_rate"]


def test_writing_an_optax_schedule_raises(data):
    x, y = data
    trainer = make_trainer(optimizer=optax.inject_hyperparams(optax.sgd)(learning_rate=optax.linear_schedule(0.1, 0.0, 10)))
    trainer.fit(MLP(), (x, y), epochs=0, batch_size=16)
    assert trainer.hyperparams.is_scheduled("learning_rate")
    with pytest.raises(HyperparamError, match=r"injected as a schedule.*LRScheduler"):
        trainer.hyperparams["learning_rate"] = 0.5


def test_attached_schedule_matches_optax_native_scheduling(data):
    x, y = data
    schedule = optax.warmup_cosine_decay_schedule(0.0, 0.2, 3, 10)
    native = Trainer(optimizer=optax.inject_hyperparams(optax.adam)(learning_rate=schedule), seed=0)
    native.fit(MLP(), (x, y), epochs=2, batch_size=16)

    from jaxfit import Callback

    class Attach(Callback):
        def on_fit_start(self, trainer):
            trainer.hyperparams.attach_schedule("learning_rate", schedule, owner=self)

    attached = Trainer(optimizer=optax.inject_hyperparams(optax.adam)(learning_rate=0.0), seed=0,
                       steps_per_execution=2)
    attached.fit(MLP(), (x, y), epochs=2, batch_size=16, callbacks=[Attach()])
    for a, b in zip(jax.tree_util.tree_leaves(native.params), jax.tree_util.tree_leaves(attached.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert attached.hyperparams["learning_rate"] == pytest.approx(float(schedule(9)))
    with pytest.raises(HyperparamError, match=r"driven by Attach.*set_scale"):
        attached.hyperparams["learning_rate"] = 0.1


def test_scale_multiplies_the_attached_schedule_without_recompiling(data):
    from jaxfit import Callback

    x, y = data

    def constant(step):
        return 0.1 + 0.0 * step

    class Attach(Callback):
        def on_fit_start(self, trainer):
            trainer.hyperparams.attach_schedule("learning_rate", constant, owner=self)

    trainer = make_trainer()
    cb = Attach()
    trainer.fit(MLP(), (x, y), epochs=1, batch_size=16, callbacks=[cb])
    trainer.hyperparams.set_scale("learning_rate", 0.5)
    trainer.fit(epochs=2)
    assert trainer.hyperparams.scale("learning_rate") == 0.5
    assert trainer.hyperparams["learning_rate"] == pytest.approx(0.05)
    assert trainer.trace_counts["train"] == 2  # batches of 16 and the last of 6: no recompile
