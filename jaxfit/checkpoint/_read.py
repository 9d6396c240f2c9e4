"""Finding, verifying and reading checkpoints, and checking a state against a template."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from jaxfit.checkpoint import _manifest, _msgpack
from jaxfit.checkpoint._errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointStructureError,
)


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


def _describe(value: Any) -> str:
    if isinstance(value, (np.ndarray, np.generic)):
        return f"shape {tuple(np.shape(value))} {np.asarray(value).dtype}"
    if isinstance(value, dict):
        return f"dict with keys {sorted(value)}"
    if isinstance(value, list):
        return f"list of length {len(value)}"
    return type(value).__name__


def structure_problems(template: Any, state: Any, path: str = "",
                       limit: int = 20) -> list[str]:
    """Every place where ``state`` does not fit ``template``, as readable lines.

    Dicts must have the same keys, lists the same length, arrays the same shape and dtype.
    Python scalars in the template accept any scalar.
    """
    problems: list[str] = []
    stack = [(template, state, path)]
    while stack and len(problems) < limit:
        want, got, where = stack.pop()
        label = where or "<root>"
        if isinstance(want, dict):
            if not isinstance(got, dict):
                problems.append(f"{label}: the trainer expects {_describe(want)}, "
                                f"the checkpoint has {_describe(got)}")
                continue
            missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
            if missing or extra:
                problems.append(f"{label}: keys missing from the checkpoint {missing}, "
                                f"keys the trainer does not have {extra}")
            for key in sorted(set(want) & set(got), reverse=True):
                stack.append((want[key], got[key], f"{where}/{key}" if where else key))
        elif isinstance(want, (list, tuple)):
            if not isinstance(got, (list, tuple)) or len(got) != len(want):
                problems.append(f"{label}: the trainer expects {_describe(list(want))}, "
                                f"the checkpoint has {_describe(got)}")
                continue
            for i in reversed(range(len(want))):
                stack.append((want[i], got[i], f"{where}/{i}" if where else str(i)))
        elif isinstance(want, (np.ndarray, np.generic)) or hasattr(want, "__array__"):
            want_arr = np.asarray(want)
            if not isinstance(got, (np.ndarray, np.generic, int, float, bool)):
                problems.append(f"{label}: the trainer expects an array of "
                                f"{_describe(want_arr)}, the checkpoint has {_describe(got)}")
                continue
            got_arr = np.asarray(got)
            if got_arr.shape != want_arr.shape or got_arr.dtype != want_arr.dtype:
                problems.append(f"{label}: the checkpoint has {_describe(got_arr)}, "
                                f"the trainer expects {_describe(want_arr)}")
    return problems


def check_structure(template: Any, state: Any, *, source: str = "checkpoint") -> None:
    """Raises :class:`CheckpointStructureError` listing where ``state`` differs from
    ``template`` (path inside the state, and both shapes or key sets)."""
    problems = structure_problems(template, state)
    if problems:
        raise CheckpointStructureError(
            f"{source} does not fit this trainer (was it written for a different model or "
            "optimizer?):\n  " + "\n  ".join(problems)
        )
