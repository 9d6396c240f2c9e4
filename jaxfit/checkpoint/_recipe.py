"""The recipe: the code-like part of a run (model, loss, metrics, optimizer, callbacks, fit
arguments), stored with cloudpickle once per fit next to the run's checkpoints.

Unpickling runs code, so loading a recipe is a trust decision. :func:`load_recipe` refuses a
recipe file, or a run directory, that is not owned by the current user or that other users
can write, unless the caller passes ``trusted=True``; the msgpack state never needs that
trust (see :func:`jaxfit.checkpoint.restore`).

Data. The training and validation data are part of the fit arguments. They are stored with
the recipe when cloudpickle can serialize them into at most ``max_data_bytes`` (in-memory
arrays, dicts of arrays, small picklable datasets). Otherwise (too large, or a generator, a
stream, an open file: anything cloudpickle refuses) the recipe keeps a :class:`DataNotSaved`
marker saying why, and ``Trainer.load(run).fit()`` asks for the data again with
``fit(data)``. Arrays are sized by ``nbytes`` before pickling, so a huge dataset is never
serialized just to find out it is too large.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np

from jaxfit.checkpoint._errors import (
    CheckpointCorruptError,
    CheckpointError,
    DataNotSavedError,
    UntrustedRecipeError,
)
from jaxfit.checkpoint._io import read_regular, replace_file

DEFAULT_MAX_DATA_BYTES = 256 * 2**20
DATA_KEYS = ("data", "validation_data")


@dataclasses.dataclass(frozen=True)
class DataNotSaved:
    """Stands in the recipe for data that was not stored with it.

    Attributes:
      name: which fit argument it replaces ("data" or "validation_data").
      reason: why it was not stored, for the error message after a load.
    """

    name: str
    reason: str

    def __repr__(self) -> str:
        return f"<{self.name} not saved with the run: {self.reason}>"

    def __iter__(self):
        # fit() looks at the data before any work: this is where a resumed run asks for it.
        raise DataNotSavedError(
            f"the run's {self.name} was not saved with its checkpoints ({self.reason}). "
            f"Pass it again: trainer.fit({self.name}=...)"
        )


def _array_bytes(obj: Any) -> int | None:
    """Total nbytes when ``obj`` is arrays (or tuples/lists/dicts of them), else None."""
    if hasattr(obj, "nbytes") and hasattr(obj, "shape") and hasattr(obj, "dtype"):
        return int(obj.nbytes)
    if isinstance(obj, (tuple, list)):
        sizes = [_array_bytes(x) for x in obj]
    elif isinstance(obj, Mapping):
        sizes = [_array_bytes(x) for x in obj.values()]
    else:
        return None
    return None if any(s is None for s in sizes) else sum(s for s in sizes if s is not None)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def storable_data(name: str, data: Any, max_data_bytes: int) -> Any:
    """``data`` itself when it may go into the recipe, else a :class:`DataNotSaved` marker."""
    if data is None:
        return None
    nbytes = _array_bytes(data)
    if nbytes is not None and nbytes > max_data_bytes:
        return DataNotSaved(name, f"{_mib(nbytes)} of arrays is more than "
                                  f"max_data_bytes={_mib(max_data_bytes)}")
    if nbytes is None:
        try:
            pickled = cloudpickle.dumps(data)
        except Exception as err:  # cloudpickle raises many types for unpicklable objects
            return DataNotSaved(name, f"a {type(data).__name__} cannot be pickled ({err})")
        if len(pickled) > max_data_bytes:
            return DataNotSaved(name, f"it pickles to {_mib(len(pickled))}, more than "
                                      f"max_data_bytes={_mib(max_data_bytes)}")
    return data


def _host_arrays(obj: Any) -> Any:
    # Device arrays pickle through a device round trip; numpy arrays load anywhere.
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a NamedTuple (a graph batch)
        return type(obj)(*(_host_arrays(x) for x in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_host_arrays(x) for x in obj)
    if isinstance(obj, dict):
        return {k: _host_arrays(v) for k, v in obj.items()}
    if hasattr(obj, "__array__") and not isinstance(obj, np.ndarray) and hasattr(obj, "devices"):
        return np.asarray(obj)
    return obj


def pack_recipe(recipe: dict, max_data_bytes: int = DEFAULT_MAX_DATA_BYTES) -> bytes:
    """Cloudpickles a recipe, applying the data policy of this module to its fit arguments.

    ``recipe["fit"]`` (when present) is the dict of fit arguments; its ``data`` and
    ``validation_data`` entries are stored or replaced by :class:`DataNotSaved`.

    Raises:
      TypeError: some other part of the recipe (a callback, the model, a loss) cannot be
        pickled; the message names it.
    """
    recipe = dict(recipe)
    if isinstance(recipe.get("fit"), Mapping):
        fit = dict(recipe["fit"])
        for key in DATA_KEYS:
            if key in fit:
                fit[key] = _host_arrays(storable_data(key, fit[key], max_data_bytes))
        recipe["fit"] = fit
    try:
        return cloudpickle.dumps(recipe)
    except Exception as err:
        culprit = _find_unpicklable(recipe)
        raise TypeError(
            f"the run's recipe cannot be pickled: {culprit} ({type(err).__name__}: {err}). "
            "Everything a Trainer is built and fitted with is stored so that Trainer.load(run)"
            ".fit() needs nothing else; give the object __getstate__/__setstate__ that drop "
            "what cannot be pickled (locks, threads, open files, consoles)"
        ) from err


def _find_unpicklable(obj: Any, path: str = "recipe", depth: int = 0) -> str:
    children: list[tuple[str, Any]] = []
    if isinstance(obj, Mapping):
        children = [(f"{path}[{k!r}]", v) for k, v in obj.items()]
    elif isinstance(obj, (list, tuple)):
        children = [(f"{path}[{i}]", v) for i, v in enumerate(obj)]
    for child_path, child in children:
        try:
            cloudpickle.dumps(child)
        except Exception:
            if depth < 6:
                return _find_unpicklable(child, child_path, depth + 1)
            return f"{child_path} ({type(child).__name__})"
    return f"{path} ({type(obj).__name__})"


def recipe_file(ref: object) -> str | None:
    """The file a manifest's recipe entry ``{"file": ...}`` names, when it is a recipe of the
    run directory itself (a plain ``recipe-...`` name, no path); else None."""
    name = ref.get("file") if isinstance(ref, dict) else None
    if isinstance(name, str) and Path(name).name == name and name.startswith("recipe-"):
        return name
    return None


def write_recipe(run_dir: Path, payload: bytes) -> dict:
    """Stores a packed recipe in the run directory under a content-derived name.

    Returns:
      ``{"file": name, "sha256": hex}``, recorded in each checkpoint's manifest.
    """
    digest = hashlib.sha256(payload).hexdigest()
    name = f"recipe-{digest[:16]}.pkl"
    path = run_dir / name
    if not path.exists():
        # Owner-only permissions: the file is code that a later load will run.
        replace_file(path, payload, mode=0o600)
    # "size" (added later; older manifests lack it) bounds the read before a byte is read.
    return {"file": name, "sha256": digest, "size": len(payload)}


def _own_group(gid: int) -> bool:
    """Whether group ``gid`` is the current user's own: their primary group, named like them,
    with no other members (the "user private group" that a umask of 002 is meant for)."""
    if gid != os.getgid():
        return False
    try:
        import grp
        import pwd

        user = pwd.getpwuid(os.getuid()).pw_name
        group = grp.getgrgid(gid)
    except (ImportError, KeyError):
        return False
    return group.gr_name == user and set(group.gr_mem) <= {user}


def check_trusted(path: Path) -> None:
    """Raises :class:`UntrustedRecipeError` unless ``path`` and its directory are the current
    user's: owned by them (or root) and writable by nobody else.

    Writable by the group counts as the user's when the group is their own private group
    (their primary group, named after them, with no other members), as with a umask of 002.
    """
    if not hasattr(os, "getuid"):  # Windows: no POSIX ownership to check
        return
    for target in (path, path.parent):
        info = target.stat()
        owners = {os.getuid(), 0}
        if info.st_uid not in owners:
            raise UntrustedRecipeError(
                f"{target} is owned by uid {info.st_uid}, not by you (uid {os.getuid()}). "
                "Loading the recipe unpickles it, which runs code. If you trust the run, "
                "pass trusted=True; otherwise build the Trainer yourself and restore only the "
                "msgpack state with jaxfit.checkpoint.restore(trainer, path)"
            )
        others = bool(info.st_mode & stat.S_IWOTH) or (
            bool(info.st_mode & stat.S_IWGRP) and not _own_group(info.st_gid))
        if others:
            raise UntrustedRecipeError(
                f"{target} can be written by other users (mode {stat.filemode(info.st_mode)}, "
                f"group {info.st_gid}), so its recipe may have been replaced. Loading the "
                "recipe unpickles it, which runs code. Fix the permissions (chmod go-w), pass "
                "trusted=True if you trust it, or restore only the msgpack state with "
                "jaxfit.checkpoint.restore(trainer, path). (Group-writable is fine when the "
                "group is your own private group, as with umask 002.)"
            )


def load_recipe(run_dir: Path, ref: dict, *, trusted: bool = False,
                max_bytes: int = 64 * 2**30) -> dict:
    """Verifies and unpickles the recipe a checkpoint's manifest refers to.

    Only a regular file in ``run_dir`` is read (no link, FIFO or device), and only when its
    size is the one recorded (when recorded) and at most ``max_bytes``.

    Raises:
      CheckpointCorruptError: the recipe file is missing, not a regular file, of the wrong
        size, fails its checksum, or the manifest's reference to it is malformed.
      UntrustedRecipeError: ownership/permissions checks failed and ``trusted`` is False.
    """
    name = recipe_file(ref)
    if name is None or not isinstance(ref.get("sha256"), str):
        raise CheckpointCorruptError(f"the manifest's recipe entry {ref!r} is malformed")
    size = ref.get("size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool)):
        raise CheckpointCorruptError(f"the manifest's recipe entry {ref!r} is malformed")
    path = run_dir / name
    try:
        payload = read_regular(path, limit=max_bytes, expected=size,
                               limit_hint=f"max_bytes={max_bytes}")
    except FileNotFoundError:
        raise CheckpointCorruptError(
            f"{path} is missing: the run's recipe was deleted or the checkpoint was copied "
            "without it; restore the state into a Trainer you build with "
            "jaxfit.checkpoint.restore(trainer, path)"
        ) from None
    if hashlib.sha256(payload).hexdigest() != ref.get("sha256"):
        raise CheckpointCorruptError(f"{path} fails its sha256 check (modified or corrupted)")
    if not trusted:
        check_trusted(path)
    try:
        recipe = cloudpickle.loads(payload)
    except Exception as err:  # unpickling can raise anything the pickled code raises
        raise CheckpointError(
            f"{path}: the recipe refers to code that cannot be loaded here "
            f"({type(err).__name__}: {err}). Load the run where the modules that define its "
            "model, loss and callbacks can be imported (functions and classes from importable "
            "modules are stored by name), or build the trainer yourself and restore the state "
            "with jaxfit.checkpoint.restore(trainer, path, model=...)"
        ) from err
    if not isinstance(recipe, dict):
        raise CheckpointCorruptError(f"{path} does not hold a jaxfit recipe")
    return recipe
