"""TensorBoard: scalars per step and per epoch, through tensorboardX (an optional extra)."""

from __future__ import annotations

import itertools
import os
from typing import TYPE_CHECKING, Any

from jaxfit.callback import Callback
from jaxfit.errors import ConfigError

from ._checks import EveryNSteps, check_every, primary_process

if TYPE_CHECKING:  # pragma: no cover
    from jaxfit.trainer import Trainer

_files = itertools.count(1)
_INSTALL = "TensorBoard needs tensorboardX: pip install 'jaxfit[tensorboard]' (or tensorboardX)"


class TensorBoard(Callback):
    """Writes the epoch logs, and optionally the loss every N steps, as TensorBoard scalars.

    Like Keras, training values go to ``log_dir/train`` and validation values to
    ``log_dir/validation`` under the same tag, so TensorBoard draws ``loss`` and
    ``val_loss`` on one chart: tags are ``epoch_<key>`` (``val_`` stripped for the
    validation writer) and ``batch_loss``. The x axis is the run's step count for every
    scalar, so per-step and per-epoch curves line up, and a resumed run purges the events
    written after its checkpoint (tensorboardX's ``purge_step``) instead of drawing them
    twice.

    ``every_n_steps`` reads the last step's loss from the device once every N steps (a
    sync each time); with ``None`` nothing happens per step. Keys that other callbacks add
    to the epoch logs (the learning rate from ``LearningRateMonitor``) are written too.

    In a multi-process run only process 0 writes.

    Scalars go to tensorboardX's own writer thread, which writes them out and flushes the
    files every ``flush_secs`` seconds (and at fit end): the training thread never waits
    for the disk. A killed process loses at most the last ``flush_secs`` of scalars.

    The writer is tensorboardX, installed with ``pip install 'jaxfit[tensorboard]'``: a
    small pure-Python package (numpy and protobuf) that writes the event-file format,
    flushes in a background thread, and needs neither TensorFlow nor the TensorBoard
    server.

    Args:
        log_dir: directory for the event files (``train/`` and ``validation/`` inside).
        every_n_steps: write ``batch_loss`` every N steps; ``None`` for epoch scalars only.
        flush_secs: how often the writer thread flushes the event files to disk.

    Example:
        >>> from jaxfit.callbacks import TensorBoard
        >>> tb = TensorBoard("runs/cnn/tb", every_n_steps=100)  # doctest: +SKIP
    """

    order = 200

    def __init__(self, log_dir: str | os.PathLike, every_n_steps: int | None = None,
                 flush_secs: float = 2.0) -> None:
        try:
            import tensorboardX  # noqa: F401  (fail at construction, not at fit start)
        except ImportError as e:
            raise ImportError(_INSTALL) from e
        if not isinstance(log_dir, (str, os.PathLike)):
            raise ConfigError(f"TensorBoard: log_dir must be a path, got {log_dir!r}")
        self.log_dir = os.fspath(log_dir)
        self.every_n_steps = check_every("TensorBoard", "every_n_steps", every_n_steps)
        if isinstance(flush_secs, bool) or not isinstance(flush_secs, (int, float)) or not flush_secs > 0:
            raise ConfigError(f"TensorBoard: flush_secs must be a number of seconds > 0, got {flush_secs!r}")
        self.flush_secs = flush_secs
        self._writers: dict[str, Any] = {}
        self._every = EveryNSteps(self.every_n_steps)
        self._purge: int | None = None
        self._active = True

    def __getstate__(self) -> dict[str, Any]:
        # Writers hold a file and a thread: a pickled callback (Trainer.load's recipe)
        # opens new ones at its next fit.
        state = self.__dict__.copy()
        state["_writers"] = {}
        return state

    def _writer(self, split: str, purge_step: int | None) -> Any:
        if split not in self._writers:
            from tensorboardX import SummaryWriter

            # Event files are named by the second they are opened in: a suffix unique to
            # this process and writer keeps a quick second fit from reusing the name.
            suffix = f".{os.getpid()}.{next(_files)}"
            self._writers[split] = SummaryWriter(
                os.path.join(self.log_dir, split), purge_step=purge_step, filename_suffix=suffix,
                flush_secs=getattr(self, "flush_secs", 2.0),  # absent from callbacks pickled before
            )
        return self._writers[split]

    def on_fit_start(self, trainer: Trainer) -> None:
        self._close()
        self._active = primary_process()
        # Events after the restored step were written by a run that is now replayed:
        # TensorBoard drops those with step >= purge_step from the older files.
        self._purge = trainer.step + 1 if trainer.step > 0 else None
        self._every.start(trainer.step)

    def wants_batch_hooks(self, trainer: Trainer) -> bool:
        return self.every_n_steps is not None and self._active

    def on_train_batch_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        if not self._every.due(trainer.step) or not self._active:
            return
        loss = float(logs["loss"])  # the one sync every N steps
        self._writer("train", self._purge).add_scalar("batch_loss", loss, trainer.step)

    def on_epoch_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        if not self._active:
            return
        for key, value in logs.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                continue
            split, name = ("validation", key[4:]) if key.startswith("val_") else ("train", key)
            self._writer(split, self._purge).add_scalar(f"epoch_{name}", number, trainer.step)

    def on_fit_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        self._close()

    def _close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers = {}
