"""One writer per run directory, claimed before any work; and the smaller points of fit start:
two ModelCheckpoints in one fit, leftover temporaries, a directory that is a file, a full
disk, group-writable directories of a user's own group."""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MLP, make_trainer

from jaxfit import Callback, Trainer
from jaxfit.callbacks import ModelCheckpoint
from jaxfit.checkpoint import CheckpointError, UntrustedRecipeError, list_checkpoints
from jaxfit.checkpoint import _io, _lock, _recipe, _writer
from jaxfit.checkpoint._errors import RunLockedError
from jaxfit.errors import ConfigError, DataError

ROOT = str(Path(__file__).resolve().parents[1])


class Spy(Callback):
    """Records the hooks after setup: any of them means work was done."""

    order = -1000

    def __init__(self):
        self.calls = []

    def on_fit_start(self, trainer):
        self.calls.append("on_fit_start")

    def on_train_batch_end(self, trainer, logs):
        self.calls.append("on_train_batch_end")


def _held(run):
    """Whether this process holds the writer lock of ``run``."""
    return any(lock.path.parent == run for lock in list(_lock._HELD.values()))


def _listing(path):
    return sorted((p.name, p.stat().st_mtime_ns) for p in path.rglob("*"))


@pytest.fixture
def holder(tmp_path):
    """Another process holding the writer lock of ``tmp_path / "run"``; killed at the end."""
    run = tmp_path / "run"
    run.mkdir()
    code = ("import sys; from pathlib import Path; from jaxfit.checkpoint._lock import RunLock; "
            "lock = RunLock.acquire(Path(sys.argv[1]), run_id='other-run'); "
            "print('held', flush=True); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run)], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.stdout.readline().strip() == "held"
    yield run, proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    proc.stdin.close()
    proc.stdout.close()


@pytest.mark.multiprocess
def test_a_second_writer_is_refused_before_any_work_naming_the_holder(holder, data):
    run, proc = holder
    before = _listing(run)
    spy = Spy()
    with pytest.raises(RunLockedError,
                       match=rf"{run} is being written by another process \(pid {proc.pid} on "
                             rf"host {socket.gethostname()}, run other-run.*Trainer\.load"):
        make_trainer().fit(MLP(), data, epochs=1, batch_size=16,
                           callbacks=[spy, ModelCheckpoint(run)])
    assert spy.calls == [] and _listing(run) == before
    # SIGKILL: the kernel releases the lock; the directory is usable at once.
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    make_trainer().fit(MLP(), data, epochs=1, batch_size=16, callbacks=[ModelCheckpoint(run)])
    assert [i.step for i in list_checkpoints(run)] == [5]


def test_the_lock_is_released_however_fit_ends(tmp_path, data):
    class Boom(Callback):
        def on_train_batch_end(self, trainer, logs):
            raise RuntimeError("boom")

    run = tmp_path / "run"
    trainer = make_trainer()
    with pytest.raises(Exception, match="boom"):
        trainer.fit(MLP(), data, epochs=1, batch_size=16,
                    callbacks=[ModelCheckpoint(run), Boom()])
    assert not _held(run)
    other = _lock.RunLock.acquire(run)  # free again for anyone
    other.release()


def test_a_fit_that_failed_before_training_leaves_no_lock_behind(tmp_path, data):
    x, y = data
    run = tmp_path / "run"
    trainer = make_trainer()
    # Targets of another length fail after setup, before on_fit_start (no on_fit_end runs):
    # the next fit of this trainer takes the lock over.
    with pytest.raises(DataError, match="same number of samples"):
        trainer.fit(MLP(), (x, y[:10]), epochs=1, batch_size=16,
                    callbacks=[ModelCheckpoint(run)])
    trainer.fit(MLP(), (x, y), epochs=1, batch_size=16, callbacks=[ModelCheckpoint(run)])
    assert [i.step for i in list_checkpoints(run)] == [5]
    # Another trainer of this process while one fit holds the lock: refused, naming it.
    owner, other_trainer = Spy(), make_trainer()
    lock = _lock.RunLock.acquire(run, owner=owner, trainer=other_trainer)
    try:
        with pytest.raises(RunLockedError, match=rf"another trainer of this process \(pid "
                                                 rf"{os.getpid()}\)"):
            Trainer.load(run).fit(epochs=2)
    finally:
        lock.release()


def test_two_model_checkpoints_in_one_fit_write_separate_directories(tmp_path, data):
    x, y = data
    latest, best = tmp_path / "latest", tmp_path / "best"
    make_trainer().fit(MLP(), (x, y), validation_data=(x, y), epochs=2, batch_size=16,
                       callbacks=[ModelCheckpoint(latest, every_n_steps=2, every_n_epochs=None,
                                                  keep_last=1),
                                  ModelCheckpoint(best, monitor="val_loss", keep_last=1,
                                                  keep_best=1)])
    assert [i.step for i in list_checkpoints(latest)] == [10]
    assert [i.manifest["reason"] for i in list_checkpoints(best)][-1] == "epoch"
    for run in (latest, best):  # each loads, and writes on where it was loaded from
        resumed = Trainer.load(run)
        assert resumed.step == 10
        keys = set(resumed.state_dict()["callbacks"])
        assert keys == {f"ModelCheckpoint[{latest}]", f"ModelCheckpoint[{best}]"}


def test_two_model_checkpoints_into_one_directory_are_refused(tmp_path, data, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RunLockedError, match=r"already written by another ModelCheckpoint of "
                                             r"this fit"):
        make_trainer().fit(MLP(), data, epochs=1, batch_size=16,
                           callbacks=[ModelCheckpoint("run"), ModelCheckpoint(tmp_path / "run")])
    assert not _held(tmp_path / "run")


def test_recipes_of_older_versions_keep_the_plain_state_key(tmp_path):
    cb = ModelCheckpoint(tmp_path)
    del cb.__dict__["_state_key"]  # as unpickled from a recipe written before the key existed
    assert cb.state_key == "ModelCheckpoint"


def test_a_directory_that_is_a_file_is_named_before_any_work(tmp_path, data):
    spy = Spy()
    path = tmp_path / "run"
    path.write_text("my notes")
    with pytest.raises(ConfigError, match=rf"{path} exists and is not a directory"):
        make_trainer().fit(MLP(), data, epochs=1, callbacks=[spy, ModelCheckpoint(path)])
    with pytest.raises(ConfigError, match=rf"cannot create the run directory {path}/sub: "
                                          rf"{path} is a file"):
        make_trainer().fit(MLP(), data, epochs=1, callbacks=[spy, ModelCheckpoint(path / "sub")])
    assert spy.calls == [] and path.read_text() == "my notes"


class _FullFS:
    """What os.statvfs says of a file system with ``free`` bytes left."""

    f_blocks, f_frsize = 10**6, 1

    def __init__(self, free):
        self.f_bavail = self.f_bfree = free


@pytest.mark.parametrize("free, match, worked", [
    (0, r"has 0\.0 MiB free, less than a checkpoint", []),  # refused in setup
    (100, r"has 0\.0 MiB free, less than a checkpoint of this run needs \(about 0\.\d+ MiB\)",
     ["on_fit_start"]),  # refused once the state's size is known, before compiling
])
def test_a_full_disk_at_fit_start_names_the_directory(tmp_path, data, monkeypatch, free,
                                                       match, worked):
    run = tmp_path / "run"
    monkeypatch.setattr(os, "statvfs", lambda path: _FullFS(free))
    spy = Spy()
    with pytest.raises(CheckpointError, match=rf"{run}.*{match}.*nothing was trained yet"):
        make_trainer().fit(MLP(), data, epochs=1, batch_size=16,
                           callbacks=[spy, ModelCheckpoint(run)])
    assert spy.calls == worked and not list_checkpoints(run)


def test_no_space_for_the_recipe_names_the_directory(tmp_path, data, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    run = tmp_path / "run"
    monkeypatch.setattr(_recipe, "replace_file", full)
    with pytest.raises(CheckpointError, match=rf"cannot write the run's recipe into {run} "
                                              r"\(\[Errno 28\] No space left on device\)"):
        make_trainer().fit(MLP(), data, epochs=1, batch_size=16,
                           callbacks=[ModelCheckpoint(run)])
    assert not _held(run)


def test_leftover_temporaries_dead_removed_live_kept_reused_pid_removed(tmp_path):
    me = os.getpid()
    start = _io._start_time(os.getppid())
    names = {
        "dead": ".tmp-999999999-ckpt-000001-step1",
        "dead_new": f".tmp-999999999-{_io.host_tag()}.12345-ckpt-000002-step2",
        "live": f".tmp-{os.getppid()}-{_io.host_tag()}.{start}-ckpt-000003-step3",
        "reused": f".tmp-{os.getppid()}-{_io.host_tag()}.{start + 1}-ckpt-000004-step4",
        "other_host": f".tmp-999999999-{'0' * 8}.1-ckpt-000005-step5",
        "ours": _io.tmp_name("ckpt-000006-step6"),
    }
    for name in names.values():
        (tmp_path / name).mkdir()
    assert names["ours"].startswith(f".tmp-{me}-{_io.host_tag()}.")
    removed = set(_io.remove_stale_tmp(tmp_path))
    assert removed == {names[k] for k in ("dead", "dead_new", "reused", "ours")}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([names["live"],
                                                                 names["other_host"]])


def test_retention_never_deletes_another_runs_checkpoints(tmp_path):
    import numpy as np

    for seq, run_id in [(1, "theirs"), (2, "ours"), (3, "ours")]:
        _writer.write_checkpoint(tmp_path, {"w": np.zeros(2)}, seq=seq, step=seq, epoch=seq,
                                 batch_in_epoch=0, reason="epoch", metrics={}, run_id=run_id)
    removed = _writer.apply_retention(tmp_path, keep_last=1, keep_best=0, monitor=None,
                                      mode=None, run_id="ours")
    assert removed == ["ckpt-000002-step2"]
    assert [i.manifest["run_id"] for i in list_checkpoints(tmp_path)] == ["theirs", "ours"]


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX ownership")
def test_group_writable_run_of_the_users_own_group_loads(tmp_path, data, monkeypatch):
    import grp
    import pwd

    run = tmp_path / "run"
    old = os.umask(0o002)
    try:
        make_trainer().fit(MLP(), data, epochs=1, batch_size=16, callbacks=[ModelCheckpoint(run)])
    finally:
        os.umask(old)
    assert run.stat().st_mode & 0o777 == 0o775
    me = pwd.getpwuid(os.getuid()).pw_name
    own = grp.struct_group((me, "x", os.getgid(), []))
    monkeypatch.setattr(grp, "getgrgid", lambda gid: own)
    assert Trainer.load(run).step == 5
    # A group with other members is not the user's own: refused, saying why.
    shared = grp.struct_group((me, "x", os.getgid(), ["alice"]))
    monkeypatch.setattr(grp, "getgrgid", lambda gid: shared)
    with pytest.raises(UntrustedRecipeError, match=r"can be written by other users.*umask 002"):
        Trainer.load(run)
