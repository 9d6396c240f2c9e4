"""Rebuilding a trainer from a run (``Trainer.load``) and the pickle-free restore."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from jaxfit.checkpoint import _manifest, _msgpack
from jaxfit.checkpoint._errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointStructureError,
)
from jaxfit.checkpoint._read import load_newest
from jaxfit.checkpoint._recipe import load_recipe
from jaxfit.errors import ShapeError

if TYPE_CHECKING:  # pragma: no cover
    from jaxfit.callback import Callback
    from jaxfit.trainer import Trainer


# The top-level entries of a trainer's state_dict() that restoring reads, and their types.
_FIELDS: dict[str, tuple[type, ...]] = {
    "format": (int, np.integer, str), "train_state": (dict,), "step": (int, np.integer),
    "epoch": (int, np.integer), "batch_in_epoch": (int, np.integer),
    "seed": (int, np.integer), "input_spec": (dict, type(None)), "history": (dict,)}
_OPTIONAL: dict[str, tuple[type, ...]] = {
    "run_id": (str, type(None)), "stop_reason": (str, type(None)), "callbacks": (dict,),
    "validation_pending": (int, np.integer)}


def _spec_bytes(spec: Any, source: str) -> int:
    """Bytes of the example input an ``input_spec`` describes, checking its structure
    (iteratively: the depth of the input is not trusted).

    Raises:
      CheckpointStructureError: naming ``source`` and the entry of the spec that is wrong.
    """
    def bad(at: str, what: str) -> CheckpointStructureError:
        return CheckpointStructureError(f"{source}: {at} {what}")

    if spec is None:  # batches of other containers: their shapes are in the recipe
        return 0
    total, stack = 0, [(spec, "input_spec")]
    while stack:
        node, at = stack.pop()
        if not isinstance(node, dict):
            raise bad(at, f"is a {type(node).__name__}, expected a dict")
        if "dict" in node:
            if not isinstance(node["dict"], dict):
                raise bad(f"{at}.dict", f"is a {type(node['dict']).__name__}, expected a dict")
            stack.extend((v, f"{at}.{k}") for k, v in node["dict"].items())
            continue
        seq = next((k for k in ("tuple", "list") if k in node), None)
        if seq is not None:
            if not isinstance(node[seq], list):
                raise bad(f"{at}.{seq}", f"is a {type(node[seq]).__name__}, expected a list")
            stack.extend((v, f"{at}[{i}]") for i, v in enumerate(node[seq]))
            continue
        shape, dtype = node.get("shape"), node.get("dtype")
        if not (isinstance(shape, list) and len(shape) <= _msgpack.MAX_NDIM and all(
                isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0
                for d in shape)):
            raise bad(f"{at}.shape", f"is {shape!r}, expected a list of sizes")
        if not isinstance(dtype, str):
            raise bad(f"{at}.dtype", f"is {dtype!r}, expected a dtype name")
        try:
            itemsize = _msgpack.dtype_from_name(dtype).itemsize
        except CheckpointCorruptError as err:
            raise CheckpointStructureError(f"{source}: {at}: {err}") from None
        total += math.prod(int(d) for d in shape) * itemsize
    return total


def _is_sharded_state(value: Any) -> bool:
    """A sharded checkpoint's train state, as its reader returns it. Only reading a sharded
    checkpoint imports ``_sharded`` (and jax): ``python -m jaxfit info`` imports neither."""
    module = sys.modules.get("jaxfit.checkpoint._sharded")
    return module is not None and isinstance(value, module.ShardedState)


def check_state(state: dict, source: str, max_bytes: int) -> None:
    """Checks the entries of a decoded state that restoring reads before any is used.

    Raises:
      CheckpointStructureError: naming ``source`` and the entry that is missing or wrong.
    """
    for fields, required in ((_FIELDS, True), (_OPTIONAL, False)):
        for key, kinds in fields.items():
            if key not in state:
                if required:
                    raise CheckpointStructureError(
                        f"{source}: the state has no entry {key!r}; it is not a jaxfit "
                        "trainer state (or was written by an incompatible version)")
                continue
            value = state[key]
            if key == "train_state" and _is_sharded_state(value):
                continue
            if not isinstance(value, kinds) or isinstance(value, bool):
                raise CheckpointStructureError(
                    f"{source}: the state's {key!r} is a {type(value).__name__}, expected "
                    f"{' or '.join(k.__name__ for k in kinds)}")
            if isinstance(value, (int, np.integer)) and value < 0:
                raise CheckpointStructureError(f"{source}: the state's {key!r} is {value} < 0")
    nbytes = _spec_bytes(state["input_spec"], source)
    if nbytes > max_bytes:
        # Restoring traces the model on this shape (abstractly); a forged one is refused anyway.
        raise CheckpointStructureError(
            f"{source}: input_spec describes an example batch of {nbytes} bytes, more than "
            f"max_bytes={max_bytes}")


def _restore_into(trainer: Trainer, state: dict, ckpt_dir: Path, max_bytes: int) -> None:
    source = str(ckpt_dir / _manifest.STATE_FILE)
    check_state(state, source, max_bytes)
    try:
        trainer.load_state_dict(state)
    except (KeyboardInterrupt, SystemExit, CheckpointError):
        raise
    except Exception as err:  # wrong structure deep inside: a model, optimizer or callback
        # A ShapeError already names the path in the state and both shapes.
        detail = str(err) if isinstance(err, ShapeError) else (
            f"the state does not have the structure this trainer expects "
            f"({type(err).__name__}: {err}); it was written for another model, optimizer or "
            "callbacks, or modified")
        raise CheckpointStructureError(f"{source}: {detail}") from err


def load_trainer(path: str | Path, *, trusted: bool = False,
                 max_bytes: int = _msgpack.DEFAULT_MAX_BYTES, **overrides: Any) -> Trainer:
    """Rebuilds the trainer of a run and restores a checkpoint into it (``Trainer.load``).

    The model, optimizer, loss, metrics, callbacks and fit arguments come from the run's
    pickled recipe; the state comes from the checkpoint's msgpack file, restored into the
    template the recipe builds, so a mismatch names the path and both shapes.

    Loading the recipe unpickles it, which runs code: use this on runs you (or someone you
    trust) wrote. A recipe or run directory owned by another user or writable by others is
    refused unless ``trusted=True``. To restore without unpickling anything, build the
    trainer yourself and use :func:`restore`.

    Args:
      path: a run directory or one checkpoint directory. For a run directory, the newest
        checkpoint that loads is used: one that is corrupt, whose recipe is missing or
        damaged, or whose state does not fit its recipe is skipped with a
        ``CheckpointWarning`` naming it and the problem.
      trusted: skip the ownership and permission checks on the recipe.
      max_bytes: refuse state files larger than this.
      **overrides: Trainer constructor arguments that replace the recipe's, e.g.
        ``mesh=`` (a mesh names this machine's devices, so it is never in a recipe).

    Returns:
      A trainer whose ``fit()`` continues the run exactly where the checkpoint was taken.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      CheckpointCorruptError: the checkpoint (or its recipe) is damaged; the message names
        the file.
      CheckpointStructureError: the state does not fit the model/optimizer of the recipe.
      UntrustedRecipeError: see ``trusted``.
    """
    from jaxfit.trainer import Trainer

    def build(ckpt_dir: Path, manifest: dict, state: dict) -> Trainer:
        run_dir = ckpt_dir.parent
        if not manifest.get("recipe"):
            raise CheckpointCorruptError(
                f"{ckpt_dir} has no recipe to rebuild the trainer from; build the trainer "
                "yourself and restore the state with jaxfit.checkpoint.restore(trainer, path, "
                "model=...)"
            )
        recipe = load_recipe(run_dir, manifest["recipe"], trusted=trusted, max_bytes=max_bytes)
        index = (recipe.get("checkpoint") or {}).get("callback_index")
        try:
            trainer = Trainer.from_recipe(recipe, **overrides)
        except (KeyboardInterrupt, SystemExit, CheckpointError):
            raise
        except Exception as err:
            raise CheckpointError(
                f"{run_dir / manifest['recipe'].get('file')}: the recipe does not build a "
                f"Trainer ({type(err).__name__}: {err})") from err
        if isinstance(index, int) and 0 <= index < len(recipe.get("callbacks") or []):
            # The run may have been moved or loaded from another working directory: keep
            # writing where it was loaded from.
            recipe["callbacks"][index].directory = run_dir
        _restore_into(trainer, state, ckpt_dir, max_bytes)
        return trainer

    return load_newest(path, build, max_bytes=max_bytes)


def restore(trainer: Trainer, path: str | Path, *, model: Any,
            callbacks: list[Callback] | None = None,
            max_bytes: int = _msgpack.DEFAULT_MAX_BYTES, **fit_args: Any) -> Trainer:
    """Restores a checkpoint's msgpack state into a trainer you configured. Never unpickles.

    This is the path for checkpoints from elsewhere (a shared drive, a download): the code
    (trainer arguments, model, callbacks, data) is yours, and only data is read from the
    checkpoint, by a reader that refuses malformed or oversized input, links, FIFOs and
    devices, and a state of the wrong structure (a ``CheckpointStructureError`` naming the
    file and the entry).

    Args:
      trainer: a ``Trainer`` built with the run's optimizer, loss, metrics and seed. It is
        used as a template and left unchanged.
      path: a run directory (its newest checkpoint that fits; others are skipped with a
        ``CheckpointWarning``) or one checkpoint directory.
      model: the model the run trained.
      callbacks: the run's callbacks; their saved states are restored by ``state_key``.
      max_bytes: refuse state files larger than this.
      **fit_args: the fit arguments ``fit()`` should continue with (``data``,
        ``validation_data``, ``epochs``, ``batch_size``, ...).

    Returns:
      A new trainer configured like ``trainer``, holding the checkpoint's state;
      ``.fit()`` continues the run.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      CheckpointCorruptError: the checkpoint is damaged; the message names the file.
      CheckpointStructureError: the state does not fit ``trainer`` and ``model``.

    Example:
      >>> trainer = restore(Trainer(optimizer=opt, loss="softmax_cross_entropy"),  # doctest: +SKIP
      ...                   "runs/cnn", model=CNN(), data=(x, y), epochs=10, batch_size=256)
      >>> trainer.fit()  # doctest: +SKIP
    """
    template = trainer.recipe()
    template.update(model=model, fit=dict(fit_args))

    def build(ckpt_dir: Path, manifest: dict, state: dict) -> Trainer:
        # A fresh trainer (and callback list) per attempt: a failed one may be half-restored.
        recipe = dict(template, callbacks=list(callbacks or []))
        restored = type(trainer).from_recipe(recipe, mesh=trainer.mesh)
        _restore_into(restored, state, ckpt_dir, max_bytes)
        return restored

    return load_newest(path, build, max_bytes=max_bytes)
