"""Atomic, durable file-system operations.

A checkpoint is written into a temporary directory next to its final place, every file and
the directory are fsynced, and one ``rename`` puts it in place: a kill at any instant leaves
either no checkpoint or a complete one, and never touches an earlier one. Small files (the
``latest`` pointer, the recipe) are replaced the same way, through a temporary file and
``os.replace``.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

TMP_PREFIX = ".tmp-"
_TMP_RE = re.compile(r"^\.tmp-(\d+)-")


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


class HashingWriter:
    """A write-only file wrapper that counts and sha256-hashes what goes through it."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | memoryview) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self._raw.write(data)


def write_file(path: Path, fill: Callable[[HashingWriter], None]) -> dict:
    """Creates ``path`` (which must not exist), lets ``fill`` write into it, fsyncs it.

    Returns:
      ``{"sha256": hex digest, "size": bytes}`` of what was written.
    """
    with open(path, "xb") as raw:
        writer = HashingWriter(raw)
        fill(writer)
        raw.flush()
        os.fsync(raw.fileno())
    return {"sha256": writer.sha256.hexdigest(), "size": writer.size}


def sha256_file(path: Path, chunk: int = 1 << 22) -> tuple[str, int]:
    """Returns the sha256 hex digest and size of a file, reading it in chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def tmp_name(final_name: str) -> str:
    """A temporary name for ``final_name`` that records the writing process id."""
    return f"{TMP_PREFIX}{os.getpid()}-{final_name}"


def replace_file(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Atomically replaces (or creates) the small file ``path`` with ``data``."""
    tmp = path.with_name(tmp_name(path.name))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def publish_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Renames a fully written, fsynced ``tmp_dir`` to ``final_dir`` and makes it durable."""
    fsync_dir(tmp_dir)
    if final_dir.exists():
        raise FileExistsError(f"refusing to overwrite the existing checkpoint {final_dir}")
    os.rename(tmp_dir, final_dir)
    fsync_dir(final_dir.parent)


def remove_dir(path: Path) -> None:
    """Deletes a checkpoint directory: renamed aside first, so no half-deleted one is ever
    seen under its real name."""
    doomed = path.with_name(tmp_name(path.name))
    os.rename(path, doomed)
    fsync_dir(path.parent)
    shutil.rmtree(doomed, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a leftover of ours is never under way when this is called
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to someone else
        return True
    return True


def remove_stale_tmp(run_dir: Path) -> list[str]:
    """Removes temporary files and directories left by writers that were killed.

    Entries of processes still alive are left alone. Returns the names removed.
    """
    removed = []
    for entry in run_dir.iterdir() if run_dir.is_dir() else ():
        match = _TMP_RE.match(entry.name)
        if not match or _pid_alive(int(match.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry.name)
    return removed
