"""The checkpoint writer process: file work out of the training process's interpreter.

A background writer thread shares Python's interpreter lock with the training loop, so its
Python work (the manifest, ~25 system calls each retaking the lock, retention) holds up a
dispatch-bound loop: on a small model that was most of what a checkpoint every epoch cost.
So with ``ModelCheckpoint(background="process")``, on Linux, :class:`RunWriter` hands each
whole (unsharded, one-process) checkpoint to a child process instead: the writer thread
of the training process only fetches the snapshot (tested for NaN/inf on the devices) and
sends it down a pipe; the child writes, fsyncs, renames and applies retention, exactly as
the thread would (the same ``_writer`` functions), and replies.

The child can never outlive its trainer: it asks the kernel for SIGKILL when the thread
that started it ends (``PR_SET_PDEATHSIG``), and it holds a copy of the run lock's file
descriptor, so the directory stays locked until both are gone (a resume that finds the
lock held by a dead trainer waits for it: see ``RunLock.acquire``). It ignores SIGINT and
SIGTERM, which a terminal or a scheduler sends to the whole process group: the trainer
handles them, and its last checkpoint still needs the child. It imports no JAX.

Messages are framed: ``<Q`` length of a pickled header, ``<I`` count of out-of-band
buffers, their ``<Q`` lengths, then the header and the buffers (pickle protocol 5: the
arrays travel as their raw bytes). Replies are a ``<Q`` length and a pickled dict.
"""

from __future__ import annotations

import os
import pickle
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

_PR_SET_PDEATHSIG = 1
_NICE = 10
_STOP = "jaxfit-writer-stop"  # the message that ends the child
_IOV_MAX = 512  # pieces per writev (the system's IOV_MAX is at least 1024)
SUPPORTED = sys.platform.startswith("linux")


def _send(fd: int, obj: Any) -> None:
    """Writes ``obj`` as one framed message (see the module docstring)."""
    buffers: list[pickle.PickleBuffer] = []
    header = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    frame = struct.pack(f"<QI{len(raws)}Q", len(header), len(raws), *(r.nbytes for r in raws))
    pieces: list[memoryview] = [memoryview(frame), memoryview(header), *raws]
    while pieces:
        batch = pieces[:_IOV_MAX]
        done = os.writev(fd, batch)  # blocking: the lock is released while it waits
        for piece in batch:
            if done >= piece.nbytes:
                done -= piece.nbytes
                pieces.pop(0)
            else:
                pieces[0] = piece[done:]
                break


def _read_exactly(fd: int, n: int) -> bytearray | None:
    out = bytearray(n)
    view, got = memoryview(out), 0
    while got < n:
        k = os.readv(fd, [view[got:]])
        if k == 0:
            return None  # the other end closed
        got += k
    return out


def _receive(fd: int) -> Any:
    """Reads one framed message; None at end of file."""
    head = _read_exactly(fd, 12)
    if head is None:
        return None
    size, count = struct.unpack("<QI", head)
    lengths = struct.unpack(f"<{count}Q", _read_exactly(fd, 8 * count) or b"") if count else ()
    header = _read_exactly(fd, size)
    buffers = [_read_exactly(fd, n) for n in lengths]
    if header is None or any(b is None for b in buffers):
        return None
    return pickle.loads(header, buffers=buffers)


class WriterProcess:
    """The training process's handle on one writer child, for one run directory.

    Started by the thread of the fit (the child dies with that thread). Jobs are sent and
    their replies received in order, by the writer threads; :meth:`close` ends the child.
    """

    def __init__(self, run_dir: Path, retention: dict[str, Any], lock_fd: int | None) -> None:
        root = str(Path(__file__).resolve().parents[2])  # the jaxfit that runs here
        code = ("import sys; sys.path.insert(0, sys.argv[1]); "
                "from jaxfit.checkpoint._child import main; main()")
        fds = (lock_fd,) if lock_fd is not None else ()
        self._proc = subprocess.Popen(
            [sys.executable, "-c", code, root, str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=fds, close_fds=True)
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._out, self._in = self._proc.stdin.fileno(), self._proc.stdout.fileno()
        try:
            _send(self._out, {"run_dir": str(run_dir), "retention": retention})
        except OSError:  # it could not start
            self.close()
            raise

    def send(self, job: dict) -> bool:
        """Sends one job (on a writer thread, one at a time); False when the child is gone."""
        try:
            _send(self._out, job)
            return True
        except (BrokenPipeError, ConnectionResetError):
            return False

    def receive(self) -> dict | None:
        """The reply to the oldest job sent: ``{"nbytes": n, "seconds": s}`` or
        ``{"error": exception}``; None when the child is gone."""
        try:
            return _receive(self._in)
        except (ConnectionResetError, OSError):
            return None

    def status(self) -> str:
        """How the child ended (waits a moment for it)."""
        try:
            code = self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            code = self._proc.wait()
        return f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"

    def close(self) -> None:
        """Ends the child once its last reply is in (idempotent)."""
        if self._proc.poll() is None:
            try:
                # Told, not left to see the end of the pipe: a process forked meanwhile
                # (a data loader's workers) may hold a copy of this end.
                _send(self._out, {_STOP: True})
                self._proc.stdin.close()  # type: ignore[union-attr]
                self._proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
        for pipe in (self._proc.stdin, self._proc.stdout):
            if pipe is not None and not pipe.closed:
                pipe.close()


def _die_with_parent(parent: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        os._exit(3)
    if os.getppid() != parent:  # the parent ended before the request was in place
        os._exit(3)


def main() -> None:
    """The child's loop: one reply per job, until the training process closes the pipe."""
    _die_with_parent(int(sys.argv[2]))
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    # Below training on contended CPUs: a write that falls behind makes the next save wait
    # (at most one queued behind the one under way), never starves it.
    os.nice(_NICE)
    from jaxfit.checkpoint import _writer

    # Replies go to a copy of the pipe; the usual descriptor 1 becomes stderr, so nothing
    # printed (by Python or by a library) can corrupt them.
    src, dst = sys.stdin.fileno(), os.dup(sys.stdout.fileno())
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    config = _receive(src)
    if config is None:
        return
    known = _writer.Known(Path(config["run_dir"]), **config["retention"])
    while (job := _receive(src)) is not None and _STOP not in job:
        began = time.perf_counter()
        try:
            reply: dict[str, Any] = {"nbytes": _writer.perform(known, job),
                                     "seconds": time.perf_counter() - began}
        except BaseException as err:  # handed to the trainer, which raises it at its next save
            reply = {"error": _picklable(err)}
        _send(dst, reply)
    # (The run lock's inherited descriptor closes with the process.)


def _picklable(err: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:
        from jaxfit.checkpoint._errors import CheckpointError

        return CheckpointError(f"{type(err).__name__}: {err}")
