"""ModelCheckpoint and Trainer.load in one process: saving, retention, loading, trust, data."""

import json
import os
import signal
import threading

import cloudpickle
import jax
import numpy as np
import pytest
from conftest import MLP, BNDropout, make_trainer

from jaxfit import Callback, Preempted, Trainer
from jaxfit.callbacks import ModelCheckpoint
from jaxfit.checkpoint import (
    CheckpointCorruptError,
    CheckpointStructureError,
    CheckpointWarning,
    DataNotSavedError,
    UntrustedRecipeError,
    restore,
)
from jaxfit.errors import ConfigError


def _names(run):
    return sorted(p.name for p in run.iterdir() if p.name.startswith("ckpt-"))


def _same_tree(a, b):
    return all(np.asarray(x).tobytes() == np.asarray(y).tobytes()
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


@pytest.mark.parametrize("kwargs, match", [
    (dict(keep_last=0), r"ModelCheckpoint: keep_last must be an integer >= 1, got keep_last = 0"),
    (dict(keep_best=-1), r"keep_best must be an integer >= 0"),
    (dict(every_n_steps=0), r"every_n_steps must be an integer >= 1"),
    (dict(every_n_seconds=0), r"every_n_seconds must be positive or None"),
    (dict(every_n_seconds="1"), r"every_n_seconds must be a number >= 0"),
    (dict(mode="up"), r"mode must be one of \('auto', 'min', 'max'\), got mode = 'up'"),
    (dict(monitor="val_thing"), r"cannot tell whether 'val_thing' should be minimised"),
    (dict(monitor=3), r"monitor must be a log key such as 'val_loss' or None"),
])
def test_bad_configuration_is_refused_at_construction(tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ModelCheckpoint(tmp_path, **kwargs)


@pytest.mark.parametrize("monitor, mode", [("val_accuracy", "max"), ("val_loss", "min"),
                                           ("top_5_accuracy", "max")])
def test_auto_mode_follows_the_metric_name(tmp_path, monitor, mode):
    assert ModelCheckpoint(tmp_path, monitor=monitor)._mode == mode


def test_unknown_monitor_fails_before_training(tmp_path, data):
    cb = ModelCheckpoint(tmp_path / "run", monitor="val_loss")
    with pytest.raises(Exception, match=r"ModelCheckpoint monitors 'val_loss'.*validation_data"):
        make_trainer().fit(MLP(), data, epochs=1, batch_size=16, callbacks=[cb])
    assert not (tmp_path / "run").exists() or not _names(tmp_path / "run")


def test_retention_keeps_newest_and_best_separately(tmp_path, data):
    x, y = data
    run = tmp_path / "run"
    cb = ModelCheckpoint(run, monitor="val_accuracy", keep_last=2, keep_best=1)
    trainer = make_trainer()
    history = trainer.fit(MLP(), (x, y), validation_data=(x[:20], y[:20]), epochs=5,
                          batch_size=16, callbacks=[cb])
    scores = history.history["val_accuracy"]
    best_epoch = 1 + int(np.argmax(scores))  # ties: the earliest, as retention ranks them
    kept = {json.loads((run / n / "manifest.json").read_text())["epoch"] for n in _names(run)}
    assert kept == {4, 5, best_epoch}
    assert (run / "latest").read_text().strip() == _names(run)[-1]
    assert len(cb.stats.blocking) == len(cb.stats.write) == 5


def test_fit_returns_with_its_writer_thread_ended(tmp_path, data):
    # The writer thread is kept from one save to the next (tests/test_ckpt_store.py); the
    # fit's end ends it, instead of leaving it idle for seconds.
    before = set(threading.enumerate())  # (objects: thread idents are reused)
    cb = ModelCheckpoint(tmp_path / "run")
    make_trainer().fit(MLP(), data, epochs=3, batch_size=16, verbose=0, callbacks=[cb])
    assert len(cb.stats.write) == 3
    assert [t for t in threading.enumerate()
            if t not in before and t.name == "jaxfit-checkpoint-writer"] == []


def test_load_then_fit_continues_bit_identically(tmp_path, data):
    x, y = data
    full = make_trainer(seed=1)
    full_history = full.fit(BNDropout(), (x, y), validation_data=(x, y), epochs=3, batch_size=16)
    run = tmp_path / "run"
    part = make_trainer(seed=1)
    part.fit(BNDropout(), (x, y), validation_data=(x, y), epochs=3, batch_size=16,
             callbacks=[ModelCheckpoint(run, every_n_steps=7, every_n_epochs=None)])
    # ckpt at step 14 is mid-epoch 3 (5 steps per epoch); load exactly that one.
    (mid,) = [n for n in _names(run) if n.endswith("-step14")]
    loaded = Trainer.load(run / mid)
    assert (loaded.step, loaded.epoch, loaded.batch_in_epoch) == (14, 2, 4)
    history = loaded.fit()
    assert history.history == full_history.history
    assert _same_tree(loaded.params, full.params) and _same_tree(loaded.model_state, full.model_state)


def test_corrupt_newest_checkpoint_is_skipped_with_a_warning(tmp_path, data):
    run = tmp_path / "run"
    make_trainer().fit(MLP(), data, epochs=2, batch_size=16, callbacks=[ModelCheckpoint(run)])
    newest = run / _names(run)[-1]
    with open(newest / "state.msgpack", "r+b") as f:
        f.seek(20)
        f.write(b"\xff\xff")
    with pytest.warns(CheckpointWarning, match=f"skipping checkpoint {newest.name}.*sha256"):
        trainer = Trainer.load(run)
    assert trainer.epoch == 1
    with pytest.raises(CheckpointCorruptError, match=r"state\.msgpack fails its sha256 check"):
        Trainer.load(newest)


def test_missing_path_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint or run directory"):
        Trainer.load(tmp_path / "missing")


def test_structure_mismatch_names_path_and_both_shapes(tmp_path, data):
    run = tmp_path / "run"
    make_trainer().fit(MLP(), data, epochs=1, batch_size=16, callbacks=[ModelCheckpoint(run)])
    with pytest.raises(CheckpointStructureError,
                       match=r"step5/state\.msgpack: train_state\.state\.params\.Dense_0\.bias: "
                             r"saved shape \(3,\), expected \(4,\)"):
        restore(make_trainer(), run, model=MLP(classes=4), data=data, epochs=2)


def test_safe_restore_never_unpickles(tmp_path, data, monkeypatch):
    run = tmp_path / "run"
    first = make_trainer()
    first.fit(MLP(), data, epochs=1, batch_size=16, callbacks=[ModelCheckpoint(run)])

    def refuse(*args, **kwargs):
        raise AssertionError("unpickled during a safe restore")

    monkeypatch.setattr(cloudpickle, "loads", refuse)
    monkeypatch.setattr("pickle.loads", refuse)
    trainer = restore(make_trainer(), run, model=MLP(), data=data, epochs=2, batch_size=16)
    assert trainer.epoch == 1 and _same_tree(trainer.params, first.params)
    monkeypatch.undo()
    trainer.fit()
    assert trainer.epoch == 2


def test_recipe_writable_by_others_is_refused_unless_trusted(tmp_path, data):
    run = tmp_path / "run"
    make_trainer().fit(MLP(), data, epochs=1, batch_size=16, callbacks=[ModelCheckpoint(run)])
    os.chmod(run, 0o777)
    with pytest.raises(UntrustedRecipeError, match=r"can be written by other users.*trusted=True"):
        Trainer.load(run)
    assert Trainer.load(run, trusted=True).epoch == 1


@pytest.mark.skipif(not hasattr(os, "chown") or os.geteuid() != 0, reason="needs root to chown")
def test_recipe_owned_by_someone_else_is_refused(tmp_path, data, monkeypatch):
    run = tmp_path / "run"
    make_trainer().fit(MLP(), data, epochs=1, batch_size=16, callbacks=[ModelCheckpoint(run)])
    (recipe,) = run.glob("recipe-*.pkl")
    os.chown(recipe, 4242, 4242)
    monkeypatch.setattr(os, "getuid", lambda: 1000)
    with pytest.raises(UntrustedRecipeError, match=r"owned by uid 4242, not by you \(uid 1000\)"):
        Trainer.load(run)


def test_recipe_file_is_private_to_its_owner(tmp_path, data):
    run = tmp_path / "run"
    make_trainer().fit(MLP(), data, epochs=1, batch_size=16, callbacks=[ModelCheckpoint(run)])
    (recipe,) = run.glob("recipe-*.pkl")
    assert recipe.stat().st_mode & 0o777 == 0o600


def test_data_too_large_for_the_recipe_must_be_given_again(tmp_path, data):
    run = tmp_path / "run"
    make_trainer().fit(MLP(), data, epochs=1, batch_size=16,
                       callbacks=[ModelCheckpoint(run, max_data_bytes=100)])
    trainer = Trainer.load(run)
    with pytest.raises(DataNotSavedError,
                       match=r"run's data was not saved .*max_data_bytes=0\.0 MiB.*fit\(data=\.\.\.\)"):
        trainer.fit(epochs=2)
    trainer.fit(data=data, epochs=2)
    assert trainer.epoch == 2


class LockedBatches:
    """A re-iterable data source that cannot be pickled (it holds a lock)."""

    def __init__(self, x, y):
        self.x, self.y, self.lock = x, y, threading.Lock()

    def __iter__(self):
        for i in range(0, len(self.x), 16):
            yield self.x[i:i + 16], self.y[i:i + 16]


def test_unpicklable_data_is_left_out_with_the_reason(tmp_path, data):
    run = tmp_path / "run"
    make_trainer().fit(MLP(), LockedBatches(*data), epochs=1,
                       callbacks=[ModelCheckpoint(run)])
    with pytest.raises(DataNotSavedError, match=r"a LockedBatches cannot be pickled"):
        Trainer.load(run).fit(epochs=2)


class SendAt(Callback):
    def __init__(self, signum, step):
        self.signum, self.at = signum, step

    def on_train_batch_end(self, trainer, logs):
        if trainer.step == self.at and os.environ.get("NO_SIGNAL") != "1":
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum, raised, reason", [
    (signal.SIGTERM, Preempted, "preempted"), (signal.SIGINT, KeyboardInterrupt, "interrupted")])
def test_signal_writes_a_checkpoint_before_fit_ends(tmp_path, data, monkeypatch, signum, raised,
                                                    reason):
    run = tmp_path / "run"
    with pytest.raises(raised):
        make_trainer().fit(MLP(), data, epochs=3, batch_size=16,
                           callbacks=[ModelCheckpoint(run), SendAt(signum, 7)])
    manifest = json.loads((run / _names(run)[-1] / "manifest.json").read_text())
    assert (manifest["reason"], manifest["step"], manifest["batch_in_epoch"]) == (reason, 7, 2)
    monkeypatch.setenv("NO_SIGNAL", "1")
    assert Trainer.load(run).fit().history["loss"].__len__() == 3


class Boom(Callback):
    def on_train_batch_end(self, trainer, logs):
        if trainer.step == 6:
            raise RuntimeError("boom")


def test_no_checkpoint_of_a_failed_step_is_written(tmp_path, data):
    run = tmp_path / "run"
    with pytest.raises(Exception, match="boom"):
        make_trainer().fit(MLP(), data, epochs=3, batch_size=16,
                           callbacks=[ModelCheckpoint(run), Boom()])
    assert [n.split("-step")[1] for n in _names(run)] == ["5"]


class HoldParams(Callback):
    """After ModelCheckpoint saved at epoch end, keeps one param buffer to check donation."""

    order = 150

    def __init__(self):
        self.held, self.deleted = None, []

    def on_epoch_end(self, trainer, logs):
        self.held = jax.tree_util.tree_leaves(trainer.params)[0]

    def on_train_batch_end(self, trainer, logs):
        if self.held is not None:
            self.deleted.append(self.held.is_deleted())
            self.held = None


def test_saving_does_not_stop_the_next_step_from_donating(tmp_path, data):
    hold = HoldParams()
    make_trainer().fit(MLP(), data, epochs=3, batch_size=16,
                       callbacks=[ModelCheckpoint(tmp_path / "run"), hold])
    assert hold.deleted == [True, True]


def test_every_n_seconds_and_fit_end_saves(tmp_path, data):
    run = tmp_path / "run"
    trainer = make_trainer()
    trainer.fit(MLP(), data, epochs=1, batch_size=16,
                callbacks=[ModelCheckpoint(run, every_n_epochs=None, every_n_seconds=1e-9,
                                           keep_last=None)])
    reasons = [json.loads((run / n / "manifest.json").read_text())["reason"] for n in _names(run)]
    # A save after each of the 5 steps, then one at fit end for the completed epoch.
    assert reasons == ["time"] * 5 + ["fit_end"]


def test_moved_run_keeps_writing_where_it_was_loaded_from(tmp_path, data):
    run, moved = tmp_path / "run", tmp_path / "moved"
    make_trainer().fit(MLP(), data, epochs=1, batch_size=16, callbacks=[ModelCheckpoint(run)])
    run.rename(moved)
    Trainer.load(moved).fit(epochs=2)
    assert not run.exists() and len(_names(moved)) == 2


def test_resumed_fit_keeps_the_runs_fit_arguments(tmp_path, data):
    x, y = data
    full = make_trainer()
    full_history = full.fit(MLP(), (x, y), validation_data=(x, y), epochs=4, batch_size=16,
                            shuffle=False, validation_freq=2)
    run = tmp_path / "run"
    make_trainer().fit(MLP(), (x, y), validation_data=(x, y), epochs=2, batch_size=16,
                       shuffle=False, validation_freq=2, callbacks=[ModelCheckpoint(run)])
    loaded = Trainer.load(run)
    history = loaded.fit(epochs=4).history
    assert history.keys() == full_history.history.keys()
    for key, values in full_history.history.items():  # NaN for epochs without validation
        assert np.asarray(history[key]).tobytes() == np.asarray(values).tobytes()
    assert _same_tree(loaded.params, full.params)


def test_only_process_zero_writes(tmp_path, data, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    make_trainer().fit(MLP(), data, epochs=2, batch_size=16,
                       callbacks=[ModelCheckpoint(tmp_path / "run", every_n_steps=3)])
    assert not (tmp_path / "run").exists()


def test_a_failed_write_stops_fit_with_a_checkpoint_error(tmp_path, data, monkeypatch):
    from jaxfit.checkpoint import CheckpointError, _msgpack

    def disk_full(fileobj, tree):
        raise OSError(28, "No space left on device")

    run = tmp_path / "run"
    monkeypatch.setattr(_msgpack, "write_tree", disk_full)  # in this process: the thread's
    with pytest.raises(CheckpointError, match=r"failed: \[Errno 28\] No space left on device"):
        make_trainer().fit(MLP(), data, epochs=3, batch_size=16,
                           callbacks=[ModelCheckpoint(run, background="thread")])
    assert not _names(run) and not [p for p in run.iterdir() if p.name.startswith(".tmp-")]


# Every save fails alike: with one save queued behind another, the second's error can also
# reach the fit's end, which warns that it failed too.
@pytest.mark.filterwarnings("ignore:ModelCheckpoint. a checkpoint write failed too")
def test_a_write_failing_in_the_writer_process_stops_fit_with_its_error(tmp_path, data):
    from jaxfit import Callback
    from jaxfit.checkpoint import CheckpointError

    class Huge(Callback):  # a state msgpack cannot hold: the writer process's encoder fails
        def state_dict(self):
            return {"n": 2**70}

    run = tmp_path / "run"
    saver = ModelCheckpoint(run, background="process")
    with pytest.raises(CheckpointError, match=r"failed: integer at .* does not fit in 64 bits"):
        make_trainer().fit(MLP(), data, epochs=3, batch_size=16, callbacks=[saver, Huge()])
    assert saver._writer is None  # closed: its process has ended
    assert not _names(run) and not [p for p in run.iterdir() if p.name.startswith(".tmp-")]


def test_a_new_run_refuses_a_directory_holding_another_runs_checkpoints(tmp_path, data):
    from conftest import MLP, make_trainer

    from jaxfit import ConfigError, Trainer
    from jaxfit.callbacks import ModelCheckpoint
    from jaxfit.checkpoint._manifest import scan

    x, y = data
    make_trainer().fit(MLP(), (x, y), epochs=2, batch_size=16, callbacks=[ModelCheckpoint(tmp_path, background=False)])
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ConfigError, match=r"holds checkpoints of another run.*Trainer.load"):
        make_trainer().fit(MLP(), (x, y), epochs=1, batch_size=16, callbacks=[ModelCheckpoint(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing touched
    resumed = Trainer.load(tmp_path)  # the run itself continues in its directory
    resumed.fit(epochs=3)
    assert max(info.step for info in scan(tmp_path)) == 15


class CountSaves(Callback):
    """Runs after ModelCheckpoint (order 150) and counts the saves its writer has received."""

    order = 150

    def __init__(self, mc, run, fail_at=None, wait=False):
        self.mc, self.run, self.fail_at, self.wait, self.seen = mc, run, fail_at, wait, []

    def on_epoch_end(self, trainer, logs):
        if self.wait:
            self.mc.wait_until_finished()
        self.seen.append(("end", trainer.epoch, len(self.mc.stats.blocking), len(_names(self.run))))
        if trainer.epoch == self.fail_at:
            raise RuntimeError("logger failed")

    def on_epoch_start(self, trainer):
        self.seen.append(("start", trainer.epoch, len(self.mc.stats.blocking)))


def test_a_background_epoch_save_reaches_its_writer_after_the_epochs_loggers(tmp_path, data):
    # Taken in on_epoch_end, handed to the writer thread when the next epoch starts, so the
    # callbacks after ModelCheckpoint write their rows with no writer thread running; the
    # last epoch's save is handed over at fit end.
    run = tmp_path / "run"
    mc = ModelCheckpoint(run, keep_last=None)
    counter = CountSaves(mc, run)
    make_trainer().fit(MLP(), data, epochs=3, batch_size=16, callbacks=[mc, counter])
    assert [s[:3] for s in counter.seen] == [
        ("start", 1, 0), ("end", 1, 0), ("start", 2, 1), ("end", 2, 1), ("start", 3, 2),
        ("end", 3, 2)]
    assert [n.split("-step")[1] for n in _names(run)] == ["5", "10", "15"]
    reasons = [json.loads((run / n / "manifest.json").read_text())["reason"] for n in _names(run)]
    assert reasons == ["epoch"] * 3


def test_an_inline_epoch_save_is_on_disk_for_the_callbacks_after_it(tmp_path, data):
    run = tmp_path / "run"
    mc = ModelCheckpoint(run, keep_last=None, background=False)
    counter = CountSaves(mc, run)
    make_trainer().fit(MLP(), data, epochs=2, batch_size=16, callbacks=[mc, counter])
    assert [s for s in counter.seen if s[0] == "end"] == [("end", 1, 1, 1), ("end", 2, 2, 2)]


def test_an_epoch_save_taken_before_a_later_callback_fails_is_written(tmp_path, data):
    # Epoch 2's steps all finished and its save was taken before the logger after
    # ModelCheckpoint raised: that checkpoint is complete and is written before fit re-raises.
    run = tmp_path / "run"
    mc = ModelCheckpoint(run, keep_last=None)
    with pytest.raises(RuntimeError, match="logger failed"):
        make_trainer().fit(MLP(), data, epochs=3, batch_size=16,
                           callbacks=[mc, CountSaves(mc, run, fail_at=2)])
    assert [n.split("-step")[1] for n in _names(run)] == ["5", "10"]
    resumed = Trainer.load(run)
    assert (resumed.epoch, resumed.step) == (2, 10)


def test_wait_until_finished_puts_the_epochs_background_save_on_disk(tmp_path, data):
    run = tmp_path / "run"
    mc = ModelCheckpoint(run, keep_last=None)
    counter = CountSaves(mc, run, wait=True)
    make_trainer().fit(MLP(), data, epochs=2, batch_size=16, callbacks=[mc, counter])
    assert [s for s in counter.seen if s[0] == "end"] == [("end", 1, 1, 1), ("end", 2, 2, 2)]
    mc.wait_until_finished()  # after the fit: nothing left to wait for
