"""RichProgress for the width it has, and Keras's verbose: the layout functions, the live
display on consoles of 80 and 160 columns, verbose=0/1/2, the progress entry point."""

from __future__ import annotations

import io
import re
from importlib.metadata import entry_points

import pytest
from cb_helpers import tiny_data
from conftest import MLP, make_trainer
from rich.console import Console

from jaxfit import ConfigError
from jaxfit.callbacks import RichProgress
from jaxfit.callbacks import _progress_format as fmt

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def fit(progress, epochs=2):
    trainer = make_trainer()
    trainer.fit(MLP(), tiny_data(), validation_data=tiny_data(16, seed=1), epochs=epochs,
                batch_size=16, callbacks=[progress])  # fmt: skip
    return trainer


@pytest.mark.parametrize("name, short", [
    ("val_accuracy", "v_acc"), ("learning_rate", "lr"), ("top_5_accuracy", "top5_acc"),
    ("val_top_5_accuracy", "v_top5_acc"), ("loss", "loss"), ("val_loss", "v_loss"),
])  # fmt: skip
def test_abbreviate(name, short):
    assert fmt.abbreviate(name) == short


def test_value_lines_keep_full_names_when_they_fit_and_never_cut_an_item():
    named = {"loss": 0.5, "accuracy": 0.25, "val_loss": 0.5, "val_accuracy": 0.25,
             "learning_rate": 0.01}  # fmt: skip
    assert fmt.value_lines(named, 160) == [
        "loss 0.5000  accuracy 0.2500  val_loss 0.5000  val_accuracy 0.2500  learning_rate 0.0100"
    ]
    narrow = fmt.value_lines(named, 30)
    assert narrow == ["loss 0.5000  acc 0.2500", "v_loss 0.5000  v_acc 0.2500", "lr 0.0100"]
    assert all(len(line) <= 30 for line in narrow)


@pytest.mark.parametrize("width", [40, 60, 80, 160])
def test_bar_layout_keeps_label_bar_and_counter_and_fits(width):
    speed, eta = "1234.5 steps/s, 79008 samples/s", "1:02 (fit 1:02:03)"
    bar, pieces = fmt.bar_layout(width, "Epoch 12/15", "17/23", speed, eta)
    assert bar >= fmt.MIN_BAR
    used = len("Epoch 12/15") + 1 + bar + 1 + len("17/23") + sum(len(p) + 1 for p in pieces)
    assert used <= width
    # What is shown comes in importance order: the ETA first, samples/s last.
    order = ["ETA 1:02", "1234.5 steps/s", "(fit 1:02:03)", "79008 samples/s"]
    assert set(pieces) == set(order[: len(pieces)])


def test_bar_layout_at_160_shows_everything_with_the_widest_bar():
    bar, pieces = fmt.bar_layout(160, "Epoch 1/15", "3/23", "512.0 steps/s, 32768 samples/s",
                                 "4.2s (fit 1:02)")  # fmt: skip
    assert bar == fmt.MAX_BAR
    assert pieces == ["512.0 steps/s", "32768 samples/s", "ETA 4.2s", "(fit 1:02)"]


def test_table_layout_drops_columns_then_abbreviates():
    keys = ["loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"]
    wide = fmt.TableLayout(160, "15/15", keys, ["learning_rate"])
    assert wide.columns == ["epoch", *keys, "time", "steps/s"] and wide.fits
    assert fmt.TableLayout(80, "15/15", keys, ["learning_rate"]).columns[-1] == "time"
    short = fmt.TableLayout(62, "15/15", keys, ["learning_rate"])
    assert short.columns == ["epoch", *keys] and short.headers["val_accuracy"] == "v_acc"
    assert not fmt.TableLayout(20, "15/15", keys, ["learning_rate"]).fits


@pytest.mark.parametrize("width", [80, 160])
def test_live_display_fits_the_console_width(width):
    out = io.StringIO()
    console = Console(file=out, width=width, force_terminal=True, color_system=None)
    fit(RichProgress(console=console), epochs=3)
    text = ANSI.sub("", out.getvalue()).replace("\r", "\n")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert all(len(ln) <= width for ln in lines), [ln for ln in lines if len(ln) > width]
    header = next(ln for ln in lines if ln.split()[:2] == ["epoch", "loss"])
    assert header.split()[2:5] == ["accuracy", "val_loss", "val_accuracy"]
    assert ("steps/s" in header.split()) == (width == 160)
    assert re.search(r"^Epoch 3/3 [━╸╺ ]+ 4/4\b", text, re.M), text  # label, bar, counter
    assert re.search(r"^Trained 3 epochs \(12 steps\) in ", text, re.M)


def test_verbose_2_prints_one_line_per_epoch_even_on_a_terminal():
    out = io.StringIO()
    console = Console(file=out, width=200, force_terminal=True, color_system=None)
    fit(RichProgress(verbose=2, console=console), epochs=3)
    lines = ANSI.sub("", out.getvalue()).splitlines()
    assert [ln.split(" - ")[0] for ln in lines[:3]] == ["Epoch 1/3", "Epoch 2/3", "Epoch 3/3"]
    assert "━" not in out.getvalue()  # no bar was drawn
    assert lines[3].startswith("Trained 3 epochs")


def test_verbose_0_prints_nothing():
    out = io.StringIO()
    fit(RichProgress(verbose=0, console=Console(file=out, force_terminal=True)), epochs=1)
    assert out.getvalue() == ""


@pytest.mark.parametrize("kwargs, match", [
    (dict(verbose=3), r"verbose must be 0 \(silent\), 1 \(live bar\) or 2 .*got verbose = 3"),
    (dict(verbose=True), "got verbose = True"),
    (dict(verbose=2, live=True), "verbose=2 prints one line per epoch and no bar"),
])  # fmt: skip
def test_bad_verbose_fails_at_construction(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        RichProgress(**kwargs)


def test_the_summary_tells_set_up_from_first_step_and_the_whole_fit():
    out = io.StringIO()
    fit(RichProgress(console=Console(file=out, width=200)), epochs=1)
    summary = next(ln for ln in out.getvalue().splitlines() if ln.startswith("Trained"))
    assert re.match(r"Trained 1 epoch \(4 steps\) in \S+; set-up \S+; first step \(with "
                    r"compilation\) \S+; ", summary), summary  # fmt: skip


def test_is_progress_and_the_default_progress_entry_point():
    assert RichProgress.is_progress is True
    found = [ep for ep in entry_points(group="jaxfit.progress") if ep.name == "default"]
    if not found:
        # Not installed from this checkout's pyproject (a source-tree run): read it there.
        from pathlib import Path

        import tomllib

        meta = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
        target = meta["project"]["entry-points"]["jaxfit.progress"]["default"]
    else:
        target = found[0].value
    assert target == "jaxfit.callbacks:RichProgress"
    module, _, name = target.partition(":")
    import importlib

    factory = getattr(importlib.import_module(module), name)
    assert isinstance(factory(verbose=2), RichProgress)
