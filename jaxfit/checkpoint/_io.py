"""Atomic, durable file-system operations.

A checkpoint is written into a temporary directory next to its final place, every file and
the directory are fsynced, and one ``rename`` (then an fsync of the parent) puts it in
place: a kill at any instant leaves either no checkpoint or a complete one, and never
touches an earlier one. Small files (the ``latest`` pointer, the recipe) are replaced the
same way, through a temporary file and ``os.replace``.

Reading is defensive (a run directory may come from anywhere): :func:`read_regular` and
:func:`sha256_regular` open only regular files, never follow a symbolic link, never block on
a FIFO or a device, and check the size against the caller's limits before reading a byte.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import re
import shutil
import socket
import stat
from collections.abc import Callable, Iterable
from pathlib import Path

from jaxfit.checkpoint._errors import CheckpointCorruptError

TMP_PREFIX = ".tmp-"
# ".tmp-<pid>-<host tag>.<process start time>-<final name>"; names written by older
# versions have the pid only (".tmp-<pid>-<final name>").
_TMP_RE = re.compile(r"^\.tmp-(\d+)-(?:([0-9a-f]{8})\.(\d+)-)?")
_READ_FLAGS = (os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
               | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0))


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO (named pipe)"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISLNK, "symbolic link")):
        if test(mode):
            return name
    return "special file"


def _open_regular(path: Path) -> tuple[int, int]:
    """Opens ``path`` for reading if it is a regular file (not a link, FIFO or device).

    Returns:
      ``(file descriptor, size in bytes)``.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      CheckpointCorruptError: ``path`` is not a regular file, or cannot be opened.
    """
    # lstat first: a FIFO or device is refused without being opened (opening some devices
    # has side effects); O_NOFOLLOW and O_NONBLOCK close the race of a swap in between.
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise
    except OSError as err:  # a parent that is a file, no permission, ...
        raise CheckpointCorruptError(f"{path} cannot be read ({err})") from None
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointCorruptError(
            f"{path} is a {_kind(info.st_mode)}, not a regular file: a checkpoint's files are "
            "plain files inside it (copy the file itself instead of linking to it)"
        )
    try:
        fd = os.open(path, _READ_FLAGS)
    except FileNotFoundError:
        raise
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise CheckpointCorruptError(f"{path} is a symbolic link, not a regular file") from None
        raise CheckpointCorruptError(f"{path} cannot be opened ({err})") from None
    opened = os.fstat(fd)
    if not stat.S_ISREG(opened.st_mode) or (opened.st_dev, opened.st_ino) != (
            info.st_dev, info.st_ino):
        os.close(fd)
        raise CheckpointCorruptError(f"{path} was replaced while it was being opened")
    return fd, opened.st_size


def _read_into(fd: int, view: memoryview) -> int:
    if hasattr(os, "readv"):  # straight into the buffer: no second copy of a large state
        return os.readv(fd, [view])
    block = os.read(fd, min(len(view), 1 << 24))
    view[:len(block)] = block
    return len(block)


def _check_size(path: Path, size: int, limit: int, expected: int | None,
                limit_hint: str) -> None:
    if expected is not None and size != expected:
        raise CheckpointCorruptError(
            f"{path} has {size} bytes, the manifest recorded {expected} (truncated or modified)"
        )
    if size > limit:
        raise CheckpointCorruptError(f"{path}: {size} bytes is more than {limit_hint}")


def read_regular(path: Path, *, limit: int, expected: int | None = None,
                 limit_hint: str | None = None) -> bytearray:
    """The bytes of a regular file, refused unless it has ``expected`` bytes and at most
    ``limit`` (both checked before anything is read). Read once, into one buffer.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      CheckpointCorruptError: not a regular file, of the wrong size, or changed while read.
    """
    fd, size = _open_regular(path)
    try:
        _check_size(path, size, limit, expected, limit_hint or f"the limit of {limit} bytes")
        buf = bytearray(size)
        view, got = memoryview(buf), 0
        while got < size:
            n = _read_into(fd, view[got:])
            if n == 0:
                raise CheckpointCorruptError(f"{path} shrank while it was being read")
            got += n
        if os.read(fd, 1):
            raise CheckpointCorruptError(f"{path} grew while it was being read")
        return buf
    except OSError as err:
        raise CheckpointCorruptError(f"{path} cannot be read ({err})") from None
    finally:
        os.close(fd)


def sha256_regular(path: Path, *, limit: int, expected: int | None = None,
                   limit_hint: str | None = None, chunk: int = 1 << 22) -> str:
    """The sha256 hex digest of a regular file, with the checks of :func:`read_regular`,
    read in chunks (memory stays bounded whatever the file's size)."""
    fd, size = _open_regular(path)
    try:
        _check_size(path, size, limit, expected, limit_hint or f"the limit of {limit} bytes")
        digest, got = hashlib.sha256(), 0
        while block := os.read(fd, min(chunk, size - got + 1)):
            got += len(block)
            if got > size:
                raise CheckpointCorruptError(f"{path} grew while it was being read")
            digest.update(block)
        if got != size:
            raise CheckpointCorruptError(f"{path} shrank while it was being read")
        return digest.hexdigest()
    except OSError as err:
        raise CheckpointCorruptError(f"{path} cannot be read ({err})") from None
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Makes a rename or unlink inside ``path`` durable (no-op where directories can't be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # Windows: directories cannot be opened; NTFS journals renames itself
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Writes all of ``data`` to ``fd`` (a large write may be partial)."""
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view):]


class HashingWriter:
    """A write-only wrapper of a file descriptor that counts and sha256-hashes what goes
    through it.

    Small writes (msgpack headers, scalars) are gathered and hashed and written together;
    a large buffer goes straight through (hashlib and ``os.write`` release the interpreter
    lock for it, so a background write hardly holds up the training thread). Call
    :meth:`flush` before the file is closed.
    """

    _GATHER = 1 << 16

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self.sha256 = hashlib.sha256()
        self.size = 0
        self._small = bytearray()

    def write(self, data: bytes | memoryview) -> int:
        n = len(data)
        self.size += n
        if n < self._GATHER:
            self._small += data
            if len(self._small) >= self._GATHER:
                self.flush()
        else:
            self.flush()
            self.sha256.update(data)
            _write_all(self._fd, data)
        return n

    def flush(self) -> None:
        """Hashes and writes what was gathered."""
        if self._small:
            self.sha256.update(self._small)
            _write_all(self._fd, self._small)
            self._small = bytearray()


_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) \
    | getattr(os, "O_BINARY", 0)


def write_file(path: Path, fill: Callable[[HashingWriter], object]) -> dict:
    """Creates ``path`` (which must not exist), lets ``fill`` write into it, fsyncs it.

    The file is written through its descriptor, with no buffered file object around it: a
    save is a few large writes, and each system call less is one hand-off of the
    interpreter lock less for a background writer.

    Returns:
      ``{"sha256": hex digest, "size": bytes}`` of what was written.
    """
    fd = os.open(path, _CREATE_FLAGS, 0o666)
    try:
        writer = HashingWriter(fd)
        fill(writer)
        writer.flush()
        os.fsync(fd)
    finally:
        os.close(fd)
    return {"sha256": writer.sha256.hexdigest(), "size": writer.size}


def sha256_file(path: Path, chunk: int = 1 << 22) -> tuple[str, int]:
    """Returns the sha256 hex digest and size of a regular file, reading it in chunks."""
    size = os.lstat(path).st_size
    return sha256_regular(path, limit=size, expected=size, chunk=chunk), size


def _start_time(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot), or None where unknown.

    With the pid it names a process uniquely: a pid reused by an unrelated process has
    another start time, so a temporary file is never taken for that process's.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return int(fields[19])  # field 22 of proc(5); fields[0] here is field 3
    except (OSError, IndexError, ValueError):
        return None


@functools.cache
def host_tag() -> str:
    """8 hex digits naming this machine in temporary names (a shared file system is seen
    by processes of several machines; a pid only means something on its own)."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


_prefix: list[str] = []  # this process's temporary-name prefix, once computed


def _forget_prefix() -> None:
    _prefix.clear()  # a forked child has its own pid and start time


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_prefix)


def tmp_name(final_name: str) -> str:
    """A temporary name for ``final_name`` that records the writing process (pid, machine,
    start time), so a leftover can be told from a write under way."""
    if not _prefix:
        pid = os.getpid()
        start = _start_time(pid)
        tag = "" if start is None else f"{host_tag()}.{start}-"
        _prefix.append(f"{TMP_PREFIX}{pid}-{tag}")
    return _prefix[0] + final_name


def replace_file(path: Path, data: bytes, mode: int = 0o644, *, durable: bool = True) -> None:
    """Atomically replaces (or creates) the small file ``path`` with ``data``.

    ``durable=False`` skips the fsyncs: the replacement is still atomic (a kill leaves the
    old file or the new one), but a power loss may bring back the old one (for the
    ``latest`` pointer, which nothing loads by: the newest checkpoint is the highest
    sequence number).
    """
    tmp = path.with_name(tmp_name(path.name))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
                 | getattr(os, "O_BINARY", 0), mode)
    try:
        try:
            _write_all(fd, data)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def publish_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Renames a fully written, fsynced ``tmp_dir`` to ``final_dir`` and makes it durable."""
    fsync_dir(tmp_dir)
    if final_dir.exists():
        raise FileExistsError(f"refusing to overwrite the existing checkpoint {final_dir}")
    os.rename(tmp_dir, final_dir)
    fsync_dir(final_dir.parent)


def remove_dir(path: Path, names: Iterable[str] = ()) -> None:
    """Deletes a checkpoint directory: renamed aside first, so no half-deleted one is ever
    seen under its real name. (Not fsynced: a power loss may bring back an older
    checkpoint whole, or one that loading finds incomplete and skips with a warning.)

    ``names`` are the files it is known to hold (its manifest's): they are unlinked by
    name and the directory removed, a few system calls; anything else in it (or a name
    missing) falls back to removing the whole tree.
    """
    doomed = path.with_name(tmp_name(path.name))
    os.rename(path, doomed)
    try:
        for name in names:
            os.unlink(doomed / name)
        os.rmdir(doomed)
    except OSError:
        shutil.rmtree(doomed, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to someone else
        return True
    return True


def writer_alive(pid: int, host: str | None = None, start: int | None = None) -> bool:
    """Whether the process that wrote a temporary name may still be writing it.

    Args:
      pid: the process id recorded in the name.
      host: its machine's :func:`host_tag`, None for names of older versions.
      start: its start time, None when unknown.

    Returns:
      False for a process that is gone (or whose pid now belongs to another process), or
      for this process itself (whose writes are not under way when leftovers are cleaned);
      True when it is alive or cannot be checked (another machine).
    """
    if host is not None and host != host_tag():
        return True  # a pid of another machine cannot be checked from here: leave it
    if pid == os.getpid():
        return False
    if not _pid_alive(pid):
        return False
    if start is not None:
        now = _start_time(pid)
        if now is not None and now != start:
            return False  # the pid was reused by a process that started later
    return True


def remove_stale_tmp(run_dir: Path) -> list[str]:
    """Removes temporary files and directories left by writers that were killed.

    Entries of processes still alive are left alone; a pid reused by another process is
    recognised by its start time. Returns the names removed.
    """
    removed = []
    for entry in run_dir.iterdir() if run_dir.is_dir() else ():
        match = _TMP_RE.match(entry.name)
        if not match:
            continue
        start = int(match.group(3)) if match.group(3) else None
        if writer_alive(int(match.group(1)), match.group(2), start):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry.name)
    return removed
