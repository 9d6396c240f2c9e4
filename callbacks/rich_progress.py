"""RichProgress: a live progress display with rich, or one plain line per epoch."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
from rich.console import Console, RenderableType
from rich.progress import Progress
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from jaxfit.callback import Callback
from jaxfit.errors import ConfigError

from . import _progress_format as fmt
from ._checks import primary_process

if TYPE_CHECKING:  # pragma: no cover
    from jaxfit.trainer import Trainer


class RichProgress(Callback):
    """Shows training progress: a live bar on a terminal, one line per epoch elsewhere.

    ``verbose`` has Keras's meaning: ``1`` (the default) a live bar on a terminal or in a
    notebook, ``2`` one line per epoch and no bar, ``0`` nothing.

    The live display: ``Epoch k/N``, a step bar and a step counter, then steps/s, samples/s
    and the ETA of the epoch and of the fit (training time, validation not included); under
    it the epoch-so-far loss, metrics and learning rate, refreshed ``refresh_per_second``
    times a second; above it, a table row per epoch (train and validation metrics,
    hyperparameters, time, throughput) and a closing summary. Elsewhere (CI logs, a file, a
    pipe) and with ``verbose=2`` it prints one plain line per epoch and the summary.

    A run whose epochs have no known length and that ``max_steps`` ends (an endless stream
    without ``steps_per_epoch``) shows its progress by steps instead: ``Step 120/1000``,
    with the ETA of the run. A validation every ``validation_steps_freq`` steps prints a
    line ``Step 120/1000 - val_loss ...``.

    The display fits the terminal's width, read at every refresh: the label, the bar (at
    least 10 columns) and the counter always stay; the ETA, steps/s, the fit's ETA and
    samples/s follow as far as they fit, in that order; the values wrap onto more lines,
    with abbreviated names (``v_acc``, ``lr``) when they do not fit on one. The epoch
    table drops ``steps/s``, then ``time``, then abbreviates its headers, then drops the
    hyperparameter columns; narrower still, each epoch is printed as lines of values.

    The summary's time is the whole ``fit`` call, from its ``setup`` on; ``set-up`` is its
    part before training (data checks, model initialisation), ``first step`` the first
    execution (compilation included).

    What it costs: per step, one clock read. Values are fetched from the device only at a
    refresh (``trainer.running_logs()``, one sync a few times a second) and at epoch ends,
    never per step. Throughput and ETA leave compilation out: the clock of the first epoch
    starts when the first execution has finished (the only step this callback waits for),
    later epochs start their clock at the epoch start, and validation is not counted as
    training time. The summary reports the first step's time, compilation included,
    separately.

    In a multi-process run only process 0 prints.

    Args:
        verbose: ``1`` live bar (plain lines when not a terminal), ``2`` one line per
            epoch, ``0`` silent.
        refresh_per_second: live display refresh rate (values are fetched at this rate).
        console: the ``rich.console.Console`` to print to (default: a new one on stdout).
        live: force the live display (True) or plain lines (False); by default, live when
            the console is a terminal or a Jupyter notebook (``verbose=1`` only).
        hyperparams: injected hyperparameters to show, when the optimizer has them.

    Example:
        >>> from jaxfit.callbacks import RichProgress
        >>> progress = RichProgress(refresh_per_second=2)
        >>> per_epoch = RichProgress(verbose=2)
    """

    order = 200
    #: ``fit`` adds a progress callback by default unless one with ``is_progress`` is given.
    is_progress = True

    def __init__(
        self,
        verbose: int = 1,
        refresh_per_second: float = 4.0,
        console: Console | None = None,
        live: bool | None = None,
        hyperparams: Sequence[str] = ("learning_rate",),
    ) -> None:
        if isinstance(verbose, bool) or verbose not in (0, 1, 2):
            raise ConfigError(
                f"RichProgress: verbose must be 0 (silent), 1 (live bar) or 2 (one line per "
                f"epoch), as in Keras; got verbose = {verbose!r}"
            )
        if verbose == 2 and live:
            raise ConfigError(
                "RichProgress: verbose=2 prints one line per epoch and no bar, but live=True "
                "asks for the live bar. Pass verbose=1 with live=True, or drop live."
            )
        if (
            isinstance(refresh_per_second, bool)
            or not isinstance(refresh_per_second, (int, float))
            or not 0 < refresh_per_second <= 60
        ):
            raise ConfigError(
                f"RichProgress: refresh_per_second must be in (0, 60], got {refresh_per_second!r}"
            )
        if console is not None and not isinstance(console, Console):
            raise ConfigError(
                f"RichProgress: console must be a rich Console, got {type(console).__name__}"
            )
        self.verbose = int(verbose)
        self.refresh_per_second = float(refresh_per_second)
        self.console = console
        self.live = live
        self.hyperparams = [hyperparams] if isinstance(hyperparams, str) else list(hyperparams)
        self._progress: Progress | None = None
        self._fit_t0: float | None = None  # set while a fit is under way
        self._setup_t0: float | None = None

    def __getstate__(self) -> dict[str, Any]:
        # rich objects hold locks and a refresh thread: they cannot be pickled (Trainer.load
        # pickles the callbacks). An unpickled RichProgress prints to a new default Console.
        state = self.__dict__.copy()
        state["console"] = None
        state["_progress"] = None
        return state

    # ---------------------------------------------------------------- hooks
    def setup(self, trainer: Trainer) -> None:
        # The fit's first moment: the summary's time covers the whole fit call.
        self._setup_t0 = time.perf_counter()

    def on_fit_start(self, trainer: Trainer) -> None:
        if self.console is None:
            self.console = Console()
        if self.verbose == 0:
            self.console, self._is_live = Console(quiet=True), False
        elif primary_process():
            auto = self.console.is_terminal or self.console.is_jupyter
            self._is_live = auto if self.live is None else bool(self.live)
            self._is_live = self._is_live and self.verbose == 1
        else:  # the other processes of a multi-host run show nothing
            self.console, self._is_live = Console(quiet=True), False
        self._hp = [n for n in self.hyperparams if n in trainer.hyperparams.names]
        config = trainer.fit_config
        self._epochs, self._batch = config.get("epochs"), config.get("batch_size")
        self._per_epoch = config.get("steps_per_epoch")
        self._max_steps = config.get("max_steps")
        # No epoch count, no epoch length: the run's own total, max_steps, is what to show.
        self._by_steps = self._epochs is None and self._per_epoch is None and self._max_steps is not None
        self._fit_t0 = time.perf_counter()
        self._first_step: float | None = None  # seconds to the first execution's end
        self._clock: tuple[float, int] | None = None  # (time, step) the epoch's clock started
        self._train_end: float | None = None
        self._train_s, self._train_steps = 0.0, 0
        self._layout: fmt.TableLayout | None = None
        self._last: dict[str, Any] = {}
        self._next_refresh = 0.0
        if self._is_live:
            self._progress = _LiveBar(
                console=self.console,
                refresh_per_second=self.refresh_per_second,
                transient=True,
            )
            self._task = self._progress.add_task(
                "", total=self._total, speed="", eta="?", values="", named={}
            )
            self._progress.start()

    def on_epoch_start(self, trainer: Trainer) -> None:
        self._epoch_t0 = time.perf_counter()
        self._epoch_step0 = trainer.step - trainer.batch_in_epoch
        self._train_end = None
        # After the first execution nothing compiles at an epoch start: the device is idle
        # (the previous epoch's metrics were fetched), so the clock can start now.
        self._clock = (self._epoch_t0, trainer.step) if self._first_step is not None else None
        if self._progress is not None:
            self._progress.reset(
                self._task,
                total=self._total,
                completed=self._done(trainer),
                description="Step" if self._by_steps else f"Epoch {fmt.of(trainer.epoch, self._epochs)}",
                speed="",
                eta="?",
                values="",
                named={},
            )

    def wants_batch_hooks(self, trainer: Trainer) -> bool:
        # Drawn live, or the fit's first execution still to time; else the batch hook
        # would only return.
        return self._progress is not None or self._first_step is None

    def on_train_batch_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        if self._clock is None:
            # The first execution of the fit: compiled during dispatch, maybe still running.
            # Wait for it once so that compilation stays out of every rate and ETA.
            jax.block_until_ready(logs["loss"])
            now = time.perf_counter()
            if self._first_step is None and self._fit_t0 is not None:
                self._first_step = now - self._fit_t0
            self._clock = (now, trainer.step)
            return
        if self._progress is None:
            return
        now = time.perf_counter()
        if now < self._next_refresh:
            return
        self._next_refresh = now + 1.0 / self.refresh_per_second
        self._refresh(trainer)

    def on_validation_start(self, trainer: Trainer) -> None:
        self._train_end = time.perf_counter()

    def on_validation_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        if "step" not in logs:  # the epoch's validation: shown in its epoch row
            return
        line = fmt.validation_line(trainer.step, self._max_steps, {k: v for k, v in logs.items() if k != "step"})
        if self._progress is None:
            self._print_line(line)
        else:
            self._progress.console.print(line, highlight=False, markup=False, soft_wrap=True)

    def on_epoch_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        now = time.perf_counter()
        speed = self._close_epoch_clock(trainer, self._train_end or now)
        shown = dict(logs)
        for name in self._hp:
            if name not in shown:
                shown[name] = trainer.hyperparams[name]
        self._last = shown
        seconds = now - self._epoch_t0
        if self._progress is None:
            self._print_line(fmt.epoch_line(trainer.epoch, self._epochs, shown, seconds, speed,
                                            self._batch))
            return
        done = trainer.step if self._by_steps else trainer.step - self._epoch_step0
        self._progress.update(self._task, completed=done)
        header = self._layout is None
        if self._layout is None:
            # Fixed at the first row: the rows are printed one by one and must align.
            label = fmt.of(self._epochs, self._epochs) if self._epochs else "9999"
            self._layout = fmt.TableLayout(self._con.width, label, list(shown), self._hp)
        row = {k: fmt.number(v) for k, v in shown.items()}
        row.update(epoch=fmt.of(trainer.epoch, self._epochs), time=fmt.duration(seconds))
        row["steps/s"] = "-" if speed is None else f"{speed:.1f}"
        if self._layout.fits:
            self._progress.console.print(self._layout.table(row, header))
            return
        # Too narrow for a table: the epoch as lines of values.
        lines = fmt.value_lines(shown, self._con.width)
        lines.insert(0, f"Epoch {row['epoch']} - {row['time']} - {row['steps/s']} steps/s")
        self._con.print("\n".join(lines), highlight=False, markup=False)

    def on_fit_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        live = self._progress is not None
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._fit_t0 is None:  # an earlier callback's on_fit_start failed: nothing to sum up
            self._setup_t0 = None
            return
        now = time.perf_counter()
        start = self._fit_t0 if self._setup_t0 is None else self._setup_t0
        wall, setup = now - start, None
        if self._setup_t0 is not None:
            setup = self._fit_t0 - self._setup_t0
        self._fit_t0 = self._setup_t0 = None
        mean = self._train_steps / self._train_s if self._train_s > 0 else None
        text = fmt.summary(
            trainer.epoch,
            trainer.step,
            wall,
            self._first_step,
            mean,
            self._batch,
            logs.get("stop_reason"),
            self._last,
            setup=setup,
            width=self._con.width if live else None,
        )
        self._con.print(text, highlight=False, markup=False, soft_wrap=True)

    # -------------------------------------------------------------- helpers
    def _print_line(self, line: str) -> None:
        """Prints one plain line. To a pipe or a file (no terminal, nothing recorded) it is
        written straight to the console's file: rich's rendering of a plain line costs
        ~0.3 ms, more than the rest of an epoch boundary."""
        con = self._con
        if con.is_terminal or con.is_jupyter or con.record or con.quiet:
            con.print(line, highlight=False, markup=False, soft_wrap=True)
            return
        con.file.write(line + "\n")
        con.file.flush()

    @property
    def _con(self) -> Console:
        """The console of the fit under way (set by ``on_fit_start``)."""
        assert self.console is not None, "RichProgress: used before on_fit_start"
        return self.console

    @property
    def _total(self) -> int | None:
        """The bar's total: the run's steps when shown by steps, else the epoch's."""
        return self._max_steps if self._by_steps else self._per_epoch

    def _done(self, trainer: Trainer) -> int:
        return trainer.step if self._by_steps else trainer.batch_in_epoch

    def _close_epoch_clock(self, trainer: Trainer, end: float) -> float | None:
        if self._clock is None:
            return None
        t0, step0 = self._clock
        steps, seconds = trainer.step - step0, end - t0
        self._clock = None
        if steps <= 0 or seconds <= 0:
            return None
        self._train_s += seconds
        self._train_steps += steps
        return steps / seconds

    def _refresh(self, trainer: Trainer) -> None:
        """Fetch the epoch-so-far values (one device sync) and update the live bar."""
        assert self._progress is not None and self._clock is not None
        shown: dict[str, Any] = dict(trainer.running_logs())
        for name in self._hp:
            shown[name] = trainer.hyperparams[name]
        now = time.perf_counter()  # after the sync: the device has caught up with the host
        t0, step0 = self._clock
        speed = (trainer.step - step0) / (now - t0) if now > t0 and trainer.step > step0 else None
        eta = "?"
        if speed and self._by_steps and self._max_steps is not None:
            eta = fmt.duration((self._max_steps - trainer.step) / speed)
        elif speed and self._per_epoch:
            left = self._per_epoch - trainer.batch_in_epoch
            eta = fmt.duration(left / speed)
            if self._epochs and self._epochs > trainer.epoch:  # the fit's ETA, training time only
                fit_left = left + (self._epochs - trainer.epoch) * self._per_epoch
                eta += f" (fit {fmt.duration(fit_left / speed)})"
        self._progress.update(
            self._task,
            completed=self._done(trainer),
            speed=fmt.rates(speed, self._batch),
            eta=eta,
            values=fmt.values(shown),
            named=shown,
        )


class _LiveBar(Progress):
    """rich's Progress with its one task laid out for the console's width at each render.

    One line: the label, the bar, the counter and what else fits
    (:func:`_progress_format.bar_layout`); then the values, wrapped at whole items.
    """

    def get_renderables(self) -> Any:
        if not self.tasks:
            return
        task = self.tasks[0]
        width = self.console.width
        total = None if task.total is None else int(task.total)
        done = int(task.completed)
        # The counter keeps its width through the epoch, so the bar does not jump.
        counter = f"{done}/?" if total is None else f"{done:>{len(str(total))}}/{total}"
        label = task.description
        bar, pieces = fmt.bar_layout(width, label, counter, task.fields["speed"],
                                     task.fields["eta"])  # fmt: skip
        grid = Table.grid(padding=(0, 1))
        cells: list[RenderableType] = [
            Text(label, style="bold"),
            ProgressBar(total=total, completed=done, width=bar),
            Text(counter),
        ]
        if pieces:
            cells.append(Text(" ".join(pieces)))
        for _ in cells:
            grid.add_column(no_wrap=True)
        grid.add_row(*cells)
        yield grid
        for line in fmt.value_lines(task.fields.get("named") or {}, width):
            yield Text(line)
