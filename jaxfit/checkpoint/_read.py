"""Finding, verifying and reading checkpoints (nothing here unpickles).

A run directory is read newest checkpoint first; one that is corrupt, incomplete, or (for
the callers that restore it) does not fit, is skipped with a :class:`CheckpointWarning`
naming it and the problem, and the next older one is tried. Readers take no lock: each
checkpoint appears by one atomic rename, so a reader sees it whole or not at all; one that
a writer's retention deletes while it is read is simply looked for again.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from jaxfit.checkpoint import _io, _manifest, _msgpack
from jaxfit.checkpoint._errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointStructureError,
)

T = TypeVar("T")
_RESCANS = 5  # a run being written may lose checkpoints to retention while it is read


class CheckpointWarning(UserWarning):
    """A checkpoint of a run was skipped because it is corrupt, incomplete or does not fit."""


def read_one(ckpt_dir: Path, max_bytes: int) -> tuple[dict, dict]:
    """Reads one checkpoint directory: its manifest, verified files and decoded state.

    The state file is opened only if it is a regular file whose size is the manifest's and
    at most ``max_bytes``; it is read once, hashed and decoded from that one copy.

    Raises:
      CheckpointCorruptError: naming the file and what is wrong with it.
    """
    manifest = _manifest.read_manifest(ckpt_dir)
    parts = manifest.get("sharded", {}).get("parts", []) \
        if manifest["format_version"] == _manifest.FORMAT_VERSION else []
    others = {k: v for k, v in manifest["files"].items()
              if k != _manifest.STATE_FILE and k not in parts}
    _manifest.verify_files(ckpt_dir, {"files": others}, max_bytes=max_bytes)
    state = decode_file(ckpt_dir / _manifest.STATE_FILE, manifest["files"][_manifest.STATE_FILE],
                        max_bytes)
    if parts:  # the arrays are in the part files: verified and decoded, placed on restore
        from jaxfit.checkpoint._sharded import read_parts

        state["train_state"] = read_parts(ckpt_dir, manifest, max_bytes)
    return manifest, state


def decode_file(path: Path, expected: dict, max_bytes: int) -> dict:
    """The decoded msgpack of one file a manifest lists, read once only if it is a regular
    file of the ``expected`` size (and at most ``max_bytes``), hashed and decoded from that
    one copy.

    Raises:
      CheckpointCorruptError: the file is missing, of the wrong size, fails its sha256 or
        is malformed.
    """
    hint = (f"the limit of {max_bytes} bytes (pass a larger max_bytes if the file is "
            "trusted to be this large)")
    try:
        data = _io.read_regular(path, limit=max_bytes, expected=expected["size"],
                                limit_hint=hint)
    except FileNotFoundError:
        raise CheckpointCorruptError(f"{path} is missing") from None
    if hashlib.sha256(data).hexdigest() != expected["sha256"]:
        raise CheckpointCorruptError(
            f"{path} fails its sha256 check (modified or corrupted on disk)")
    return _msgpack.decode(data, max_bytes=max_bytes, source=str(path))


def _no_checkpoint(path: Path, problems: list[str], structure: bool) -> CheckpointError:
    if structure:
        return CheckpointStructureError(
            f"no checkpoint in {path} fits (newest first):\n  " + "\n  ".join(problems))
    return CheckpointError(f"no valid checkpoint in {path}:\n  " + "\n  ".join(problems))


def load_newest(path: str | Path, use: Callable[[Path, dict, dict], T], *,
                max_bytes: int = _msgpack.DEFAULT_MAX_BYTES) -> T:
    """``use(checkpoint directory, manifest, state)`` on a checkpoint, or a run's newest one
    for which it succeeds.

    For a run directory, checkpoints are tried newest first. One that is corrupt (any
    :class:`CheckpointCorruptError`, from reading it or from ``use``) or whose state does
    not fit (:class:`CheckpointStructureError` from ``use``) is skipped, and once one
    succeeds each skipped one is reported with a :class:`CheckpointWarning`. Other errors of
    ``use`` (an untrusted recipe, code that cannot be imported) are raised at once.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      CheckpointCorruptError, CheckpointStructureError: ``path`` is one checkpoint and it
        is corrupt or does not fit.
      CheckpointStructureError: no checkpoint of the run fits, some because of their
        structure (the message lists every checkpoint and its problem).
      CheckpointError: the run directory holds no valid checkpoint.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint or run directory at {path}")
    if path.is_file() and path.name in (_manifest.STATE_FILE, _manifest.MANIFEST_FILE):
        path = path.parent  # a file of a checkpoint stands for the checkpoint
    if not path.is_dir():
        raise CheckpointError(
            f"{path} is a file; pass a run directory or a checkpoint directory "
            f"(one holding {_manifest.MANIFEST_FILE} and {_manifest.STATE_FILE})"
        )
    if _manifest.is_checkpoint_dir(path):
        manifest, state = read_one(path, max_bytes)
        return use(path, manifest, state)
    for _ in range(_RESCANS):
        infos = _manifest.scan(path)
        if not infos:
            raise CheckpointError(
                f"{path} holds no checkpoints (expected directories named like "
                f"{_manifest.checkpoint_name(1, 100)!r} written by ModelCheckpoint)"
            )
        problems: list[tuple[str, str]] = []
        structure, vanished = False, False
        for info in reversed(infos):
            try:
                if info.problem is not None:
                    raise CheckpointCorruptError(info.problem)
                manifest, state = read_one(info.path, max_bytes)
                result = use(info.path, manifest, state)
            except (CheckpointCorruptError, CheckpointStructureError) as err:
                if not info.path.exists():
                    vanished = True  # deleted by a writer's retention: look again
                    break
                structure |= isinstance(err, CheckpointStructureError)
                problems.append((info.name, str(err)))
                continue
            for name, problem in problems:
                warnings.warn(f"skipping checkpoint {name}: {problem}", CheckpointWarning,
                              stacklevel=3)
            return result
        if not vanished:
            raise _no_checkpoint(path, [f"{n}: {p}" for n, p in problems], structure)
    raise CheckpointError(
        f"{path} kept changing while it was read (checkpoints deleted by a writer each time); "
        "try again when its fit has ended"
    )


def read_checkpoint(path: str | Path, *,
                    max_bytes: int = _msgpack.DEFAULT_MAX_BYTES) -> tuple[Path, dict, dict]:
    """Reads a verified checkpoint: one checkpoint directory, or a run's newest valid one.

    Nothing is unpickled. Only regular files inside the checkpoint are read (no links,
    FIFOs or devices), and their sizes are checked against the manifest and ``max_bytes``
    before a byte is read. For a run directory, checkpoints are tried from the newest; a
    corrupt or partial one is skipped with a :class:`CheckpointWarning` naming it.

    Args:
      path: a run directory or one checkpoint directory.
      max_bytes: refuse state files larger than this.

    Returns:
      ``(checkpoint directory, manifest, state)``.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      CheckpointCorruptError: ``path`` is one checkpoint and it is corrupt (the message names
        the file and the problem).
      CheckpointError: ``path`` is a run directory without any valid checkpoint.
    """
    return load_newest(path, lambda d, m, s: (d, m, s), max_bytes=max_bytes)
