"""One writer per run directory: an ``flock``-ed lock file, released by the kernel on death.

A fit that writes checkpoints holds ``<run>/writer.lock`` (an exclusive ``flock``) from its
first instant to its end. The kernel drops the lock when the holder's last file descriptor
closes, so a SIGKILL never leaves a stale lock behind; the file itself stays (deleting it
would let two writers lock two different files of one name). While it holds the lock the
writer records its pid, host, run id and start time in the file, so a refused second writer
can say who holds the directory. Readers (``Trainer.load``, ``info``) never take the lock:
every checkpoint is published by one atomic rename, so they cannot see a half state.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import time
import weakref
from pathlib import Path
from typing import Any

from jaxfit.checkpoint import _io
from jaxfit.checkpoint._errors import CheckpointError, RunLockedError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock; one writer is the user's job
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = "writer.lock"
_MAX_INFO_BYTES = 4096
# How long a lock whose recorded holder is dead may stay taken (by that holder's dying
# checkpoint writer process) before a new writer is refused.
_DEAD_HOLDER_GRACE = 10.0


# Locks this process holds, by (st_dev, st_ino) of the lock file: flock conflicts between two
# open files of one process too, and this tells "another trainer of this process writes
# there" from "this trainer's previous fit ended without on_fit_end". Weak: a lock whose
# ModelCheckpoint is garbage collected is released.
_HELD: weakref.WeakValueDictionary[tuple[int, int], RunLock] = weakref.WeakValueDictionary()


def _forget_in_child() -> None:
    # A forked child shares the parent's open lock files; closing its copies (never
    # LOCK_UN, which would release the parent's lock) keeps the lock the parent's alone.
    for lock in list(_HELD.values()):
        if lock._fd is not None:
            try:
                os.close(lock._fd)
            except OSError:
                pass
            lock._fd = None
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


def _describe(info: dict[str, Any]) -> str:
    parts = [f"pid {info.get('pid', '?')} on host {info.get('host', '?')}"]
    if info.get("run_id"):
        parts.append(f"run {info['run_id']}")
    if info.get("since"):
        parts.append(f"since {info['since']}")
    return ", ".join(parts)


def read_holder(run_dir: str | os.PathLike) -> dict[str, Any]:
    """What the lock file of ``run_dir`` says about its (last) holder; {} if unreadable."""
    try:
        data = _io.read_regular(Path(run_dir) / LOCK_FILE, limit=_MAX_INFO_BYTES)
        info = json.loads(data)
    except (OSError, ValueError, RecursionError, CheckpointError):
        return {}
    return info if isinstance(info, dict) else {}


class RunLock:
    """The exclusive writer lock of one run directory, held until :meth:`release`.

    Use :meth:`acquire`; the lock is also released when the object is garbage collected or
    the process ends, however it ends.

    Attributes:
      path: the lock file.
    """

    def __init__(self, path: Path, fd: int | None, key: tuple[int, int] | None,
                 owner: Any, trainer: Any) -> None:
        self.path = path
        self._fd, self._key = fd, key
        self._owner = weakref.ref(owner) if owner is not None else lambda: None
        self._trainer = weakref.ref(trainer) if trainer is not None else lambda: None

    @classmethod
    def acquire(cls, run_dir: Path, *, run_id: str | None = None, owner: Any = None,
                trainer: Any = None, who: str = "ModelCheckpoint") -> RunLock:
        """Takes the writer lock of ``run_dir`` (which must exist), without waiting.

        Args:
          run_dir: the run directory.
          run_id: the run this writer writes, recorded for a refused writer's message.
          owner: the object holding the lock (a ModelCheckpoint).
          trainer: the trainer whose fit holds it; with ``owner``, tells a lock left by the
            previous fit of this trainer (taken over) from one of another trainer (refused).
          who: what to call the writer in messages.

        Raises:
          RunLockedError: another process, or another trainer of this process, writes
            into ``run_dir``; the message names it.
          CheckpointError: the lock file cannot be created or written (e.g. a full disk).
        """
        path = run_dir / LOCK_FILE
        if fcntl is None:  # pragma: no cover
            return cls(path, None, None, owner, trainer)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
                         | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as err:
            raise CheckpointError(
                f"{who}: cannot create the lock file {path} ({err}); the run directory must "
                "be writable, with space left on its file system"
            ) from err
        try:
            info = os.fstat(fd)
            key = (info.st_dev, info.st_ino)
            held = _HELD.get(key)
            if held is not None:
                held._refuse_or_give_up(path, owner, trainer, who)
            if not cls._take(fd, run_dir):
                raise RunLockedError(cls._busy_message(run_dir, who)) from None
            lock = cls(path, fd, key, owner, trainer)
            _HELD[key] = lock
        except BaseException:
            os.close(fd)
            raise
        try:
            lock._record(run_id)
        except OSError as err:
            lock.release()
            raise CheckpointError(
                f"{who}: cannot write the lock file {path} ({err}); free space on its file "
                "system or choose another directory (nothing was trained yet)"
            ) from err
        return lock

    @staticmethod
    def _take(fd: int, run_dir: Path) -> bool:
        """flock without waiting, except for a holder that has just died: its checkpoint
        writer process (which holds a copy of the lock, see ``_child``) is killed with it and
        lets go within moments."""
        deadline = None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                pass
            if deadline is None:
                holder = read_holder(run_dir)
                if not (holder.get("host") == socket.gethostname()
                        and isinstance(holder.get("pid"), int)
                        and not _io._pid_alive(holder["pid"])):
                    return False
                deadline = time.monotonic() + _DEAD_HOLDER_GRACE
            elif time.monotonic() > deadline:
                return False
            time.sleep(0.01)

    @staticmethod
    def _busy_message(run_dir: Path, who: str) -> str:
        # The holder writes its name just after taking the lock: give it a moment.
        holder: dict[str, Any] = {}
        for _ in range(50):
            holder = read_holder(run_dir)
            if holder.get("pid") is not None:
                break
            time.sleep(0.01)
        return (
            f"{who}: {run_dir} is being written by another process ({_describe(holder)}); "
            "a run directory has one writer at a time, so this fit was refused before any "
            "work and nothing on disk was touched. Wait for that fit to end (or stop it), "
            "then continue the run with Trainer.load(...).fit(); or give this run another "
            "directory."
        )

    def _refuse_or_give_up(self, path: Path, owner: Any, trainer: Any, who: str) -> None:
        """Called on a lock of this process that a new acquire of the same file meets."""
        mine = self._owner()
        fits = getattr(getattr(trainer, "callbacks", None), "callbacks", ())
        stale = (mine is None or mine is owner
                 or (self._trainer() is trainer and trainer is not None
                     and not any(cb is mine for cb in fits)))
        if stale:
            # The previous fit of this trainer (or of this callback) ended without
            # on_fit_end, e.g. failing before it started training: it writes nothing now.
            self.release()
            return
        same_fit = trainer is not None and self._trainer() is trainer
        if same_fit:
            # This refusal ends the fit before any work, and a fit whose setup fails gets no
            # on_fit_end: release the other ModelCheckpoint's lock here.
            self.release()
        raise RunLockedError(
            f"{who}: {path.parent} is already written by "
            + ("another ModelCheckpoint of this fit" if same_fit
               else f"another trainer of this process (pid {os.getpid()}), whose fit is under "
                    "way or failed before training started (then its next fit, or deleting "
                    "it, releases the directory)")
            + "; a run directory has one writer at a time. Give each ModelCheckpoint its "
            "own directory."
        )

    def _record(self, run_id: str | None) -> None:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "run_id": run_id,
                "since": datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec="seconds")}
        data = (json.dumps(info) + "\n").encode()
        assert self._fd is not None  # acquire() records right after opening the file
        os.ftruncate(self._fd, 0)
        if os.pwrite(self._fd, data, 0) != len(data):
            raise OSError(28, "short write (no space left on device?)")

    def fileno(self) -> int | None:
        """The lock file's descriptor while held (None without flock): a process given a
        copy keeps the directory locked until it ends too."""
        return self._fd

    @property
    def held(self) -> bool:
        """Whether this object still holds the lock."""
        return self._fd is not None

    def release(self) -> None:
        """Releases the lock (idempotent)."""
        fd, self._fd = self._fd, None
        if self._key is not None and _HELD.get(self._key) is self:
            del _HELD[self._key]
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    def __del__(self) -> None:
        try:
            self.release()
        except OSError:  # at interpreter exit the file may be closed already: nothing to do
            return
