"""Rebuilding a trainer from a run (``Trainer.load``) and the pickle-free restore."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from jaxfit.checkpoint import _manifest, _msgpack
from jaxfit.checkpoint._errors import CheckpointError, CheckpointStructureError
from jaxfit.checkpoint._read import read_checkpoint
from jaxfit.checkpoint._recipe import load_recipe
from jaxfit.errors import ShapeError

if TYPE_CHECKING:  # pragma: no cover
    from jaxfit.callback import Callback
    from jaxfit.trainer import Trainer


def _restore_into(trainer: Trainer, state: dict, ckpt_dir: Path) -> None:
    try:
        trainer.load_state_dict(state)
    except ShapeError as err:
        raise CheckpointStructureError(f"{ckpt_dir / _manifest.STATE_FILE}: {err}") from err


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
      path: a run directory (its newest checkpoint that verifies is used; corrupt ones are
        skipped with a warning naming them) or one checkpoint directory.
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

    ckpt_dir, manifest, state = read_checkpoint(path, max_bytes=max_bytes)
    run_dir = ckpt_dir.parent
    if not manifest.get("recipe"):
        raise CheckpointError(
            f"{ckpt_dir} has no recipe to rebuild the trainer from; build the trainer yourself "
            "and restore the state with jaxfit.checkpoint.restore(trainer, path, model=...)"
        )
    recipe = load_recipe(run_dir, manifest["recipe"], trusted=trusted)
    index = (recipe.get("checkpoint") or {}).get("callback_index")
    trainer = Trainer.from_recipe(recipe, **overrides)
    if index is not None:
        # The run may have been moved or loaded from another working directory: keep
        # writing where it was loaded from.
        recipe["callbacks"][index].directory = run_dir
    _restore_into(trainer, state, ckpt_dir)
    return trainer


def restore(trainer: Trainer, path: str | Path, *, model: Any,
            callbacks: list[Callback] | None = None,
            max_bytes: int = _msgpack.DEFAULT_MAX_BYTES, **fit_args: Any) -> Trainer:
    """Restores a checkpoint's msgpack state into a trainer you configured. Never unpickles.

    This is the path for checkpoints from elsewhere (a shared drive, a download): the code
    (trainer arguments, model, callbacks, data) is yours, and only data is read from the
    checkpoint, by a reader that refuses malformed or oversized input.

    Args:
      trainer: a ``Trainer`` built with the run's optimizer, loss, metrics and seed. It is
        used as a template and left unchanged.
      path: a run directory (newest valid checkpoint) or one checkpoint directory.
      model: the model the run trained.
      callbacks: the run's callbacks; their saved states are restored by ``state_key``.
      max_bytes: refuse state files larger than this.
      **fit_args: the fit arguments ``fit()`` should continue with (``data``,
        ``validation_data``, ``epochs``, ``batch_size``, ...).

    Returns:
      A new trainer configured like ``trainer``, holding the checkpoint's state;
      ``.fit()`` continues the run.

    Example:
      >>> trainer = restore(Trainer(optimizer=opt, loss="softmax_cross_entropy"),  # doctest: +SKIP
      ...                   "runs/cnn", model=CNN(), data=(x, y), epochs=10, batch_size=256)
      >>> trainer.fit()  # doctest: +SKIP
    """
    ckpt_dir, _, state = read_checkpoint(path, max_bytes=max_bytes)
    recipe = trainer.recipe()
    recipe.update(model=model, callbacks=list(callbacks or []), fit=dict(fit_args))
    restored = type(trainer).from_recipe(recipe, mesh=trainer.mesh)
    _restore_into(restored, state, ckpt_dir)
    return restored
