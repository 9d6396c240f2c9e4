"""Which checkpoints of a run to keep.

"Latest" and "best" are separate guarantees: the ``keep_last`` newest checkpoints are kept
whatever their scores, and the ``keep_best`` best-scoring ones are kept on top of them. A
best checkpoint never pushes out the newest one (orbax#526 deleted the newest checkpoints to
keep the best, leaving nothing to resume from).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Entry:
    """What retention needs to know about a checkpoint: name, write order, monitored score."""

    name: str
    seq: int
    score: float | None = None


def score_of(metrics: dict, monitor: str | None) -> float | None:
    """The monitored value in a manifest's metrics, or None when absent or not finite."""
    if monitor is None:
        return None
    value = metrics.get(monitor)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def best_entries(entries: Iterable[Entry], keep_best: int | None, mode: str | None) -> list[Entry]:
    """The ``keep_best`` best-scoring entries, best first; ties go to the earlier one."""
    scored = [(e.score, e) for e in entries if e.score is not None]
    if mode is None or not scored:
        return []
    sign = -1.0 if mode == "max" else 1.0
    ranked = [e for _, e in sorted(scored, key=lambda se: (sign * se[0], se[1].seq))]
    return ranked if keep_best is None else ranked[:keep_best]


def select_keep(entries: Sequence[Entry], *, keep_last: int | None, keep_best: int | None,
                mode: str | None) -> set[str]:
    """Names of the entries to keep.

    Args:
      entries: every checkpoint of the run whose manifest could be read.
      keep_last: how many of the newest to keep (None keeps all).
      keep_best: how many of the best-scoring to keep in addition (None keeps every scored one).
      mode: "min" or "max" for the score, or None when nothing is monitored.

    Returns:
      The union of the ``keep_last`` newest and the ``keep_best`` best names.
    """
    newest = sorted(entries, key=lambda e: e.seq, reverse=True)
    keep = {e.name for e in (newest if keep_last is None else newest[:keep_last])}
    keep.update(e.name for e in best_entries(entries, keep_best, mode))
    return keep
