"""Exceptions raised by the checkpoint layer."""

from __future__ import annotations

from jaxfit.errors import JaxfitError


class CheckpointError(JaxfitError):
    """Base class of every error about reading or writing a checkpoint."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint file is missing, truncated, malformed or fails its checksum."""


class CheckpointStructureError(CheckpointError, ValueError):
    """The saved state does not fit the trainer it is restored into.

    The message names the path inside the state and both shapes (or both key sets).
    """


class UntrustedRecipeError(CheckpointError, PermissionError):
    """The pickled recipe of a run may have been written by someone else.

    Unpickling runs code. A recipe is refused when it (or its run directory) is not owned by
    the current user or is writable by other users, unless the caller passes ``trusted=True``.
    """


class DataNotSavedError(CheckpointError):
    """The run's training data was not stored with the recipe, so it must be passed again."""


class RunLockedError(CheckpointError):
    """Another writer holds the run directory: one run directory has one writer at a time.

    Raised when a fit starts, before any work. The message names the holder's pid and host.
    """
