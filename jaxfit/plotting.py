"""PNG plots of training runs: loss, metric and learning-rate curves, train against validation.

matplotlib is an optional dependency (``pip install 'jaxfit[plot]'``). Figures are drawn on the
Agg canvas directly, never through ``pyplot``: plotting from a script, a notebook or a thread does
not change the user's matplotlib backend or leave open figures behind.

Example:
    >>> from jaxfit.plotting import plot_history
    >>> history = {"loss": [1.2, 0.8, 0.6], "val_loss": [1.3, 0.9, 0.8],
    ...            "accuracy": [0.6, 0.7, 0.8], "val_accuracy": [0.55, 0.7, 0.75],
    ...            "learning_rate": [0.1, 0.05, 0.01]}
    >>> import tempfile, os
    >>> path = plot_history(history, os.path.join(tempfile.mkdtemp(), "run.png"))
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = [
    "Panel",
    "distinct_colors",
    "is_learning_rate_key",
    "plot_command",
    "plot_curves",
    "plot_history",
]

_PANEL_SIZE = (5.0, 3.6)  # inches per panel: readable at 100 dpi, legends fit
# matplotlib's tab10, then six more that stay apart from it (tab20's extra colors are lighter
# shades of the same hues, hard to tell apart in a legend).
_COLORS = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
    "#000000", "#000080", "#800000", "#e6b800", "#00a087", "#ff69b4",
)  # fmt: skip


@dataclass
class Panel:
    """One set of axes: named curves sharing an x and a y axis.

    Attributes:
        title: shown above the axes.
        xlabel, ylabel: the axis labels.
        series: curve name -> (x values, y values). ``None`` or NaN y values leave gaps.
        logy: log-scale the y axis (ignored when a value is not positive).
        colors: curve name -> matplotlib color, to keep one color per run across panels.
            Curves without one follow the default cycle (20 colors when there are more than 10).
        linestyles: curve name -> matplotlib line style (``"--"``, ``":"``), so that curves
            that coincide stay visible.
        span: how many grid columns the panel takes (a wide panel starts a new row when
            the current row has too few columns left).
        rows: how many grid rows the panel takes (a tall panel for many curves).
        legend: a matplotlib legend location, or ``"outside"`` for a legend right of the axes.

    Example:
        >>> panel = Panel("loss", "epoch", "loss", {"train": ([1, 2], [0.9, 0.5])})
        >>> sorted(panel.series)
        ['train']
    """

    title: str
    xlabel: str
    ylabel: str
    series: dict[str, tuple[Sequence[float], Sequence[float | None]]] = field(default_factory=dict)
    logy: bool = False
    colors: dict[str, str] = field(default_factory=dict)
    linestyles: dict[str, str] = field(default_factory=dict)
    span: int = 1
    rows: int = 1
    legend: str = "best"


def distinct_colors(n: int) -> list[str]:
    """``n`` colors that are easy to tell apart (16 distinct ones, then they repeat).

    Example:
        >>> distinct_colors(2)
        ['#1f77b4', '#ff7f0e']
    """
    return [_COLORS[i % len(_COLORS)] for i in range(n)]


def is_learning_rate_key(key: str) -> bool:
    """Whether a history key holds a learning rate (``lr``, ``learning_rate``, ``1.learning_rate``,
    ``lr_group0``...)."""
    name = key.lower().rsplit(".", 1)[-1]
    return name in ("lr", "learning_rate") or name.startswith(("lr_", "learning_rate_"))


def plot_curves(
    panels: Sequence[Panel],
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
    ncols: int | None = None,
    panel_size: tuple[float, float] = _PANEL_SIZE,
    dpi: int = 100,
) -> Path:
    """Draws ``panels`` in a grid and writes them to a PNG at ``path``, atomically.

    Args:
        panels: the axes to draw, row by row.
        path: the PNG to write; its folder is created. An existing file is replaced only once
            the new image is complete.
        title: a title over the whole figure.
        ncols: panels per row (default: up to 3).
        panel_size: (width, height) of one panel in inches.
        dpi: dots per inch.

    Returns:
        The path written.

    Raises:
        ValueError: no panels, or a series whose x and y lengths differ.
        ImportError: matplotlib is not installed.
    """
    if not panels:
        raise ValueError("nothing to plot: pass at least one Panel.")
    for panel in panels:
        for name, (xs, ys) in panel.series.items():
            if len(xs) != len(ys):
                raise ValueError(
                    f"panel {panel.title!r}, series {name!r}: {len(xs)} x values but {len(ys)} "
                    "y values; they must be the same length."
                )
    Figure, FigureCanvasAgg = _matplotlib()
    ncols = ncols or min(3, sum(p.span for p in panels))
    cells = _place(panels, ncols)
    nrows = max(row + rows for row, _, _, rows in cells)
    fig = Figure(figsize=(panel_size[0] * ncols, panel_size[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(nrows, ncols)
    for panel, (row, col, span, rows) in zip(panels, cells):
        _draw(fig.add_subplot(grid[row : row + rows, col : col + span]), panel)
    if title:
        fig.suptitle(title)
    return _save_atomically(fig, Path(path), dpi)


def plot_history(
    history: Any,
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
    dpi: int = 100,
    validations: Sequence[Mapping[str, Any]] | None = None,
) -> Path:
    """Plots every curve of a run: loss, each metric, each hyperparameter, train against val.

    A key ``k`` and its ``val_k`` share one panel; learning rates get a log axis when they span
    more than a factor of 10. Values are per epoch, as in ``History.history``. A run that
    ended no epoch (trained by ``max_steps`` on a stream) is drawn from its validations
    instead (``History.validations``, or ``validations=``): each value against the step.

    Args:
        history: a ``jaxfit.History`` (or anything with a ``history`` dict) or a dict of
            ``{key: [value per epoch]}``.
        path: the PNG to write (see :func:`plot_curves`).
        title: a title over the figure.
        dpi: dots per inch.

    Returns:
        The path written.

    Raises:
        ValueError: the history holds no numeric series.
    """
    logs = _as_dict(history)
    if validations is None:
        validations = getattr(history, "validations", None)
    if not logs and validations:
        return plot_curves(_by_step(validations), path, title=title, dpi=dpi)
    panels = []
    for key in _ordered_keys(logs):
        series: dict[str, tuple[Sequence[float], Sequence[float | None]]] = {}
        if key in logs:
            series["train" if f"val_{key}" in logs else key] = _xy(logs[key])
        if f"val_{key}" in logs:
            series["val"] = _xy(logs[f"val_{key}"])
        lr = is_learning_rate_key(key)
        values = [y for _, ys in series.values() for y in ys if y is not None and y == y]
        logy = lr and min(values, default=0) > 0 and max(values) > 10 * min(values)
        panels.append(Panel(_label(key), "epoch", _label(key), series, logy=logy))
    if not panels:
        raise ValueError(
            f"the history has no numeric series to plot (keys: {sorted(logs) or 'none'}); "
            "plot it after fit has run at least one epoch."
        )
    return plot_curves(panels, path, title=title, dpi=dpi)


def plot_command(
    run: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *, dpi: int = 100
) -> Path:
    """Plots the history saved in a run's newest valid checkpoint (``python -m jaxfit plot``).

    Only the checkpoint's msgpack state is read, never the pickled recipe: plotting a run
    someone else wrote runs none of their code.

    Args:
        run: a run directory (its newest checkpoint that verifies) or one checkpoint directory.
        out: the PNG to write; by default ``history.png`` in the run directory.
        dpi: dots per inch.

    Returns:
        The path written.

    Raises:
        FileNotFoundError: ``run`` does not exist.
        jaxfit.checkpoint.CheckpointError: no valid checkpoint there.
        ValueError: the checkpoint was taken before the first epoch ended (no history yet).
    """
    from jaxfit.checkpoint import read_checkpoint

    ckpt_dir, manifest, state = read_checkpoint(Path(run))
    history = (state.get("history") or {}).get("history") or {}
    validations = (state.get("history") or {}).get("validations") or []
    if not history and not validations:
        raise ValueError(
            f"{ckpt_dir} holds no history yet: it was saved before the first epoch ended and "
            "before any validation. Plot a later checkpoint, or let the run finish an epoch."
        )
    path = Path(out) if out is not None else ckpt_dir.parent / "history.png"
    title = f"{ckpt_dir.parent.name}: epoch {manifest.get('epoch')}, step {manifest.get('step')}"
    return plot_history(history, path, title=title, dpi=dpi, validations=validations)


def _by_step(validations: Sequence[Mapping[str, Any]]) -> list[Panel]:
    """One panel per validation log key, its values against the step."""
    keys = _ordered_keys({k: None for rec in validations for k in rec if k not in ("step", "epoch")})
    panels = []
    for base in keys:
        key = base if any(base in rec for rec in validations) else f"val_{base}"
        recs = [rec for rec in validations if key in rec]
        series: dict[str, tuple[Sequence[float], Sequence[float | None]]] = {
            key: ([float(r["step"]) for r in recs], [float(r[key]) for r in recs])}
        panels.append(Panel(_label(key), "step", _label(key), series))
    return panels


def _as_dict(history: Any) -> dict[str, list[float | None]]:
    logs = getattr(history, "history", history)
    if not isinstance(logs, Mapping):
        raise TypeError(
            "plot_history expects a jaxfit History or a dict of {key: [value per epoch]}, "
            f"got {type(history).__name__}."
        )
    out = {}
    for key, values in logs.items():
        try:
            out[str(key)] = [None if v is None else float(v) for v in values]
        except (TypeError, ValueError):
            continue  # non-numeric entries (e.g. stop reasons) are not curves
    return {k: v for k, v in out.items() if v}


def _ordered_keys(logs: Mapping[str, Any]) -> list[str]:
    """Base keys, loss first, then metrics, then learning rates / other hyperparameters."""
    bases = []
    for key in logs:
        base = key[4:] if key.startswith("val_") else key
        if base not in bases:
            bases.append(base)

    def rank(key: str) -> int:
        return 0 if key == "loss" else 2 if is_learning_rate_key(key) else 1

    return sorted(bases, key=rank)  # sort is stable: first-seen order within a rank


def _label(key: str) -> str:
    return "learning rate" if is_learning_rate_key(key) and "." not in key else key


def _xy(values: Sequence[float | None]) -> tuple[list[int], list[float | None]]:
    return list(range(1, len(values) + 1)), list(values)


def _place(panels: Sequence[Panel], ncols: int) -> list[tuple[int, int, int, int]]:
    """(row, column, columns, rows) of each panel: row by row, left to right, into the first
    cells that are free (a panel taller than one row keeps its cells below it taken)."""
    taken: set[tuple[int, int]] = set()
    cells, row, col = [], 0, 0
    for panel in panels:
        span, rows = max(1, min(panel.span, ncols)), max(1, panel.rows)
        while True:
            if col + span > ncols:
                row, col = row + 1, 0
                continue
            block = {(r, c) for r in range(row, row + rows) for c in range(col, col + span)}
            if not block & taken:
                break
            col += 1
        taken |= block
        cells.append((row, col, span, rows))
        col += span
    return cells


def _draw(ax: Any, panel: Panel) -> None:
    many = len(panel.series) > 6
    if len(panel.series) > 10:  # the default cycle has 10 colors: curves would share them
        ax.set_prop_cycle(color=distinct_colors(len(panel.series)))
    for name, (xs, ys) in panel.series.items():
        ys = [math.nan if y is None else y for y in ys]
        marker = "o" if len(xs) <= 30 and not many else None
        style = {"color": panel.colors[name]} if name in panel.colors else {}
        style["linestyle"] = panel.linestyles.get(name, "-")
        ax.plot(xs, ys, label=name, marker=marker, markersize=3, linewidth=1.5, **style)
    finite = [y for _, ys in panel.series.values() for y in ys if y is not None and y == y]
    if panel.logy and finite and min(finite) > 0:
        ax.set_yscale("log")
    if all(float(x).is_integer() for xs, _ in panel.series.values() for x in xs):
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))  # no "epoch 1.5"
    # Long titles (schedule names) in narrow panels would run into their neighbours.
    ax.set_title(panel.title, fontsize="large" if len(panel.title) <= 20 else "medium")
    ax.set_xlabel(panel.xlabel)
    ax.set_ylabel(panel.ylabel)
    ax.grid(True, alpha=0.3)
    if len(panel.series) > 1:
        size = "small" if many else "medium"
        if panel.legend == "outside":
            ax.legend(fontsize=size, loc="center left", bbox_to_anchor=(1.01, 0.5),
                      ncols=2 if len(panel.series) > 10 else 1)  # fmt: skip
        else:
            ax.legend(fontsize=size, ncols=2 if many else 1, loc=panel.legend)


def _save_atomically(fig: Any, path: Path, dpi: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=dpi)
            # mkstemp creates the file 0600; a picture is an ordinary user file, so give it
            # the mode open() would (0666 less the umask).
            os.fchmod(f.fileno(), 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _umask() -> int:
    """The process umask. Linux shows it in /proc; elsewhere it is read by setting it (and
    putting it straight back), the only portable way."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _matplotlib() -> tuple[Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(
            "plotting needs matplotlib, an optional dependency: pip install 'jaxfit[plot]'"
        ) from e
    return Figure, FigureCanvasAgg
