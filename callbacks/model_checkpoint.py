"""ModelCheckpoint: write the complete training state into a run directory, off the loop."""

from __future__ import annotations

import functools
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax

from jaxfit.callback import Callback
from jaxfit.checkpoint import (
    DEFAULT_MAX_DATA_BYTES,
    CheckpointError,
    RunLock,
    RunWriter,
    SaveStats,
    capture,
    list_checkpoints,
    pack_recipe,
    writes_shards,
)
from jaxfit.errors import ConfigError

from ._checks import check_count, check_every, check_number
from ._monitor import MODES, check_check_on, check_timing, infer_mode

if TYPE_CHECKING:  # pragma: no cover
    from jaxfit.trainer import Trainer

_SIGNAL_STOPS = ("preempted", "interrupted")


class ModelCheckpoint(Callback):
    """Writes the complete training state into a run directory, so a run can resume exactly.

    Each checkpoint is a directory holding the state (params, optimizer state with its
    hyperparameters, batch statistics, step, epoch, data position, callback states, history)
    as msgpack, and a manifest with versions, metrics and sha256 checksums. The run directory
    also holds the run's recipe (model, optimizer, callbacks, fit arguments, and the data when
    it is in-memory arrays of at most ``max_data_bytes``), so ``Trainer.load(directory).fit()``
    continues the run with nothing else.

    Saving blocks training only to dispatch a device-side copy of the arrays (the next
    donated step cannot clobber it) and to copy the small rest; fetching the copy to the
    host, testing it for NaN/inf, serializing, checksumming, fsyncing and the atomic rename
    happen in a background thread. An epoch-end save is taken in ``on_epoch_end`` and handed
    to that thread when the next epoch starts (or the fit ends), after the loggers have
    written the epoch's rows. The devices hold that second copy
    of the state until its write is done. A state with a sharded array is written as a
    sharded checkpoint: each process writes its own slices (see docs/scaling.md). A kill at
    any instant leaves every earlier checkpoint loadable. When fit is stopped by SIGTERM (preemption) or Ctrl-C,
    a checkpoint of the last finished step is written before ``fit`` ends; however ``fit``
    ends, it returns only after every checkpoint is on disk; ``wait_until_finished()`` waits
    for them during the fit.

    Retention keeps two separate guarantees: the ``keep_last`` newest checkpoints, and the
    ``keep_best`` best ones by ``monitor``. A best checkpoint never displaces the newest.

    A run directory has one writer at a time: the fit holds the directory's lock file
    (``writer.lock``, an ``flock`` the kernel releases however the process ends) from its
    very start, before any data is read, and a second writer is refused then with an error
    naming the holder's pid and host. Several ModelCheckpoints in one fit write into
    separate directories (e.g. the latest every N steps in one, the best per epoch in
    another); each has its own ``state_key``, derived from its directory.

    Args:
        directory: the run directory (created if missing).
        monitor: the epoch log to rank checkpoints by, e.g. ``"val_loss"`` (None: no ranking).
        mode: ``"min"``, ``"max"``, or ``"auto"`` (from the name: loss-like min, accuracy-like max).
        every_n_epochs: save at the end of every n-th epoch (None: never at epoch end).
        every_n_steps: save after every n-th optimizer step, mid-epoch included.
        every_n_seconds: save after the first step that ends n seconds after the last save.
        check_on: ``"epoch"`` (the default: only epoch-end checkpoints carry metrics, so
            only they compete for best) or ``"validation"``: a checkpoint is also written
            at each validation end, with that validation's ``val_`` logs as its metrics, so
            ``monitor`` ranks every validation and the best is kept (Lightning's way). A
            validation every ``validation_steps_freq`` steps saves the state at that step,
            mid-epoch (a resume from it continues exactly); an epoch-end validation saves
            at the epoch end, after ``on_epoch_end``, whatever ``every_n_epochs`` says.
        keep_last: how many of the newest checkpoints to keep (None: all).
        keep_best: how many of the best checkpoints to keep on top of them (None: all scored).
        max_data_bytes: store the training data in the recipe up to this size (see
            docs/checkpoints.md); larger data has to be passed again with ``fit(data=...)``.
        background: write in the background, in a thread of this process (True or
            ``"thread"``); ``"process"``: on Linux, a whole checkpoint is written by a writer
            process, whose file work does not hold the interpreter lock the training loop
            needs (sharded checkpoints and other systems keep the thread); False: inline,
            for measurements. See docs/checkpoints.md, "Cost", for when each is faster.

    Attributes:
        stats: ``SaveStats`` of this fit: how long each save blocked training and how long
            each write took.

    Example:
        >>> import numpy as np, optax, flax.linen as nn, tempfile
        >>> from jaxfit import Trainer
        >>> from jaxfit.callbacks import ModelCheckpoint
        >>> x, y = np.random.rand(64, 4).astype("float32"), np.arange(64) % 3
        >>> run = tempfile.mkdtemp()
        >>> trainer = Trainer(optimizer=optax.inject_hyperparams(optax.sgd)(learning_rate=0.1))
        >>> _ = trainer.fit(nn.Dense(3), (x, y), epochs=2, batch_size=16, verbose=0,
        ...                 callbacks=[ModelCheckpoint(run, keep_last=1)])
        >>> resumed = Trainer.load(run)
        >>> resumed.epoch
        2
    """

    order = 100

    def __init__(self, directory: str | os.PathLike, monitor: str | None = None,
                 mode: str = "auto", every_n_epochs: int | None = 1,
                 every_n_steps: int | None = None, every_n_seconds: float | None = None,
                 keep_last: int | None = 3, keep_best: int | None = 1, *,
                 check_on: str = "epoch",
                 max_data_bytes: int = DEFAULT_MAX_DATA_BYTES,
                 background: bool | str = True) -> None:
        owner = type(self).__name__
        self.check_on = check_check_on(owner, check_on)
        if not isinstance(directory, (str, os.PathLike)):
            raise ConfigError(f"{owner}: directory must be a path, got {type(directory).__name__}")
        if monitor is not None and (not isinstance(monitor, str) or not monitor):
            raise ConfigError(f"{owner}: monitor must be a log key such as 'val_loss' or None, "
                              f"got {monitor!r}")
        if mode not in MODES:
            raise ConfigError(f"{owner}: mode must be one of {MODES}, got mode = {mode!r}")
        check_every(owner, "every_n_epochs", every_n_epochs)
        check_every(owner, "every_n_steps", every_n_steps)
        if keep_last is not None:
            check_count(owner, "keep_last", keep_last, minimum=1)
        if keep_best is not None:
            check_count(owner, "keep_best", keep_best)
        check_count(owner, "max_data_bytes", max_data_bytes)
        if background not in (True, False, "thread", "process"):
            raise ConfigError(f"{owner}: background must be True or 'thread' (a writer "
                              "thread), 'process' (a writer process, on Linux) or False "
                              f"(write inline), got background = {background!r}")
        if every_n_seconds is not None and check_number(owner, "every_n_seconds",
                                                        every_n_seconds) == 0:
            raise ConfigError(f"{owner}: every_n_seconds must be positive or None, got 0")
        # The retention order of checkpoints; None when nothing is monitored.
        self._mode = None if monitor is None else infer_mode(monitor) if mode == "auto" else mode
        self.directory = Path(directory)
        self.monitor, self.mode = monitor, mode
        self.every_n_epochs, self.every_n_steps = every_n_epochs, every_n_steps
        self.every_n_seconds = every_n_seconds
        self.keep_last, self.keep_best = keep_last, keep_best
        self.max_data_bytes, self.background = max_data_bytes, background
        self.stats = SaveStats()
        self.skipped_nonfinite: list[int] = []
        # Fixed at construction: a loaded run pointed at a moved directory keeps its key.
        self._state_key = f"ModelCheckpoint[{os.fspath(directory)}]"
        self._lock: RunLock | None = None
        self._writer: RunWriter | None = None
        self._write_shards = False
        self._saved_at: tuple[int, int] | None = None
        self._last_time = 0.0
        self._last_logs: dict[str, Any] = {}
        self._epoch_validated = False
        self._held: Callable[[], None] | None = None  # a save taken, not yet handed over

    def __getstate__(self) -> dict[str, Any]:
        # Pickled into the recipe: no thread, no lock, no timings of this process.
        state = dict(self.__dict__)
        state.update(_writer=None, _lock=None, _saved_at=None, _last_logs={}, _held=None,
                     stats=SaveStats())
        return state

    @property
    def state_key(self) -> str:
        """``"ModelCheckpoint[<directory>]"``: distinct for each directory, so a fit can have
        one ModelCheckpoint per directory. (Recipes of older versions, pickled without it,
        keep the key ``"ModelCheckpoint"``; the callback has no state to restore.)"""
        return getattr(self, "_state_key", None) or "ModelCheckpoint"

    @staticmethod
    def _position(trainer: Trainer) -> tuple[int, int]:
        # (step, batch_in_epoch) identifies a point of a run: the end of an epoch (batch 0)
        # differs from its last step seen mid-epoch (batch N, before validation and epoch end).
        return trainer.step, trainer.batch_in_epoch

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Trainer) -> None:
        """Claims the run directory before any work: creates it, takes its writer lock and
        refuses a directory holding another run's checkpoints or a full file system."""
        self._release()  # left by a previous fit of this callback that ended before on_fit_end
        if jax.process_index() != 0:
            # Multi-host data parallelism: the state is replicated, process 0 writes it.
            _refuse_another_run(self.directory, trainer)
            return
        directory = self._make_directory()
        self._lock = RunLock.acquire(directory, run_id=trainer.run_id, owner=self,
                                     trainer=trainer)
        try:
            _refuse_another_run(directory, trainer)
            _check_space(directory, 1)
        except BaseException:
            self._release()
            raise

    def on_fit_start(self, trainer: Trainer) -> None:
        if self.monitor is not None:
            trainer.check_monitor(self.monitor, self)
        check_timing(trainer, self, self.monitor, getattr(self, "check_on", "epoch"))
        self._epoch_validated = False
        self.stats = SaveStats()
        self.skipped_nonfinite = []
        # A state with a sharded array is written as a sharded checkpoint (each process its
        # own slices, nothing gathered); a replicated one whole, by process 0.
        self._write_shards = writes_shards(trainer)
        if self._write_shards and jax.process_count() > 1 and self.every_n_seconds is not None:
            raise ConfigError(
                "ModelCheckpoint: every_n_seconds cannot time a sharded checkpoint of several "
                "processes (each process's clock would pick other steps, and every process "
                "writes its part of each checkpoint); use every_n_steps or every_n_epochs")
        if jax.process_index() != 0:
            self._writer = None
            if not self._write_shards:
                return  # replicated state: process 0 writes it whole
            self._writer = RunWriter(self.directory, keep_last=None, keep_best=None,
                                     monitor=None, mode=None, background=bool(self.background),
                                     run_id=trainer.run_id, sharded=True)
            self._start_writing(trainer)
            return
        if self._lock is None or not self._lock.held:
            self.setup(trainer)  # an engine that does not call setup: claim the directory now
        recipe = trainer.recipe()
        # Which callback wrote the run, so a load can point it at the directory it came from.
        recipe["checkpoint"] = {"callback_index": next(
            (i for i, cb in enumerate(recipe.get("callbacks", [])) if cb is self), None)}
        payload = pack_recipe(recipe, self.max_data_bytes)
        state_bytes = sum(int(getattr(leaf, "nbytes", 0))
                          for leaf in jax.tree_util.tree_leaves(trainer.state))
        _check_space(self.directory, state_bytes + len(payload))
        try:
            self._writer = RunWriter(self.directory, keep_last=self.keep_last,
                                     keep_best=self.keep_best, monitor=self.monitor,
                                     mode=self._mode, background=bool(self.background),
                                     run_id=trainer.run_id, sharded=self._write_shards,
                                     process=self.background == "process"
                                     and jax.process_count() == 1,
                                     lock_fd=self._lock.fileno() if self._lock else None)
            self._writer.set_recipe(payload)
        except OSError as err:
            self._writer = None
            raise CheckpointError(
                f"ModelCheckpoint: cannot write the run's recipe into {self.directory} ({err}). "
                "Free space on its file system or pass another directory; nothing was "
                "trained yet"
            ) from err
        self._start_writing(trainer)

    def _start_writing(self, trainer: Trainer) -> None:
        assert self._writer is not None
        self._writer.stats = self.stats
        self._saved_at = self._position(trainer)  # a loaded state is already on disk
        self._last_time = time.monotonic()
        self._last_logs = {}

    def wants_batch_hooks(self, trainer: Trainer) -> bool:
        return self._writer is not None and (
            self.every_n_steps is not None or self.every_n_seconds is not None)

    def on_train_batch_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        step = trainer.step
        if self._writer is None:
            return
        assert self._saved_at is not None  # set with the writer, in on_fit_start
        if self.every_n_steps is not None and (
                step // self.every_n_steps > self._saved_at[0] // self.every_n_steps):
            self._save(trainer, "step")
        elif self.every_n_seconds is not None and (
                time.monotonic() - self._last_time >= self.every_n_seconds):
            self._save(trainer, "time")

    def on_validation_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        if getattr(self, "check_on", "epoch") != "validation" or self._writer is None:
            return
        if "step" not in logs:  # the epoch's validation: saved at the epoch end, with its logs
            self._epoch_validated = True
            return
        # Saved even when a step save has just written this step: that one was taken before
        # this validation, whose callback states (patience, history) a resume needs.
        self._save(trainer, "validation", metrics={k: v for k, v in logs.items() if k != "step"})

    def on_epoch_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        self._last_logs = dict(logs)
        validated, self._epoch_validated = self._epoch_validated, False
        if self._writer is None:
            return
        if (self.every_n_epochs is not None and trainer.epoch % self.every_n_epochs == 0) or validated:
            # Taken now; a background writer gets it when the next epoch starts (or the fit
            # ends): the loggers that run after this callback (CSVLogger, TensorBoard,
            # RichProgress) then write their rows without a writer thread taking the
            # interpreter lock at each of their system calls. An inline save is written here.
            self._save(trainer, "epoch", hold=bool(self.background))

    def on_epoch_start(self, trainer: Trainer) -> None:
        self._submit_held()

    def on_fit_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        try:
            if self._writer is not None:
                self._finish(trainer, logs)
        finally:
            self._release()  # only once every write is on disk (or failed)

    def _finish(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        failed = logs.get("exception") is not None
        try:
            self._submit_held()  # taken at an epoch's end, before any error
            # After an error the state may be half-updated (or donated away): never save it.
            # A stop by signal, callback or the last epoch saves what is not on disk yet.
            if not failed and self._position(trainer) != self._saved_at:
                reason = logs["stop_reason"] if logs.get("stop_reason") in _SIGNAL_STOPS \
                    else "fit_end"
                self._save(trainer, reason)
            assert self._writer is not None  # on_fit_end finishes only with a writer
            self._writer.close()
            self._report_skipped()
        except Exception as err:
            if not failed:
                raise
            warnings.warn(f"ModelCheckpoint: a checkpoint write failed too: {err}", stacklevel=3)

    def wait_until_finished(self) -> None:
        """Blocks until every checkpoint this callback has taken is on disk.

        For a callback that reads the checkpoints during the fit (to upload or evaluate the
        newest): a background save of an epoch's end is handed to the writer only when the
        next epoch starts, so call this first. Re-raises a failed write's
        ``CheckpointError``. Outside a fit there is nothing to wait for: ``fit`` returns only
        after every checkpoint is on disk.
        """
        self._submit_held()
        if self._writer is not None:
            self._writer.wait()

    def teardown(self, trainer: Trainer) -> None:
        # Also after a fit that failed between setup and on_fit_start (nothing in flight then).
        self._release()

    def _release(self) -> None:
        # The writer (and its process, which holds a copy of the lock) ends first. One left
        # by a fit that failed: its writes' errors went with that fit.
        writer = getattr(self, "_writer", None)
        if writer is not None:
            try:
                self._submit_held()
                writer.close()
            except CheckpointError:
                pass
            finally:
                self._writer = None
        lock, self._lock = getattr(self, "_lock", None), None
        if lock is not None:
            lock.release()

    def _make_directory(self) -> Path:
        directory = self.directory
        if os.path.lexists(directory) and not directory.is_dir():
            raise ConfigError(
                f"ModelCheckpoint: {directory} exists and is not a directory; ModelCheckpoint "
                "writes a run directory there. Move the file away or pass another directory"
            )
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            blocker = next((p for p in directory.parents if p.exists() and not p.is_dir()),
                           directory)
            raise ConfigError(
                f"ModelCheckpoint: cannot create the run directory {directory}: {blocker} is "
                "a file, not a directory. Pass a directory path that does not go through a file"
            ) from None
        except OSError as err:
            raise CheckpointError(
                f"ModelCheckpoint: cannot create the run directory {directory} ({err}); it "
                "must be writable, with space left on its file system"
            ) from err
        return directory

    # ------------------------------------------------------------------ saving
    def _save(self, trainer: Trainer, reason: str, metrics: dict[str, Any] | None = None, *,
              hold: bool = False) -> None:
        if trainer.stop_reason == "terminate_on_nan":
            return  # non-finite values were seen: nothing from here on is worth resuming
        # Steps are dispatched ahead of the device: the capture waits for the ones under way
        # first (that wait is accounted separately: the device was busy with training, not
        # saving), then dispatches a device-side copy of the arrays (the next step donates
        # the live ones) and copies the small rest. The writer thread waits for the copy,
        # fetches it, skips it if it holds NaN/inf, and writes it.
        taken = capture(trainer, sharded=self._write_shards)
        self.stats.device_wait.append(taken.device_wait)
        at = taken.position
        # Epoch logs describe this state only at an epoch boundary (a validation's logs at
        # its step, given by the caller).
        if metrics is None:
            metrics = self._last_logs if at["batch_in_epoch"] == 0 else {}
        assert self._writer is not None  # every caller checks it
        self._submit_held()  # saves reach the writer in the order they were taken
        self._held = functools.partial(
            self._writer.save, taken.state, copy_seconds=taken.seconds, fetch=taken.fetch, **at,
            reason=reason, metrics=metrics, monitor=self.monitor, mode=self._mode)
        if not hold:
            self._submit_held()
        self._saved_at = (at["step"], at["batch_in_epoch"])
        self._last_time = time.monotonic()

    def _submit_held(self) -> None:
        """Hands the save taken and held back (``_save(hold=True)``) to the writer."""
        held, self._held = getattr(self, "_held", None), None  # (absent: pickled before)
        if held is not None and self._writer is not None:
            held()
            self._report_skipped()

    def _report_skipped(self) -> None:
        # NaN/inf weights never reach a checkpoint, whoever is watching the loss: a resume
        # starts from the last finite state instead. (Found by the writer: reported at this
        # save when writing inline, else at the next save or the end of fit.)
        assert self._writer is not None
        for step in self._writer.take_skipped():
            self.skipped_nonfinite.append(step)
            warnings.warn(f"ModelCheckpoint: not saving step {step}: the params hold NaN or inf "
                          "values; the checkpoints on disk keep the last finite state",
                          RuntimeWarning, stacklevel=3)


def _check_space(directory: Path, need: int) -> None:
    """Refuses to start a fit whose first checkpoint cannot fit on the file system.

    ``need`` is about one checkpoint's size (the state plus the recipe). File systems that
    report no sizes (some network and FUSE ones) are not checked.
    """
    try:
        fs = os.statvfs(directory)
    except (AttributeError, OSError):  # Windows, or a file system without statvfs
        return
    blocks = fs.f_bfree if hasattr(os, "geteuid") and os.geteuid() == 0 else fs.f_bavail
    free = blocks * fs.f_frsize
    if fs.f_blocks > 0 and free < need:
        raise CheckpointError(
            f"ModelCheckpoint: the file system holding {directory} has {free / 2**20:.1f} MiB "
            f"free, less than a checkpoint of this run needs (about {need / 2**20:.1f} MiB). "
            "Free space there or pass another directory; nothing was trained yet"
        )


def _refuse_another_run(directory: Path, trainer: Trainer) -> None:
    """Never let a new run's retention delete another run's checkpoints."""
    if not Path(directory).is_dir():
        return
    owners = {info.manifest.get("run_id") for info in list_checkpoints(directory)
              if info.manifest}
    others = sorted(o for o in owners if o and o != trainer.run_id)
    if others:
        raise ConfigError(
            f"ModelCheckpoint: {directory} holds checkpoints of another run (run id {others[0]}); "
            "this run would mix with them and its retention would delete them. Continue that "
            f"run with Trainer.load({str(directory)!r}).fit(), or give this run a new directory."
        )
