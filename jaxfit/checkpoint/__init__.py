"""jaxfit checkpoints: the on-disk format, atomic writes, verified loading, resume checks.

Public entry points:

- :func:`load_trainer` (behind ``Trainer.load``): rebuild a trainer from a run's recipe and
  restore its newest valid checkpoint. Unpickles the recipe: use it on runs you trust.
- :func:`restore`: restore only the msgpack state into a trainer you built. Never unpickles.
- :func:`read_checkpoint`, :func:`list_checkpoints`: inspect checkpoints as plain data.
- :func:`verify_resume`: check that stopping and resuming reproduces an uninterrupted run.
- :class:`RunLock`: the one-writer lock of a run directory (``ModelCheckpoint`` takes it).

The protocol a checkpoint plugin writes with (``ModelCheckpoint`` uses nothing else):
:class:`RunLock`, then :class:`RunWriter` over the directory with the fit's recipe
(:func:`pack_recipe`), then for each save :func:`capture` (the trainer's point, its arrays
copied on the devices) handed to ``RunWriter.save``; :func:`writes_shards` says whether
each process writes its own slices. ``RunWriter.stats`` (:class:`SaveStats`) times the saves.

See docs/checkpoints.md for the layout and the trust model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from jaxfit.checkpoint._errors import CheckpointCorruptError as CheckpointCorruptError
from jaxfit.checkpoint._errors import CheckpointError as CheckpointError
from jaxfit.checkpoint._errors import CheckpointStructureError as CheckpointStructureError
from jaxfit.checkpoint._errors import DataNotSavedError as DataNotSavedError
from jaxfit.checkpoint._errors import RunLockedError as RunLockedError
from jaxfit.checkpoint._errors import UntrustedRecipeError as UntrustedRecipeError
from jaxfit.checkpoint._load import load_trainer as load_trainer
from jaxfit.checkpoint._load import restore as restore
from jaxfit.checkpoint._lock import RunLock as RunLock
from jaxfit.checkpoint._manifest import CheckpointInfo as CheckpointInfo
from jaxfit.checkpoint._manifest import scan as list_checkpoints
from jaxfit.checkpoint._msgpack import decode as decode_state
from jaxfit.checkpoint._msgpack import encode as encode_state
from jaxfit.checkpoint._read import CheckpointWarning as CheckpointWarning
from jaxfit.checkpoint._read import read_checkpoint as read_checkpoint
from jaxfit.checkpoint._recipe import DEFAULT_MAX_DATA_BYTES as DEFAULT_MAX_DATA_BYTES
from jaxfit.checkpoint._recipe import DataNotSaved as DataNotSaved
from jaxfit.checkpoint._recipe import pack_recipe as pack_recipe
from jaxfit.checkpoint._verify import ResumeReport as ResumeReport
from jaxfit.checkpoint._verify import verify_resume as verify_resume
from jaxfit.checkpoint._writer import RunWriter as RunWriter
from jaxfit.checkpoint._writer import SaveStats as SaveStats
from jaxfit.checkpoint._writer import write_checkpoint as write_checkpoint

__all__ = [
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointStructureError",
    "DataNotSavedError",
    "RunLockedError",
    "UntrustedRecipeError",
    "load_trainer",
    "restore",
    "RunLock",
    "CheckpointInfo",
    "list_checkpoints",
    "decode_state",
    "encode_state",
    "CheckpointWarning",
    "read_checkpoint",
    "DataNotSaved",
    "ResumeReport",
    "verify_resume",
    "RunWriter",
    "SaveStats",
    "write_checkpoint",
    "pack_recipe",
    "DEFAULT_MAX_DATA_BYTES",
    "Capture",
    "capture",
    "writes_shards",
]

if TYPE_CHECKING:  # pragma: no cover
    from jaxfit.checkpoint._snapshot import Capture as Capture
    from jaxfit.trainer import Trainer


# jax is imported with these, not with the package: ``python -m jaxfit info`` reads runs
# without it.
def capture(trainer: Trainer, *, sharded: bool = False) -> Capture:
    """A checkpoint of ``trainer`` at its current point, for ``RunWriter.save``: see
    :func:`jaxfit.checkpoint._snapshot.capture`."""
    from jaxfit.checkpoint import _snapshot

    return _snapshot.capture(trainer, sharded=sharded)


def writes_shards(trainer: Trainer) -> bool:
    """Whether ``trainer``'s checkpoints are sharded (each process writes its own slices)."""
    from jaxfit.checkpoint import _snapshot

    return _snapshot.writes_shards(trainer)


def __getattr__(name: str) -> object:
    if name == "Capture":
        from jaxfit.checkpoint._snapshot import Capture

        return Capture
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
