"""Text pieces of RichProgress: durations, rates, values, the epoch row and the summary."""

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
    epochs: int,
    logs: dict[str, Any],
    seconds: float,
    steps_per_s: float | None,
    batch_size: int | None,
) -> str:
    """The plain-mode line of one epoch."""
    speed = rates(steps_per_s, batch_size)
    return f"Epoch {epoch}/{epochs} - {duration(seconds)} - {speed} - {values(logs)}"


def epoch_table(columns: Sequence[str], row: dict[str, Any], header: bool) -> Table:
    """One row of the per-epoch table; fixed widths so the rows printed one by one align."""
    table = Table(
        box=None, show_header=header, header_style="bold", pad_edge=False, show_edge=False
    )
    for name in columns:
        table.add_column(name, justify="right", width=max(len(name), 10), no_wrap=True)
    table.add_row(*(row.get(name, "-") for name in columns))
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
) -> str:
    """The closing line of a fit."""
    parts = [
        f"Trained {epochs_done} epoch{'s' if epochs_done != 1 else ''} ({steps} steps) "
        f"in {duration(wall)}"
    ]
    if first_step is not None:
        parts.append(f"first step (with compilation) {duration(first_step)}")
    parts.append(rates(steps_per_s, batch_size))
    if stop_reason:
        parts.append(f"stopped: {stop_reason}")
    text = "; ".join(parts)
    return f"{text}\n{values(last)}" if last else text
