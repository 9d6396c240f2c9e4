"""jaxfit checkpoints: the on-disk format, atomic writes, verified loading, resume checks.

Public entry points:

- :func:`load_trainer` (behind ``Trainer.load``): rebuild a trainer from a run's recipe and
  restore its newest valid checkpoint. Unpickles the recipe: use it on runs you trust.
- :func:`restore`: restore only the msgpack state into a trainer you built. Never unpickles.
- :func:`read_checkpoint`, :func:`list_checkpoints`: inspect checkpoints as plain data.
- :func:`verify_resume`: check that stopping and resuming reproduces an uninterrupted run.
- :class:`RunLock`: the one-writer lock of a run directory (``ModelCheckpoint`` takes it).

See docs/checkpoints.md for the layout and the trust model.
"""

from jaxfit.checkpoint._errors import CheckpointCorruptError as CheckpointCorruptError
from jaxfit.checkpoint._errors import CheckpointError as CheckpointError
from jaxfit.checkpoint._errors import CheckpointStructureError as CheckpointStructureError
from jaxfit.checkpoint._errors import DataNotSavedError as DataNotSavedError
from jaxfit.checkpoint._errors import RunLockedError as RunLockedError
from jaxfit.checkpoint._errors import UntrustedRecipeError as UntrustedRecipeError
from jaxfit.checkpoint._manifest import CheckpointInfo as CheckpointInfo
from jaxfit.checkpoint._manifest import scan as list_checkpoints
from jaxfit.checkpoint._msgpack import decode as decode_state
from jaxfit.checkpoint._msgpack import encode as encode_state
from jaxfit.checkpoint._read import CheckpointWarning as CheckpointWarning
from jaxfit.checkpoint._read import read_checkpoint as read_checkpoint
from jaxfit.checkpoint._recipe import DataNotSaved as DataNotSaved
from jaxfit.checkpoint._lock import RunLock as RunLock
from jaxfit.checkpoint._writer import RunWriter as RunWriter
from jaxfit.checkpoint._writer import write_checkpoint as write_checkpoint
from jaxfit.checkpoint._load import load_trainer as load_trainer
from jaxfit.checkpoint._load import restore as restore
from jaxfit.checkpoint._verify import ResumeReport as ResumeReport
from jaxfit.checkpoint._verify import verify_resume as verify_resume
