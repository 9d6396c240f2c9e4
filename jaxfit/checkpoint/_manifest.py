"""The layout of a run directory, checkpoint manifests, and their verification.

A run directory::

    runs/cnn/
      latest                        # "ckpt-000003-step300\\n": the newest checkpoint's name
      recipe-1f2e3d4c5b6a7988.pkl   # cloudpickled recipe, one per fit (content-addressed)
      ckpt-000002-step200/
        state.msgpack               # the whole resumable state (msgpack, no pickle)
        manifest.json               # versions, step, epoch, metrics, sha256 of each file
      ckpt-000004-step400/          # a sharded state (see _sharded.py): format version 2
        state.msgpack               # everything but the arrays (step, epoch, callbacks, ...)
        shards-00000-of-00002.msgpack  # the slices process 0 owns
        shards-00001-of-00002.msgpack  # ... process 1
        manifest.json               # as above + per leaf: shape, dtype, saved sharding
      ckpt-000003-step300/
        ...

Checkpoints are numbered by a sequence that grows with every write, so "newest" means
"written last" even when a run is resumed from an older checkpoint and steps repeat.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import re
from pathlib import Path
from typing import Any

from jaxfit.checkpoint._errors import CheckpointCorruptError
from jaxfit.checkpoint._io import read_regular, sha256_regular
from jaxfit.checkpoint._msgpack import DEFAULT_MAX_BYTES

FORMAT = "jaxfit.checkpoint"
# 1: the whole state in state.msgpack. 2: a sharded checkpoint (the arrays in one part file
# per process, see _sharded.py); written only for sharded states, so a replicated run's
# checkpoints stay readable by versions that know 1 only.
FORMAT_VERSION = 2
WHOLE_VERSION = 1
STATE_FILE = "state.msgpack"
MANIFEST_FILE = "manifest.json"
LATEST_FILE = "latest"
MAX_MANIFEST_BYTES = 1 << 20
_NAME_RE = re.compile(r"^ckpt-(\d{6,})-step(\d+)$")


def checkpoint_name(seq: int, step: int) -> str:
    """The directory name of the ``seq``-th checkpoint of a run, taken at ``step``."""
    return f"ckpt-{seq:06d}-step{step}"


def parse_name(name: str) -> tuple[int, int] | None:
    """``(seq, step)`` of a checkpoint directory name, or None for any other name."""
    match = _NAME_RE.match(name)
    return (int(match.group(1)), int(match.group(2))) if match else None


@functools.cache
def library_versions() -> dict[str, str]:
    """Versions recorded in every manifest, to explain a restore that behaves differently."""
    from importlib import metadata

    from jaxfit._version import __version__

    versions = {"jaxfit": __version__, "python": platform.python_version()}
    for dist in ("jax", "jaxlib", "flax", "optax", "numpy", "msgpack"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def _json_number(value: Any) -> Any:
    # JSON has no NaN/inf: keep them readable as strings rather than writing invalid JSON.
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    value = float(value)
    return value if math.isfinite(value) else repr(value)


def build_manifest(*, seq: int, step: int, epoch: int, batch_in_epoch: int, reason: str,
                   metrics: dict[str, Any], monitor: str | None, mode: str | None,
                   files: dict[str, dict], recipe: dict | None, run_id: str | None = None,
                   sharded: dict | None = None) -> dict:
    """The manifest of one checkpoint (see the module docstring for the layout); with
    ``sharded`` (parts, leaves, process count) a format-2 manifest of a sharded checkpoint."""
    extra = {} if sharded is None else {"sharded": sharded}
    return {
        **extra,
        "format": FORMAT,
        "format_version": WHOLE_VERSION if sharded is None else FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seq": seq,
        "step": step,
        "epoch": epoch,
        "batch_in_epoch": batch_in_epoch,
        "reason": reason,
        "metrics": {str(k): _json_number(v) for k, v in metrics.items()},
        "monitor": monitor,
        "mode": mode,
        "versions": library_versions(),
        "files": files,
        "recipe": recipe,
        "run_id": run_id,
    }


def manifest_bytes(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


_REQUIRED = {"format": str, "format_version": int, "seq": int, "step": int, "epoch": int,
             "batch_in_epoch": int, "metrics": dict, "files": dict}
# Fields a reader uses when present (readers such as `info` rely on their types).
_NONE = type(None)
_OPTIONAL = {"monitor": (str, _NONE), "mode": (str, _NONE), "run_id": (str, _NONE),
             "reason": (str, _NONE), "recipe": (dict, str, _NONE), "created": (str, _NONE)}


def read_manifest(ckpt_dir: Path) -> dict:
    """Reads and checks the manifest of one checkpoint directory (not the checksums).

    The file is read only if it is a regular file of at most :data:`MAX_MANIFEST_BYTES`
    (never a link, FIFO or device). When the directory has a checkpoint name, its sequence
    number and step must be the manifest's: a renamed or swapped directory would otherwise
    pass for a newer (or older) checkpoint than it is.

    Raises:
      CheckpointCorruptError: the manifest is missing, too large, not a regular file, not
        JSON, not a jaxfit manifest, lacks a field, was written by a newer format version,
        or does not match the directory's name.
    """
    path = ckpt_dir / MANIFEST_FILE
    try:
        data = read_regular(path, limit=MAX_MANIFEST_BYTES,
                            limit_hint=f"a manifest can be ({MAX_MANIFEST_BYTES} bytes)")
        manifest = json.loads(data)
    except FileNotFoundError:
        raise CheckpointCorruptError(
            f"{path} is missing: the checkpoint was not completely written"
        ) from None
    except NotADirectoryError:
        raise CheckpointCorruptError(f"{ckpt_dir} is not a checkpoint directory") from None
    except (OSError, ValueError, RecursionError) as err:  # ValueError: JSON and Unicode
        raise CheckpointCorruptError(f"{path} is not a readable JSON manifest ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointCorruptError(f"{path} is not a jaxfit checkpoint manifest")
    for key, kind in _REQUIRED.items():
        if not isinstance(manifest.get(key), kind) or isinstance(manifest.get(key), bool):
            raise CheckpointCorruptError(
                f"{path}: field {key!r} is missing or not a {kind.__name__}"
            )
    if manifest["format_version"] > FORMAT_VERSION:
        raise CheckpointCorruptError(
            f"{path}: format version {manifest['format_version']} was written by a newer jaxfit "
            f"(this one reads up to version {FORMAT_VERSION}); upgrade jaxfit to load it"
        )
    if manifest["format_version"] < WHOLE_VERSION:
        raise CheckpointCorruptError(
            f"{path}: format version {manifest['format_version']} is unknown (this jaxfit reads "
            f"versions {WHOLE_VERSION} to {FORMAT_VERSION}); the manifest is damaged")
    for name, entry in manifest["files"].items():
        if Path(name).name != name or name in (".", ".."):
            raise CheckpointCorruptError(f"{path} lists a bad file {name!r}")
        if not (isinstance(entry, dict) and isinstance(entry.get("size"), int)
                and not isinstance(entry.get("size"), bool) and entry["size"] >= 0
                and isinstance(entry.get("sha256"), str)):
            raise CheckpointCorruptError(
                f"{path}: bad entry for {name!r} (expected a size and a sha256)")
    if STATE_FILE not in manifest["files"]:
        raise CheckpointCorruptError(f"{path} lists no {STATE_FILE}")
    if manifest["format_version"] == FORMAT_VERSION:
        from jaxfit.checkpoint._sharded import check_manifest

        check_manifest(manifest, str(path))
    for key, kinds in _OPTIONAL.items():
        if not isinstance(manifest.get(key), kinds):
            raise CheckpointCorruptError(
                f"{path}: field {key!r} is a {type(manifest.get(key)).__name__}, expected "
                f"{' or '.join(k.__name__ for k in kinds)}")
    if manifest.get("mode") not in (None, "min", "max"):
        raise CheckpointCorruptError(f"{path}: field 'mode' is {manifest['mode']!r}, expected "
                                     "'min', 'max' or null")
    if min(manifest["seq"], manifest["step"], manifest["epoch"], manifest["batch_in_epoch"]) < 0:
        raise CheckpointCorruptError(f"{path}: a negative seq, step, epoch or batch_in_epoch")
    named = parse_name(ckpt_dir.name)
    if named is not None and named != (manifest["seq"], manifest["step"]):
        raise CheckpointCorruptError(
            f"{path} describes checkpoint {manifest['seq']} at step {manifest['step']}, but its "
            f"directory is named {ckpt_dir.name!r} (checkpoint {named[0]} at step {named[1]}): "
            "the directory was renamed or swapped with another one. Rename it to "
            f"{checkpoint_name(manifest['seq'], manifest['step'])!r} if that is what it holds"
        )
    return manifest


def verify_files(ckpt_dir: Path, manifest: dict, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
    """Checks every file listed in ``manifest`` exists with the recorded size and sha256.

    Sizes are checked (against the manifest and ``max_bytes``) before a byte is read, and
    only regular files inside the checkpoint are read.

    Raises:
      CheckpointCorruptError: naming the first file that is missing or differs.
    """
    hint = (f"the limit of {max_bytes} bytes (pass a larger max_bytes if the file is trusted "
            "to be this large)")
    for name, expected in manifest["files"].items():
        path = ckpt_dir / name
        if Path(name).name != name:
            raise CheckpointCorruptError(f"{ckpt_dir / MANIFEST_FILE} lists a bad file {name!r}")
        if not isinstance(expected, dict):
            raise CheckpointCorruptError(f"{ckpt_dir / MANIFEST_FILE}: bad entry for {name!r}")
        try:
            digest = sha256_regular(path, limit=max_bytes, expected=expected.get("size"),
                                    limit_hint=hint)
        except FileNotFoundError:
            raise CheckpointCorruptError(f"{path} is missing") from None
        except OSError as err:
            raise CheckpointCorruptError(f"{path} cannot be read ({err})") from None
        if digest != expected.get("sha256"):
            raise CheckpointCorruptError(
                f"{path} fails its sha256 check (modified or corrupted on disk)"
            )


@dataclasses.dataclass
class CheckpointInfo:
    """One checkpoint directory of a run, as found on disk.

    Attributes:
      path: the checkpoint directory.
      seq: its sequence number in the run (higher is newer).
      manifest: the parsed manifest, or None when it could not be read.
      problem: why the checkpoint is not usable, or None when no problem is known.
    """

    path: Path
    seq: int
    manifest: dict | None
    problem: str | None = None

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def step(self) -> int | None:
        return self.manifest["step"] if self.manifest else None

    @property
    def epoch(self) -> int | None:
        return self.manifest["epoch"] if self.manifest else None

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manifest["metrics"] if self.manifest else {}

    def verify(self, max_bytes: int = DEFAULT_MAX_BYTES) -> bool:
        """Checks the checksums; records and returns whether the checkpoint is valid.

        Args:
          max_bytes: a file larger than this counts as invalid, unread (the limit of a load).
        """
        if self.manifest is None:
            return False
        try:
            verify_files(self.path, self.manifest, max_bytes=max_bytes)
        except CheckpointCorruptError as err:
            self.problem = str(err)
            return False
        return True


def scan(run_dir: str | Path) -> list[CheckpointInfo]:
    """The checkpoints of a run directory, oldest first, with their manifests read.

    Checksums are not verified here (call :meth:`CheckpointInfo.verify`).
    """
    run_dir = Path(run_dir)
    found = []
    for entry in run_dir.iterdir():
        parsed = parse_name(entry.name)
        if parsed is None:
            continue
        if entry.is_symlink():
            # A link may lead anywhere (another run, /dev): a checkpoint is what is inside.
            found.append(CheckpointInfo(entry, parsed[0], None,
                                        f"{entry} is a symbolic link, not a checkpoint "
                                        "directory (copy the checkpoint instead of linking it)"))
            continue
        if not entry.is_dir():
            continue
        try:
            found.append(CheckpointInfo(entry, parsed[0], read_manifest(entry)))
        except CheckpointCorruptError as err:
            found.append(CheckpointInfo(entry, parsed[0], None, str(err)))
    return sorted(found, key=lambda info: info.seq)


def is_checkpoint_dir(path: Path) -> bool:
    """Whether ``path`` looks like one checkpoint (as opposed to a run directory)."""
    # lexists: a dangling link named like a checkpoint file still marks a checkpoint.
    return os.path.lexists(path / MANIFEST_FILE) or os.path.lexists(path / STATE_FILE) or (
        parse_name(path.name) is not None)


def read_latest_pointer(run_dir: Path) -> str | None:
    """The checkpoint name recorded in the run's ``latest`` file, if any."""
    try:
        name = read_regular(run_dir / LATEST_FILE, limit=256).decode().strip()
    except (OSError, UnicodeDecodeError, CheckpointCorruptError):
        return None
    return name if parse_name(name) else None
