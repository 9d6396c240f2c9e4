"""Text pieces of RichProgress: durations, rates, values, the epoch row and the summary, and
their layout for the width of the terminal (fewer columns first, then abbreviations)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from rich.table import Table


def duration(seconds: float | None) -> str:
    """``"1:02:03"``, ``"2:03"``, ``"4.2s"``; ``"?"`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def number(value: Any) -> str:
    """A metric or hyperparameter value in 4 significant digits; ``"-"`` when missing."""
    if value is None:
        return "-"
    try:
        value = float(value)
    except (TypeError, ValueError):
        return str(value)
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"{value:.3e}"
    return f"{value:.4f}"


def rates(steps_per_s: float | None, batch_size: int | None) -> str:
    """``"512.0 steps/s, 16384 samples/s"`` (samples only when the batch size is known)."""
    if steps_per_s is None:
        return "- steps/s"
    text = f"{steps_per_s:.1f} steps/s"
    if batch_size:
        text += f", {steps_per_s * batch_size:.0f} samples/s"
    return text


def values(named: dict[str, Any]) -> str:
    """``"loss 0.1234  accuracy 0.9500  lr 1.000e-03"``."""
    return "  ".join(f"{k} {number(v)}" for k, v in named.items())


def epoch_line(
    epoch: int,
    epochs: int | None,
    logs: dict[str, Any],
    seconds: float,
    steps_per_s: float | None,
    batch_size: int | None,
) -> str:
    """The plain-mode line of one epoch."""
    speed = rates(steps_per_s, batch_size)
    return f"Epoch {of(epoch, epochs)} - {duration(seconds)} - {speed} - {values(logs)}"


def of(done: int, total: int | None) -> str:
    """``"3/10"``, or ``"3"`` when the total is unknown (epochs of a stream ended by
    ``max_steps``, with no ``steps_per_epoch``)."""
    return f"{done}" if total is None else f"{done}/{total}"


def validation_line(step: int, max_steps: int | None, logs: dict[str, Any]) -> str:
    """The line of a validation every ``validation_steps_freq`` steps."""
    return f"Step {of(step, max_steps)} - {values(logs)}"


def abbreviate(name: str) -> str:
    """A shorter log key for narrow terminals: ``val_accuracy`` -> ``v_acc``,
    ``learning_rate`` -> ``lr``, ``top_5_accuracy`` -> ``top5_acc``."""
    short = "v_" + name[4:] if name.startswith("val_") else name
    for long, abbr in _ABBREVIATIONS:
        short = short.replace(long, abbr)
    return short


_ABBREVIATIONS = (
    ("learning_rate", "lr"),
    ("accuracy", "acc"),
    ("top_", "top"),
    ("momentum", "mom"),
    ("weight_decay", "wd"),
)


def value_lines(named: dict[str, Any], width: int) -> list[str]:
    """``"name value"`` items in as few lines of at most ``width`` columns as they fit.

    Full names when all fit on one line, abbreviated names otherwise; an item is never cut
    (a line holds at least one).
    """
    items = [f"{k} {number(v)}" for k, v in named.items()]
    if len("  ".join(items)) > width:
        items = [f"{abbreviate(k)} {number(v)}" for k, v in named.items()]
    return pack(items, "  ", width)


def pack(items: Sequence[str], sep: str, width: int) -> list[str]:
    """``items`` joined by ``sep`` into lines of at most ``width`` columns, none cut (a line
    holds at least one item, however long)."""
    lines: list[str] = []
    for item in items:
        if lines and len(lines[-1]) + len(sep) + len(item) <= width:
            lines[-1] += sep + item
        else:
            lines.append(item)
    return lines


MIN_BAR, MAX_BAR = 10, 40


def bar_layout(
    width: int, label: str, counter: str, speed: str, eta: str
) -> tuple[int, list[str]]:
    """The bar's width and the pieces shown after the counter on a line of ``width``.

    The label, a bar of at least ``MIN_BAR`` columns and the counter always stay. What room
    is left takes, in this order of importance: the epoch's ETA, steps/s, the fit's ETA,
    samples/s (``speed`` is ``rates(...)``, ``eta`` ``"4.2s (fit 1:02)"``); the bar then
    grows into what is left, up to ``MAX_BAR``.
    """
    steps, _, samples = speed.partition(", ")
    epoch_eta, _, fit_eta = eta.partition(" ")
    wanted = [  # (importance, display position, text)
        (0, 2, f"ETA {epoch_eta}"),
        (1, 0, steps),
        (2, 3, fit_eta),
        (3, 1, samples),
    ]
    room = width - len(label) - len(counter) - MIN_BAR - 2  # two separating spaces
    chosen: list[tuple[int, str]] = []
    for _, position, text in sorted(wanted):
        if text and len(text) + 1 <= room:
            chosen.append((position, text))
            room -= len(text) + 1
    pieces = [text for _, text in sorted(chosen)]
    bar = MIN_BAR + min(room, MAX_BAR - MIN_BAR) if room > 0 else max(1, MIN_BAR + room)
    return bar, pieces


class TableLayout:
    """Which columns the per-epoch table shows, their headers and widths, for a width.

    Decided once, at the first row (the rows are printed one by one and must align):

    1. every column with its full name;
    2. fewer columns: ``steps/s`` goes, then ``time``;
    3. abbreviated headers (:func:`abbreviate`);
    4. the hyperparameter columns go (the live bar still shows them).

    ``fits`` is False when even that is too wide: RichProgress then prints each epoch as
    value lines instead of a table row.
    """

    NUMBER = 9  # the widest number(): "-1.234e-05" less the sign most values lack

    def __init__(
        self, width: int, epochs_label: str, keys: Sequence[str], hyperparams: Sequence[str]
    ) -> None:
        extra = ["time", "steps/s"]
        plans = [
            (list(keys) + extra, False),
            (list(keys) + extra[:1], False),
            (list(keys), False),
            (list(keys), True),
            ([k for k in keys if k not in hyperparams], True),
        ]
        for columns, short in plans:
            headers = {k: abbreviate(k) if short and k not in extra else k for k in columns}
            widths = {k: self._width(k, headers[k]) for k in columns}
            widths["epoch"] = max(len("epoch"), len(epochs_label))
            total = sum(widths.values()) + 2 * len(columns)  # two spaces between columns
            if total <= width:
                break
        self.columns, self.headers, self.widths = ["epoch", *columns], headers, widths
        self.headers["epoch"] = "epoch"
        self.fits = total <= width

    def _width(self, key: str, header: str) -> int:
        if key == "time":
            return max(len(header), 7)  # "1:02:03"
        if key == "steps/s":
            return max(len(header), 7)
        return max(len(header), self.NUMBER)

    def table(self, row: dict[str, Any], header: bool) -> Table:
        """One row of the table (with the header row when ``header``)."""
        table = Table(
            box=None, show_header=header, header_style="bold", pad_edge=False, show_edge=False
        )
        for key in self.columns:
            table.add_column(self.headers[key], justify="right", width=self.widths[key],
                             no_wrap=True)  # fmt: skip
        table.add_row(*(row.get(key, "-") for key in self.columns))
        return table


def summary(
    epochs_done: int,
    steps: int,
    wall: float,
    first_step: float | None,
    steps_per_s: float | None,
    batch_size: int | None,
    stop_reason: str | None,
    last: dict[str, Any],
    setup: float | None = None,
    width: int | None = None,
) -> str:
    """The closing line of a fit: ``wall`` is the whole ``fit`` call, ``setup`` its part
    before training starts (data, model initialisation, checks), ``first_step`` the first
    execution's (compilation included).

    With a ``width`` (a terminal), the line breaks between its parts and the values wrap
    at whole items, so nothing is cut mid-word; without, it is one line and one of values
    (for logs).
    """
    parts = [
        f"Trained {epochs_done} epoch{'s' if epochs_done != 1 else ''} ({steps} steps) "
        f"in {duration(wall)}"
    ]
    if setup is not None:
        parts.append(f"set-up {duration(setup)}")
    if first_step is not None:
        parts.append(f"first step (with compilation) {duration(first_step)}")
    parts.append(rates(steps_per_s, batch_size))
    if stop_reason:
        parts.append(f"stopped: {stop_reason}")
    if width is None:
        text = "; ".join(parts)
        return f"{text}\n{values(last)}" if last else text
    return "\n".join(pack(parts, "; ", width) + value_lines(last, width))
