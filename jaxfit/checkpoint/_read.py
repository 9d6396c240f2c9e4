"""Finding, verifying and reading checkpoints (nothing here unpickles)."""

from __future__ import annotations

import warnings
from pathlib import Path

from jaxfit.checkpoint import _manifest, _msgpack
from jaxfit.checkpoint._errors import CheckpointCorruptError, CheckpointError


class CheckpointWarning(UserWarning):
    """A checkpoint of a run was skipped because it is corrupt or incomplete."""


def _read_one(ckpt_dir: Path, max_bytes: int) -> tuple[dict, dict]:
    manifest = _manifest.read_manifest(ckpt_dir)
    _manifest.verify_files(ckpt_dir, manifest)
    state_path = ckpt_dir / _manifest.STATE_FILE
    if state_path.stat().st_size > max_bytes:
        raise CheckpointCorruptError(
            f"{state_path}: {state_path.stat().st_size} bytes is more than the limit of "
            f"{max_bytes} bytes (pass a larger max_bytes if the file is trusted to be this large)"
        )
    state = _msgpack.decode(state_path.read_bytes(), max_bytes=max_bytes, source=str(state_path))
    return manifest, state


def read_checkpoint(path: str | Path, *,
                    max_bytes: int = _msgpack.DEFAULT_MAX_BYTES) -> tuple[Path, dict, dict]:
    """Reads a verified checkpoint: one checkpoint directory, or a run's newest valid one.

    Nothing is unpickled. For a run directory, checkpoints are tried from the newest; a corrupt
    or partial one is skipped with a :class:`CheckpointWarning` naming it.

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
        manifest, state = _read_one(path, max_bytes)
        return path, manifest, state
    infos = _manifest.scan(path)
    problems = []
    for info in reversed(infos):
        try:
            manifest, state = _read_one(info.path, max_bytes)
        except CheckpointCorruptError as err:
            problems.append(f"{info.name}: {err}")
            warnings.warn(f"skipping checkpoint {info.name}: {err}", CheckpointWarning,
                          stacklevel=2)
            continue
        return info.path, manifest, state
    if not infos:
        raise CheckpointError(
            f"{path} holds no checkpoints (expected directories named like "
            f"{_manifest.checkpoint_name(1, 100)!r} written by ModelCheckpoint)"
        )
    raise CheckpointError(f"no valid checkpoint in {path}:\n  " + "\n  ".join(problems))
