"""The layout of a run directory, checkpoint manifests, and their verification.

A run directory::

    runs/cnn/
      latest                        # "ckpt-000003-step300\\n": the newest checkpoint's name
      recipe-1f2e3d4c5b6a7988.pkl   # cloudpickled recipe, one per fit (content-addressed)
      ckpt-000002-step200/
        state.msgpack               # the whole resumable state (msgpack, no pickle)
        manifest.json               # versions, step, epoch, metrics, sha256 of each file
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
import platform
import re
from pathlib import Path
from typing import Any

from jaxfit.checkpoint._errors import CheckpointCorruptError
from jaxfit.checkpoint._io import sha256_file

FORMAT = "jaxfit.checkpoint"
FORMAT_VERSION = 1
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
                   files: dict[str, dict], recipe: dict | None, run_id: str | None = None) -> dict:
    """The manifest of one checkpoint (see the module docstring for the layout)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
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


def read_manifest(ckpt_dir: Path) -> dict:
    """Reads and checks the manifest of one checkpoint directory (not the checksums).

    Raises:
      CheckpointCorruptError: the manifest is missing, too large, not JSON, not a jaxfit
        manifest, lacks a field, or was written by a newer format version.
    """
    path = ckpt_dir / MANIFEST_FILE
    try:
        size = path.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise CheckpointCorruptError(f"{path}: {size} bytes, more than a manifest can be")
        manifest = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise CheckpointCorruptError(
            f"{path} is missing: the checkpoint was not completely written"
        ) from None
    except (OSError, ValueError) as err:  # ValueError covers JSON and Unicode errors
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
    if STATE_FILE not in manifest["files"]:
        raise CheckpointCorruptError(f"{path} lists no {STATE_FILE}")
    return manifest


def verify_files(ckpt_dir: Path, manifest: dict) -> None:
    """Checks every file listed in ``manifest`` exists with the recorded size and sha256.

    Raises:
      CheckpointCorruptError: naming the first file that is missing or differs.
    """
    for name, expected in manifest["files"].items():
        path = ckpt_dir / name
        if Path(name).name != name:
            raise CheckpointCorruptError(f"{ckpt_dir / MANIFEST_FILE} lists a bad file {name!r}")
        try:
            digest, size = sha256_file(path)
        except FileNotFoundError:
            raise CheckpointCorruptError(f"{path} is missing") from None
        except OSError as err:
            raise CheckpointCorruptError(f"{path} cannot be read ({err})") from None
        if not isinstance(expected, dict):
            raise CheckpointCorruptError(f"{ckpt_dir / MANIFEST_FILE}: bad entry for {name!r}")
        if size != expected.get("size"):
            raise CheckpointCorruptError(
                f"{path} has {size} bytes, the manifest recorded {expected.get('size')} "
                "(truncated or modified)"
            )
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

    def verify(self) -> bool:
        """Checks the checksums; records and returns whether the checkpoint is valid."""
        if self.manifest is None:
            return False
        try:
            verify_files(self.path, self.manifest)
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
        if parsed is None or not entry.is_dir():
            continue
        try:
            found.append(CheckpointInfo(entry, parsed[0], read_manifest(entry)))
        except CheckpointCorruptError as err:
            found.append(CheckpointInfo(entry, parsed[0], None, str(err)))
    return sorted(found, key=lambda info: info.seq)


def is_checkpoint_dir(path: Path) -> bool:
    """Whether ``path`` looks like one checkpoint (as opposed to a run directory)."""
    return (path / MANIFEST_FILE).exists() or (path / STATE_FILE).exists() or (
        parse_name(path.name) is not None)


def read_latest_pointer(run_dir: Path) -> str | None:
    """The checkpoint name recorded in the run's ``latest`` file, if any."""
    try:
        name = (run_dir / LATEST_FILE).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return name if parse_name(name) else None
