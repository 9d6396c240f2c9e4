"""CSVLogger: one row per epoch of the epoch logs, in a CSV file."""

from __future__ import annotations

import csv
import io
import math
import numbers
import os
from typing import TYPE_CHECKING, Any

from jaxfit.callback import Callback
from jaxfit.errors import ConfigError

from ._checks import primary_process

if TYPE_CHECKING:  # pragma: no cover
    from jaxfit.trainer import Trainer


class CSVLogger(Callback):
    """Writes ``epoch`` and every key of the epoch logs as a CSV row at each epoch end.

    Columns are those of the first row (``epoch``, then the log keys in order); a key that
    first appears later adds a column (the file is rewritten, earlier rows get an empty
    cell). Values are written with full float precision.

    The file is UTF-8. Files are never half-written: a row is appended in one write (the OS has it at once,
    so a killed process loses none; the file is synced to the disk at fit end), a rewrite
    goes to a synced temporary file that replaces the old one. Nothing is touched before the first epoch
    ends, so a fit that fails at start leaves an earlier log as it was.

    In a multi-process run only process 0 writes.

    When a run continues (``Trainer.load(run).fit()`` after a crash), rows of epochs after
    the restored checkpoint are dropped first: those epochs are trained again and their
    rows written anew, so the file matches the run's history.

    Args:
        filename: the CSV file.
        separator: the field separator.
        append: keep the rows of an existing file when a run starts from scratch (they are
            always kept, up to the restored epoch, when a run continues).

    Example:
        >>> from jaxfit.callbacks import CSVLogger
        >>> logger = CSVLogger("runs/cnn/log.csv")
    """

    order = 200

    def __init__(
        self, filename: str | os.PathLike, separator: str = ",", append: bool = False
    ) -> None:
        if not isinstance(separator, str) or len(separator) != 1:
            raise ConfigError(f"CSVLogger: separator must be one character, got {separator!r}")
        self.filename = os.fspath(filename)
        self.separator = separator
        self.append = bool(append)
        self._columns: list[str] = []
        self._rows: list[dict[str, str]] = []
        self._in_sync = False  # True when the file holds exactly _columns + _rows
        self._active = True

    def on_fit_start(self, trainer: Trainer) -> None:
        self._columns, self._rows, self._in_sync = [], [], False
        self._active = primary_process()
        if not self._active:
            return
        continuing = trainer.step > 0
        if (continuing or self.append) and os.path.exists(self.filename):
            self._columns, self._rows = self._read()
            if continuing:
                done = trainer.epoch
                self._rows = [r for r in self._rows if _epoch_of(r) <= done]

    def on_epoch_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        if not self._active:
            return
        row = {"epoch": str(trainer.epoch)}
        for key, value in logs.items():
            text = _cell(value)
            if text is not None:
                row[key] = text
        new_columns = [k for k in row if k not in self._columns]
        self._rows.append(row)
        if self._in_sync and not new_columns:
            self._append_row(row)
        else:
            self._columns += new_columns
            self._rewrite()

    def _read(self) -> tuple[list[str], list[dict[str, str]]]:
        with open(self.filename, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter=self.separator)
            rows = [dict(r) for r in reader]
            return list(reader.fieldnames or []), rows

    def _format(self, rows: list[dict[str, str]], header: bool) -> str:
        buf = io.StringIO()
        writer = csv.DictWriter(
            buf, self._columns, restval="", delimiter=self.separator, lineterminator="\n"
        )
        if header:
            writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue()

    def _append_row(self, row: dict[str, str]) -> None:
        # Handed to the OS at once, in one write (a killed process loses no row); synced to
        # the disk at fit end, not here: an fsync per epoch costs the training thread
        # milliseconds. Through a descriptor, not a text file object: three system calls,
        # each a point where a checkpoint's writer thread may take the interpreter lock.
        data = self._format([row], header=False).encode("utf-8")
        fd = os.open(self.filename, os.O_WRONLY | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)
                     | getattr(os, "O_BINARY", 0))
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)

    def on_fit_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        if self._active and self._in_sync and os.path.exists(self.filename):
            with open(self.filename, "rb+") as f:
                os.fsync(f.fileno())

    def _rewrite(self) -> None:
        directory = os.path.dirname(os.path.abspath(self.filename))
        os.makedirs(directory, exist_ok=True)
        tmp = f"{self.filename}.tmp-{os.getpid()}"
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            f.write(self._format(self._rows, header=True))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.filename)
        self._in_sync = True


def _cell(value: Any) -> str | None:
    """A log value as CSV text; None for values that are not scalars."""
    if isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral):
        return str(int(value))
    try:
        return repr(float(value))
    except (TypeError, ValueError):
        return None


def _epoch_of(row: dict[str, str]) -> float:
    try:
        return float(row.get("epoch") or "nan")
    except ValueError:
        return math.nan
