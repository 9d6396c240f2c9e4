"""Issue 12, point 4: runs trained by steps are monitored at each validation.

History records every validation; EarlyStopping, ReduceOnPlateau and ModelCheckpoint
decide at each validation end with ``check_on="validation"``; a ``max_steps`` of a resumed
run can be raised or cleared. The monitored values are scripted per step (a callback that
runs first rewrites ``val_loss``) so each test knows which validation must decide.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import MLP, make_trainer
from streams import Stream
from streams import batch as _batch

from jaxfit import Callback, ConfigError, MonitorError, Trainer
from jaxfit.callbacks import EarlyStopping, LambdaCallback, ModelCheckpoint, ReduceOnPlateau
from jaxfit.checkpoint._manifest import scan

VAL = [_batch(100 + i) for i in range(2)]


class Script(Callback):
    """Runs first and replaces val_loss by the value scripted for the step (stateless, so a
    resumed run scripts the same values)."""

    order = -10

    def __init__(self, table):
        self.table = table

    def on_validation_end(self, trainer, logs):
        if trainer.step in self.table:
            logs["val_loss"] = self.table[trainer.step]


def _same(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.asarray(u).tobytes() == np.asarray(v).tobytes() for u, v in zip(la, lb))


def _by_steps(trainer, callbacks, max_steps=100, **kw):
    trainer.fit(MLP(), Stream(), validation_data=VAL, max_steps=max_steps, validation_steps_freq=3,
                callbacks=callbacks, verbose=0, **kw)
    return trainer


def test_history_records_every_validation_with_its_step_and_epoch():
    t = make_trainer()
    t.fit(MLP(), Stream(), steps_per_epoch=5, epochs=2, validation_data=VAL, validation_steps_freq=3, verbose=0)
    assert [(v["step"], v["epoch"]) for v in t.history.validations] == [(3, 1), (5, 1), (6, 2), (9, 2), (10, 2)]
    assert all(set(v) == {"step", "epoch", "val_loss", "val_accuracy"} for v in t.history.validations)
    # the epoch-end ones are the epoch logs' values
    assert [t.history.validations[i]["val_loss"] for i in (1, 4)] == t.history.history["val_loss"]
    fresh = make_trainer().history
    fresh.load_state_dict(t.history.state_dict())
    assert fresh.validations == t.history.validations


def test_early_stopping_per_validation_stops_a_max_steps_run_on_an_endless_stream():
    stop = EarlyStopping(monitor="val_loss", patience=2, check_on="validation")
    script = Script({3: 1.0, 6: 0.5, 9: 0.6, 12: 0.4, 15: 0.45, 18: 0.5, 21: 0.1})
    t = _by_steps(make_trainer(), [script, stop])
    # best 0.4 at step 12; 15 and 18 do not improve on it: patience 2 runs out at step 18
    assert t.stop_reason == "early_stopping" and t.step == 18
    assert (stop.best, stop.best_step, stop.stopped_step, stop.wait) == (0.4, 12, 18, 2)
    assert [v["step"] for v in t.history.validations] == [3, 6, 9, 12, 15, 18]
    assert t.history.history == {}  # the stream never ended an epoch


def test_early_stopping_per_epoch_never_acts_on_such_a_run_and_says_so():
    with pytest.warns(UserWarning, match=r"never act\. Pass check_on='validation'"):
        _by_steps(make_trainer(), [EarlyStopping(monitor="val_loss")], max_steps=3)


def test_check_on_validation_needs_a_validation_metric():
    with pytest.raises(MonitorError, match=r"monitors 'loss', which validation logs do not hold \(they have: "
                                           r"val_loss, val_accuracy\)"):
        _by_steps(make_trainer(), [EarlyStopping(monitor="loss", check_on="validation")], max_steps=3)
    with pytest.raises(ConfigError, match="check_on must be 'epoch' .* got check_on = 'step'"):
        ReduceOnPlateau(check_on="step")


def test_reduce_on_plateau_per_validation_reduces_at_the_right_validation():
    used = {}
    record = LambdaCallback(on_train_batch_end=lambda t, logs: used.__setitem__(
        t.step, float(t.hyperparams["learning_rate"])))
    plateau = ReduceOnPlateau(monitor="val_loss", factor=0.5, patience=1, min_delta=0.0, check_on="validation")
    t = _by_steps(make_trainer(), [Script({3: 1.0, 6: 1.0, 9: 0.5, 12: 0.6}), plateau, record], max_steps=12)
    lr, half = float(np.float32(0.1)), float(np.float32(0.05))
    # step 6 does not improve (patience 1): the steps from 7 on apply half the rate
    assert used == {s: (lr if s <= 6 else half) for s in range(1, 13)}
    assert [v["learning_rate"] for v in t.history.validations] == [lr, lr, half, half]
    assert plateau.reductions == 2  # and again at step 12, for the steps of a next fit
    # the same as setting the rate by hand after step 6: applied, bit for bit
    manual = LambdaCallback(on_train_batch_end=lambda t, logs: t.step == 6 and t.hyperparams.__setitem__(
        "learning_rate", 0.05))
    ref = make_trainer()
    ref.fit(MLP(), Stream(), max_steps=12, callbacks=[manual], verbose=0)
    assert _same(ref.params, t.params)


def test_model_checkpoint_keeps_the_best_validation_step_and_resumes_from_it_exactly(tmp_path):
    table = {3: 0.9, 6: 0.3, 9: 0.5, 12: 0.7, 15: 0.8}

    def cbs(run=None):
        out = [Script(table), EarlyStopping(monitor="val_loss", patience=5, check_on="validation")]
        if run is not None:
            out.append(ModelCheckpoint(run, monitor="val_loss", check_on="validation", every_n_epochs=None,
                                       keep_last=1, keep_best=1))
        return out

    full = _by_steps(make_trainer(), cbs(), max_steps=15)
    run = tmp_path / "run"
    _by_steps(make_trainer(), cbs(run), max_steps=15)
    kept = {info.step: info for info in scan(run) if info.manifest}
    assert sorted(kept) == [6, 15]  # the best validation and the newest
    best = kept[6]
    assert best.metrics["val_loss"] == 0.3 and best.manifest["batch_in_epoch"] == 6
    loaded = Trainer.load(str(best.path))
    assert (loaded.step, loaded.batch_in_epoch) == (6, 6)
    stream = Stream()
    loaded.fit(data=stream)  # the run's callbacks and max_steps, restored
    assert stream.produced[0] == 6 and loaded.step == 15
    assert _same(full.params, loaded.params)
    assert full.history.validations == loaded.history.validations
    assert full.callbacks.find(EarlyStopping)[0].state_dict() == loaded.callbacks.find(EarlyStopping)[0].state_dict()


def test_model_checkpoint_per_validation_saves_step_validations_mid_epoch_and_epoch_ones_at_the_end(tmp_path):
    run = tmp_path / "run"
    ckpt = ModelCheckpoint(run, monitor="val_loss", check_on="validation", every_n_epochs=None, keep_last=None)
    t = make_trainer()
    t.fit(MLP(), Stream(), steps_per_epoch=4, epochs=2, validation_data=VAL, validation_steps_freq=3,
          callbacks=[ckpt], verbose=0)
    saved = [(i.step, i.manifest["batch_in_epoch"], i.manifest["reason"]) for i in scan(run) if i.manifest]
    assert saved == [(3, 3, "validation"), (4, 0, "epoch"), (6, 2, "validation"), (8, 0, "epoch")]
    by_step = {v["step"]: v["val_loss"] for v in t.history.validations}
    assert {i.step: i.metrics["val_loss"] for i in scan(run)} == by_step


def test_a_step_checkpoint_taken_before_its_steps_validation_resumes_with_that_validation(tmp_path):
    # every_n_steps saves in on_train_batch_end, before the validation due at the same step:
    # the resume runs that validation first, so the per-validation decisions stay exact.
    def cbs(run=None):
        out = [Script({3: 1.0, 6: 0.5, 9: 0.7, 12: 0.8}),
               EarlyStopping(monitor="val_loss", patience=2, check_on="validation")]
        return out + ([ModelCheckpoint(run, every_n_steps=6, every_n_epochs=None, keep_last=None)] if run else [])

    full = _by_steps(make_trainer(), cbs(), max_steps=20)
    assert full.stop_reason == "early_stopping" and full.step == 12
    run = tmp_path / "run"
    _by_steps(make_trainer(), cbs(run), max_steps=20)
    at6 = next(i for i in scan(run) if i.step == 6)
    loaded = Trainer.load(str(at6.path))
    assert [v["step"] for v in loaded.history.validations] == [3]  # saved before step 6's
    loaded.fit(data=Stream())
    assert (loaded.step, loaded.stop_reason) == (12, "early_stopping")
    assert full.history.validations == loaded.history.validations
    assert _same(full.params, loaded.params)


def test_a_resumed_run_trains_past_its_max_steps_or_by_epochs_once_cleared():
    t = make_trainer()
    t.fit(MLP(), [_batch(i) for i in range(4)], max_steps=6, verbose=0)
    assert (t.step, t.epoch, t.batch_in_epoch) == (6, 1, 2)
    with pytest.warns(UserWarning, match=r"clear it: fit\(epochs=N, max_steps=None\)"):
        t.fit(epochs=3)  # max_steps=6 is kept: nothing to train
    assert t.step == 6
    t.fit(max_steps=10)
    assert (t.step, t.fit_config["max_steps"]) == (10, 10)
    t.fit(epochs=4, max_steps=None)  # cleared: epochs alone end the run
    assert (t.step, t.epoch, t.batch_in_epoch, t.fit_config["max_steps"]) == (16, 4, 0, None)
    t.fit(epochs=5)  # and it stays cleared
    assert t.step == 20
