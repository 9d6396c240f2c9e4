"""The checkpoint writer process (Linux): same bytes as the thread, signals, death, the lock."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import MLP, make_trainer

from jaxfit import Callback, Trainer
from jaxfit.callbacks import ModelCheckpoint
from jaxfit.checkpoint import RunLock, RunLockedError, decode_state, read_checkpoint

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="the writer process needs Linux (PR_SET_PDEATHSIG)")


def _names(run):
    return sorted(p.name for p in run.iterdir() if p.name.startswith("ckpt-"))


class AtEpoch(Callback):
    """Calls ``act(writer_pid)`` at the end of epoch ``epoch`` (after ModelCheckpoint saved)."""

    order = 300

    def __init__(self, epoch, act):
        self.epoch, self.act, self.pids = epoch, act, []

    def on_epoch_end(self, trainer, logs):
        saver = trainer.callbacks.find(ModelCheckpoint)[0]
        child = saver._writer._child
        self.pids.append(None if child is None else child._proc.pid)
        if trainer.epoch == self.epoch:
            self.act(self.pids[-1])


def _bytes(tree):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, [np.asarray(x).dtype.str + str(np.shape(x)) + np.asarray(x).tobytes().hex()
                     for x in leaves]


def _gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_the_writer_process_writes_the_bytes_the_thread_writes_and_ends_with_the_fit(
        tmp_path, data):
    runs = {}
    for background in ("process", "thread"):
        run = tmp_path / str(background)
        seen = AtEpoch(0, lambda pid: None)
        make_trainer().fit(MLP(), data, epochs=3, batch_size=16, verbose=0,
                           callbacks=[ModelCheckpoint(run, keep_last=None, background=background),
                                      seen])
        runs[background] = run
        if background == "process":
            assert None not in seen.pids and len(set(seen.pids)) == 1  # one process per fit
            assert _gone(seen.pids[0])  # ended by the fit's end
        else:
            assert seen.pids == [None] * 3
    assert _names(runs["process"]) == _names(runs["thread"]) == [
        "ckpt-000001-step5", "ckpt-000002-step10", "ckpt-000003-step15"]
    for name in _names(runs["process"]):
        a = decode_state((runs["process"] / name / "state.msgpack").read_bytes())
        b = decode_state((runs["thread"] / name / "state.msgpack").read_bytes())
        # (the run ids, and ModelCheckpoint's state key naming its directory, differ)
        assert _bytes(a["train_state"]) == _bytes(b["train_state"])
        for key in ("step", "epoch", "batch_in_epoch", "rng", "history"):
            assert _bytes(a[key]) == _bytes(b[key])
    resumed = Trainer.load(runs["process"])
    assert resumed.epoch == 3


def test_the_writer_process_ignores_the_signals_a_terminal_sends_the_process_group(
        tmp_path, data):
    # Ctrl-C or a scheduler's SIGTERM reach every process of the group; the trainer handles
    # them, and its checkpoints still need the writer.
    def signal_it(pid):
        os.kill(pid, signal.SIGINT)
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGHUP)

    run = tmp_path / "run"
    make_trainer().fit(MLP(), data, epochs=4, batch_size=16, verbose=0,
                       callbacks=[ModelCheckpoint(run, keep_last=None, background="process"),
                                  AtEpoch(1, signal_it)])
    assert _names(run) == ["ckpt-000001-step5", "ckpt-000002-step10", "ckpt-000003-step15",
                           "ckpt-000004-step20"]
    _, manifest, _ = read_checkpoint(run / "ckpt-000004-step20")
    assert manifest["epoch"] == 4


def test_a_killed_writer_process_is_replaced_by_the_thread_with_a_warning(tmp_path, data):
    run = tmp_path / "run"
    killer = AtEpoch(1, lambda pid: os.kill(pid, signal.SIGKILL))
    with pytest.warns(RuntimeWarning, match=r"writer process was killed by signal 9; this and "
                                            r"later checkpoints are written by a thread"):
        make_trainer().fit(MLP(), data, epochs=4, batch_size=16, verbose=0,
                           callbacks=[ModelCheckpoint(run, keep_last=2, background="process"),
                                      killer])
    # The save the process may have dropped was written by the thread: nothing is missing,
    # and retention (rescanned) still keeps the newest two.
    assert killer.pids[2:] == [None, None]
    assert _names(run) == ["ckpt-000003-step15", "ckpt-000004-step20"]
    uninterrupted = make_trainer()
    uninterrupted.fit(MLP(), data, epochs=4, batch_size=16, verbose=0)
    resumed = Trainer.load(run)
    assert resumed.step == 20
    for x, y in zip(np.asarray(resumed.params["Dense_0"]["kernel"]).ravel(),
                    np.asarray(uninterrupted.params["Dense_0"]["kernel"]).ravel()):
        assert x == y


def _hold_lock(run, recorded_pid, seconds):
    """A process holding ``run``'s lock for ``seconds``, its file naming ``recorded_pid``."""
    code = ("import fcntl, json, os, socket, sys, time\n"
            "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "os.ftruncate(fd, 0)\n"
            "os.write(fd, json.dumps({'pid': int(sys.argv[2]), "
            "'host': socket.gethostname()}).encode())\n"
            "print('held', flush=True)\n"
            "time.sleep(float(sys.argv[3]))\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run / "writer.lock"),
                             str(recorded_pid), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def test_a_lock_whose_recorded_holder_died_is_waited_for_not_refused(tmp_path):
    # A killed trainer's writer process holds a copy of the lock for the moments it takes to
    # die: a resume started at once waits for it. A lock whose holder lives is refused at once.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    holder = _hold_lock(tmp_path, int(dead.stdout), 1.0)
    start = time.monotonic()
    lock = RunLock.acquire(tmp_path, run_id="r")
    waited = time.monotonic() - start
    holder.wait()
    holder.stdout.close()
    assert lock.held and waited > 0.2
    assert json.loads((tmp_path / "writer.lock").read_text())["pid"] == os.getpid()
    lock.release()

    alive = _hold_lock(tmp_path, os.getppid(), 30.0)  # names a live process
    try:
        start = time.monotonic()
        with pytest.raises(RunLockedError, match=f"pid {os.getppid()} on host "
                                                 f"{socket.gethostname()}"):
            RunLock.acquire(tmp_path)
        assert time.monotonic() - start < 5
    finally:
        alive.kill()
        alive.wait()
        alive.stdout.close()


def test_the_writer_process_is_told_to_end_even_when_another_process_holds_its_pipe(
        tmp_path, data):
    # A process forked during the fit (a data loader's workers) holds a copy of the pipe's
    # writing end, so the writer process would never see it close: it is told to end.
    held = {}

    class CopyPipe(Callback):
        order = 300

        def on_epoch_end(self, trainer, logs):
            if not held:
                writer = trainer.callbacks.find(ModelCheckpoint)[0]._writer
                held["proc"] = writer._child._proc
                held["fd"] = os.dup(writer._child._out)

    try:
        make_trainer().fit(MLP(), data, epochs=2, batch_size=16, verbose=0,
                           callbacks=[ModelCheckpoint(tmp_path / "run", background="process"),
                                      CopyPipe()])
        assert held["proc"].returncode == 0  # ended by itself, not killed after a timeout
    finally:
        os.close(held["fd"])
