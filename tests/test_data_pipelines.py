"""Issue 12, points 3-6 in one process: iterables resumed from their own state, passes told
the epoch, streams trained by steps, input prefetch, grouped iterable batches, warnings."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from conftest import MLP, Recorder, make_trainer
from streams import Stream
from streams import batch as _batch

from jaxfit import Callback, Trainer

grain = pytest.importorskip("grain")


def _same(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.asarray(u).tobytes() == np.asarray(v).tobytes() for u, v in zip(la, lb))


class StopAt(Callback):
    def __init__(self, at):
        self.at = at

    def on_train_batch_end(self, trainer, logs):
        if trainer.step == self.at:
            trainer.stop_training = True


def _resumed(make_data, stop_at, full_kw, **common):
    """(uninterrupted trainer, resumed trainer, data the resumed run read from)."""
    full = make_trainer()
    full.fit(MLP(), make_data(), verbose=0, **common, **full_kw)
    first = make_trainer()
    first.fit(MLP(), make_data(), verbose=0, callbacks=[StopAt(stop_at)], **common, **full_kw)
    resumed = Trainer.from_recipe(first.recipe())  # what a load from disk does
    resumed.load_state_dict(first.state_dict())
    data = make_data()
    resumed.fit(data=data, callbacks=[])
    return full, resumed, data


def test_an_infinite_stream_trains_by_steps_per_epoch_and_ends_at_max_steps():
    stream = Stream()
    t = make_trainer()
    history = t.fit(MLP(), stream, steps_per_epoch=5, max_steps=12, verbose=0)
    assert (t.step, t.epoch, t.batch_in_epoch) == (12, 2, 2)  # 2 epochs of 5, then 2 steps
    assert len(history.history["loss"]) == 2 and t.stop_reason == "max_steps"
    # one iterator for the whole run: epochs continue the stream, never restart it
    assert stream.produced == list(range(12))
    assert t.fit_config["epochs"] == 3  # what max_steps spans
    t.fit(max_steps=20)  # a total, like epochs
    assert (t.step, t.epoch) == (20, 4)


def test_a_stream_resumes_from_its_state_with_nothing_produced_again():
    full, resumed, data = _resumed(Stream, 7, dict(max_steps=13), steps_per_epoch=5)
    assert resumed._data_position["state"] == {"i": 13}
    assert data.produced == list(range(7, 13))  # no replay: it starts at the saved position
    assert _same(full.params, resumed.params)
    assert full.history.history == resumed.history.history


def test_a_stream_position_survives_a_checkpoint_on_disk(tmp_path):
    from jaxfit.callbacks import EarlyStopping, LRScheduler, ModelCheckpoint, ReduceOnPlateau

    def cbs(run=None):
        out = [LRScheduler(optax.linear_schedule(0.1, 0.01, 4), by="epoch"),
               ReduceOnPlateau(monitor="loss", factor=0.5, patience=0, min_delta=1e3),
               EarlyStopping(monitor="loss", patience=3, min_delta=1e3)]
        return out + ([ModelCheckpoint(run, every_n_steps=4)] if run else [])

    val = [_batch(100 + i) for i in range(2)]
    full = make_trainer()
    full.fit(MLP(), Stream(), steps_per_epoch=5, epochs=5, validation_data=val, callbacks=cbs(), verbose=0)
    assert full.stop_reason == "early_stopping" and full.epoch == 4

    class StopAt(Callback):
        def on_train_batch_end(self, trainer, logs):
            if trainer.step == 13:
                trainer.stop_training = True

    run = tmp_path / "run"
    first = make_trainer()
    first.fit(MLP(), Stream(), steps_per_epoch=5, epochs=5, validation_data=val,
              callbacks=[*cbs(run), StopAt()], verbose=0)
    assert (first.step, first.batch_in_epoch) == (13, 3)
    loaded = Trainer.load(run)
    assert loaded._data_position["state"] == {"i": 13}
    stream = Stream()
    loaded.fit(data=stream)  # the run's callbacks, restored with their state
    assert stream.produced[0] == 13
    assert _same(full.params, loaded.params)
    assert full.history.history == loaded.history.history


@pytest.mark.parametrize("kind", ["MapDataset", "IterDataset"])
def test_a_grain_pipeline_with_shuffle_and_augmentation_resumes_bit_for_bit(kind):
    def pipeline():
        rng_x = np.random.default_rng(0).normal(size=(30, 4)).astype(np.float32)
        ds = grain.MapDataset.source(list(range(30))).shuffle(seed=5).random_map(
            lambda i, rng: (rng_x[i] + rng.normal(size=4).astype(np.float32) * 0.1,
                            np.int32(rng_x[i, 0] > 0)), seed=9)
        if kind == "IterDataset":
            ds = ds.to_iter_dataset()
            assert isinstance(ds, grain.IterDataset)
        return ds.batch(4)  # 8 batches per pass, the last of 2

    full, resumed, _ = _resumed(pipeline, 11, dict(epochs=3))
    assert resumed._data_position["pass"] == 3 and resumed._data_position["state"]
    assert (resumed.step, resumed.epoch) == (24, 3)
    assert _same(full.params, resumed.params)
    assert full.history.history == resumed.history.history


def test_passes_are_told_the_epoch_through_set_epoch_or_a_function():
    class EpochAware:
        def __init__(self):
            self.epochs = []

        def set_epoch(self, epoch):
            self.epochs.append(epoch)
            self.epoch = epoch

        def __iter__(self):
            return iter([_batch(10 * self.epoch + i) for i in range(3)])

    data = EpochAware()
    make_trainer().fit(MLP(), data, epochs=3, verbose=0)
    assert data.epochs == [1, 2, 3]  # one pass per epoch: the shapes come from epoch 1's own pass

    seen = []

    def per_epoch(epoch):
        seen.append(epoch)
        return [_batch(10 * epoch + i) for i in range(3)]

    t = make_trainer()
    t.fit(MLP(), per_epoch, epochs=3, verbose=0)
    assert seen == [1, 2, 3] and t.step == 9


def test_a_stateless_iterable_resumed_mid_epoch_is_replayed_with_one_warning():
    produced = []

    def gen():
        for i in range(6):
            produced.append(i)
            yield _batch(i)

    class StopAt(Callback):
        def on_train_batch_end(self, trainer, logs):
            if trainer.step == 4:
                trainer.stop_training = True

    full = make_trainer()
    full.fit(MLP(), gen, epochs=2, verbose=0)
    t = make_trainer()
    t.fit(MLP(), gen, epochs=2, callbacks=[StopAt()], verbose=0)
    produced.clear()
    with pytest.warns(UserWarning, match="replays the pass from its start and discards the first 4") as w:
        t.fit(callbacks=[])
    assert len([x for x in w if "replays" in str(x.message)]) == 1
    assert produced[:6] == list(range(6))  # replayed from the start of the pass
    assert _same(full.params, t.params)  # exact here: the generator is deterministic


def test_a_list_of_batches_resumes_mid_epoch_exactly_and_silently():
    batches = [_batch(i) for i in range(6)]

    class StopAt(Callback):
        def on_train_batch_end(self, trainer, logs):
            if trainer.step == 4:
                trainer.stop_training = True

    full = make_trainer()
    full.fit(MLP(), batches, epochs=2, verbose=0)
    t = make_trainer()
    t.fit(MLP(), batches, epochs=2, callbacks=[StopAt()], verbose=0)
    t.fit(callbacks=[])  # filterwarnings=error: no warning for a list
    assert _same(full.params, t.params)


def test_the_next_batch_is_on_its_way_before_the_current_step_runs():
    stream = Stream()
    seen = []

    class Watch(Callback):
        def on_train_batch_start(self, trainer, logs=None):
            seen.append((trainer.step, len(stream.produced)))

    make_trainer().fit(MLP(), stream, steps_per_epoch=6, callbacks=[Watch()], verbose=0)
    # step i (0-based) starts when batch i + 1 was already produced and placed on the device
    assert seen == [(i, i + 2) for i in range(5)] + [(5, 6)]  # never past the epoch's end
    assert stream.produced == list(range(6))


class _Pass:
    """Four batches per pass (of inputs alone with ``inputs_only``); ``produced`` counts the
    batches of the pass under way."""

    def __init__(self, inputs_only=False):
        self.inputs_only, self.produced = inputs_only, []

    def __iter__(self):
        self.produced = []
        for i in range(4):
            self.produced.append(i)
            yield _batch(i)[0] if self.inputs_only else _batch(i)


def _spied(trainer, name, data, seen):
    """Record, at each call of the engine's ``name`` program, how many batches ``data`` had
    produced in its pass."""
    real = getattr(trainer._engine, name)

    def make():
        fn = real()
        return lambda *args: (seen.append(len(data.produced)), fn(*args))[1]

    setattr(trainer._engine, name, make)


@pytest.mark.parametrize("kind", ["evaluate", "validation", "predict"])
def test_evaluation_and_prediction_read_the_next_batch_ahead_like_training(kind):
    t = make_trainer()
    t.fit(MLP(), [_batch(0)], verbose=0)
    data, seen = _Pass(inputs_only=kind == "predict"), []
    _spied(t, "predict_fn" if kind == "predict" else "eval_fn", data, seen)
    if kind == "evaluate":
        t.evaluate(data)
    elif kind == "predict":
        assert t.predict(data).shape == (16, 3)
    else:
        t.fit(validation_data=data, epochs=2)
    # batch i (0-based) runs when batch i + 1 was already produced, never past the pass
    assert seen == [2, 3, 4, 4]


def test_steps_per_execution_stacks_equal_iterable_batches():
    batches = [_batch(i) for i in range(5)] + [_batch(5, rows=3)]  # the last one smaller
    runs = []
    for k in (1, 2):
        rec = Recorder()
        t = make_trainer(steps_per_execution=k, scan_unroll=1)
        t.fit(MLP(), batches, epochs=2, callbacks=[rec], verbose=0)
        runs.append((t, [s for h, _, s in rec.calls if h == "batch_end"]))
    assert runs[1][1] == [2, 4, 5, 6, 8, 10, 11, 12]  # 2 + 2, then the pair (4, 3 rows) singly
    assert runs[0][1] == list(range(1, 13))
    for a, b in zip(jax.tree_util.tree_leaves(runs[0][0].params), jax.tree_util.tree_leaves(runs[1][0].params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_validation_every_n_steps_as_well_as_every_epoch():
    val = [_batch(100)]
    rec = []

    class Val(Callback):
        def on_validation_end(self, trainer, logs):
            rec.append((trainer.step, logs.get("step"), "val_loss" in logs))

    make_trainer().fit(MLP(), Stream(), steps_per_epoch=5, epochs=2, validation_data=val,
                       validation_steps_freq=3, callbacks=[Val()], verbose=0)
    assert rec == [(3, 3, True), (5, None, True), (6, 6, True), (9, 9, True), (10, None, True)]
    rec.clear()  # a step validation that falls on an epoch end runs once, as the epoch's
    make_trainer().fit(MLP(), Stream(), steps_per_epoch=5, epochs=2, validation_data=val,
                       validation_steps_freq=5, callbacks=[Val()], verbose=0)
    assert rec == [(5, None, True), (10, None, True)]


def test_the_core_imports_no_grain():
    import subprocess
    import sys

    code = "import sys, jaxfit, jaxfit.data, jaxfit.loop; assert 'grain' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_the_grain_example_resumes_without_replay_in_smoke_mode(tmp_path):
    from ex_support import run_example

    out = run_example("grain_pipeline.py", "--smoke", cwd=tmp_path)
    assert "(nothing replayed)" in out
    assert "weights equal to the uninterrupted run: True; history equal: True" in out
