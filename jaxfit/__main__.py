"""``python -m jaxfit``: command-line tools for runs.

    python -m jaxfit info RUN            a table of the run's checkpoints
    python -m jaxfit resume RUN          Trainer.load(RUN).fit()
    python -m jaxfit plot RUN            a PNG of the run's loss, metric and learning-rate curves

A subcommand is one function decorated with :func:`command`: its positional parameters
become positional arguments, its keyword parameters ``--options`` (a ``bool`` default makes a
flag), its docstring's first line the help text. It returns the exit status.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

COMMANDS: dict[str, Callable[..., int]] = {}


def command(fn: Callable[..., int]) -> Callable[..., int]:
    """Registers ``fn`` as the subcommand named after it (underscores become dashes)."""
    COMMANDS[fn.__name__.replace("_", "-")] = fn
    return fn


def _add_parameters(parser: argparse.ArgumentParser, fn: Callable[..., int]) -> None:
    for param in inspect.signature(fn).parameters.values():
        if param.default is inspect.Parameter.empty:
            parser.add_argument(param.name)
        elif isinstance(param.default, bool):
            # Off by default: --name; on by default: --no-name turns it off.
            action = argparse.BooleanOptionalAction if param.default else "store_true"
            parser.add_argument(f"--{param.name.replace('_', '-')}", dest=param.name,
                                action=action, default=param.default)
        else:
            kind = type(param.default) if param.default is not None else _annotated_type(param)
            parser.add_argument(f"--{param.name.replace('_', '-')}", dest=param.name,
                                type=kind, default=param.default)


def _annotated_type(param: inspect.Parameter) -> Callable[[str], object]:
    text = str(param.annotation)
    return int if "int" in text else float if "float" in text else str


def _format_size(nbytes: int | None) -> str:
    if nbytes is None:
        return "-"
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return ""  # unreachable


def _metric_items(metrics: dict, monitor: str | None, short: bool) -> list[tuple[str, bool]]:
    """``("key=value", is_monitor)`` per metric, the monitored one first."""
    items = []
    for key in sorted(metrics, key=lambda k: (k != monitor, k)):
        value = metrics[key]
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        items.append((f"{_abbreviate(key) if short else key}={text}", key == monitor))
    return items


def _abbreviate(key: str) -> str:
    # The same abbreviations as RichProgress (callbacks/_progress_format.abbreviate), kept
    # here so that `info` imports neither the plugins nor JAX.
    short = "v_" + key[4:] if key.startswith("val_") else key
    for long, abbr in (("learning_rate", "lr"), ("accuracy", "acc"), ("top_", "top")):
        short = short.replace(long, abbr)
    return short


def _format_metrics(items: list[tuple[str, bool]], width: int) -> str:
    """The items as rich markup, one line per as many whole items as fit in ``width``."""
    lines: list[list[str]] = []
    used = 0
    for text, bold in items:
        shown = f"[bold]{text}[/bold]" if bold else text
        if lines and used + 1 + len(text) <= width:
            lines[-1].append(shown)
            used += 1 + len(text)
        else:
            lines.append([shown])
            used = len(text)
    return "\n".join(" ".join(line) for line in lines) or "-"


# (name, justify, droppable) of the info table, in display order. When the terminal is too
# narrow for a readable metrics column, droppable columns go first (size, then step, which
# the checkpoint's name also holds), then metric names are abbreviated.
_INFO_COLUMNS = [("checkpoint", "left"), ("step", "right"), ("epoch", "right"),
                 ("metrics", "left"), ("size", "right"), ("valid", "left"),
                 ("latest", "center"), ("best", "center")]  # fmt: skip
_DROP_ORDER = ("size", "step")
_MIN_METRICS = 28  # room for two or three "key=value" items per line


def _info_layout(width: int, cells: list[dict[str, str]], metric_items: list[list[tuple[str, bool]]]
                 ) -> tuple[list[str], bool, int]:
    """(columns shown, abbreviate metric names, metrics column width) for ``width``."""
    def need(name: str) -> int:
        longest = max((len(c[name]) for c in cells), default=0)
        if name == "valid":  # "no: <problem>" wraps; "valid" and "yes" must not
            longest = min(longest, 12)
        return max(len(name), longest)

    columns = [name for name, _ in _INFO_COLUMNS]
    plans = [(columns, False)]
    for dropped in range(1, len(_DROP_ORDER) + 1):
        plans.append(([c for c in columns if c not in _DROP_ORDER[:dropped]], False))
    plans.append((plans[-1][0], True))
    for shown, short in plans:
        fixed = sum(need(c) + 3 for c in shown if c != "metrics") + 4  # borders and padding
        room = width - fixed
        widest = max((len(_abbreviate(t) if short else t) for items in metric_items
                      for t, _ in items), default=1)  # fmt: skip
        if room >= min(_MIN_METRICS, widest):
            return shown, short, room
    return plans[-1][0], True, max(room, 10)


@command
def info(run: str, verify: bool = True) -> int:
    """Show the checkpoints of a run: step, epoch, metrics, size, valid, latest, best."""
    from rich.console import Console
    from rich.table import Table

    from jaxfit.checkpoint import _manifest, _retention

    path = Path(run)
    if not path.is_dir():
        print(f"error: {path} is not a run directory", file=sys.stderr)
        return 2
    run_dir = path.parent if _manifest.is_checkpoint_dir(path) else path
    infos = _manifest.scan(run_dir)
    valid = {i.name for i in infos if (i.verify() if verify else i.manifest is not None)}
    monitors = [i.manifest.get("monitor") for i in infos
                if i.manifest and i.manifest.get("monitor")]  # fmt: skip
    monitor = monitors[-1] if monitors else None
    mode = next((i.manifest.get("mode") for i in reversed(infos)
                 if i.manifest and i.manifest.get("monitor") == monitor), None)
    entries = [_retention.Entry(i.name, i.seq, _retention.score_of(i.metrics, monitor))
               for i in infos if i.name in valid]
    best = {e.name for e in _retention.best_entries(entries, 1, mode)}
    newest = max((i for i in infos if i.name in valid), key=lambda i: i.seq, default=None)
    pointer = _manifest.read_latest_pointer(run_dir)

    title = f"{run_dir}  ({len(infos)} checkpoints"
    title += f", best by {monitor} ({mode}))" if monitor else ")"
    rows: list[dict[str, str]] = []
    for i in infos:
        size = None
        if i.manifest:
            size = sum(f.get("size", 0) for f in i.manifest["files"].values()
                       if isinstance(f, dict))
        epoch = "-" if i.manifest is None else (
            f"{i.epoch}" if not i.manifest["batch_in_epoch"]
            else f"{i.epoch} +{i.manifest['batch_in_epoch']} batches")
        problem = (i.problem or "?").replace(f"{i.path}{os.sep}", "").replace(str(run_dir), ".")
        status = "[green]yes[/green]" if i.name in valid else f"[red]no[/red]: {problem}"
        latest = "●" if newest is not None and i.name == newest.name else (
            "○" if i.name == pointer else "")
        rows.append({"checkpoint": i.name, "step": "-" if i.step is None else str(i.step),
                     "epoch": epoch, "size": _format_size(size), "valid": status,
                     "latest": latest, "best": "★" if i.name in best else ""})  # fmt: skip
    console = Console()
    plain = [dict(r, valid=r["valid"].replace("[green]", "").replace("[/green]", "")
                  .replace("[red]", "").replace("[/red]", "")) for r in rows]  # fmt: skip
    full = [_metric_items(i.metrics, monitor, False) for i in infos]
    shown, short, room = _info_layout(console.width, plain, full)
    table = Table(title=title, title_justify="left")
    justify = dict(_INFO_COLUMNS)
    for name in shown:
        table.add_column(name, justify=justify[name],  # type: ignore[arg-type]
                         no_wrap=name not in ("metrics", "valid"), overflow="fold")
    for i, row in zip(infos, rows):
        row["metrics"] = _format_metrics(_metric_items(i.metrics, monitor, short), room)
        table.add_row(*(row[name] for name in shown))
    console.print(table)
    if newest is None:
        console.print("[red]no valid checkpoint: this run cannot be resumed[/red]")
    else:
        # One soft-wrapped line: the command stays whole when copied from the terminal.
        console.print(f"resume with: python -m jaxfit resume {run_dir}", soft_wrap=True)
    return 0 if newest is not None else 1


@command
def resume(run: str, epochs: int | None = None, trusted: bool = False) -> int:
    """Continue a run: Trainer.load(RUN).fit() (loading unpickles the run's recipe)."""
    from jaxfit import Trainer
    from jaxfit.errors import JaxfitError

    try:
        trainer = Trainer.load(run, trusted=trusted)
        print(f"resuming {run} at epoch {trainer.epoch}, step {trainer.step}", file=sys.stderr)
        trainer.fit(epochs=epochs)
    except (JaxfitError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


@command
def plot(run: str, out: str | None = None) -> int:
    """Write a PNG of a run's loss, metric and learning-rate curves (default RUN/history.png)."""
    from jaxfit.errors import JaxfitError
    from jaxfit.plotting import plot_command

    try:
        # Reads the checkpoint's msgpack state only: plotting never unpickles the recipe.
        path = plot_command(run, out)
    except (JaxfitError, FileNotFoundError, ValueError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parses ``argv`` and runs the chosen subcommand; returns its exit status."""
    parser = argparse.ArgumentParser(prog="python -m jaxfit",
                                     description="Command-line tools for jaxfit runs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, fn in COMMANDS.items():
        doc = (inspect.getdoc(fn) or "").split("\n")[0]
        _add_parameters(sub.add_parser(name, help=doc, description=doc), fn)
    args = vars(parser.parse_args(argv))
    return COMMANDS[args.pop("command")](**args)


if __name__ == "__main__":
    sys.exit(main())
