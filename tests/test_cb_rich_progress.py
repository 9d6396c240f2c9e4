"""RichProgress: live and plain output, values fetched only at refresh, compile time left out."""

from __future__ import annotations

import io
import re

import cloudpickle
import numpy as np
import pytest
from cb_helpers import tiny_data
from conftest import MLP, make_trainer
from rich.console import Console

import jaxfit.callbacks.rich_progress as rich_progress
from jaxfit import ConfigError, MonitorError
from jaxfit.callbacks import EarlyStopping, LambdaCallback, RichProgress


class FakeClock:
    """Stands in for the ``time`` module of rich_progress: time moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(rich_progress, "time", fake)
    return fake


def plain_console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=200), out


def live_console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=200, force_terminal=True, color_system=None), out


def fit(progress, epochs=2, extra=(), **kw):
    trainer = make_trainer()
    trainer.fit(
        MLP(),
        tiny_data(),
        validation_data=tiny_data(16, seed=1),
        epochs=epochs,
        batch_size=16,
        callbacks=[progress, *extra],
        **kw,
    )
    return trainer


def test_plain_mode_prints_one_line_per_epoch_and_a_summary():
    console, out = plain_console()
    assert not console.is_terminal
    fit(RichProgress(console=console), epochs=3)
    lines = out.getvalue().splitlines()
    assert len(lines) == 5  # 3 epochs, the summary and its values line
    for epoch, line in enumerate(lines[:3], start=1):
        assert re.match(
            rf"Epoch {epoch}/3 - \S+ - [\d.]+ steps/s, \d+ samples/s - loss \d\.\d{{4}}  accuracy "
            r"\d\.\d{4}  val_loss \d\.\d{4}  val_accuracy \d\.\d{4}  learning_rate 0\.1000$",
            line,
        )
    assert lines[3].startswith("Trained 3 epochs (12 steps) in ")
    assert "first step (with compilation)" in lines[3]


def test_plain_lines_written_straight_to_a_file_are_what_rich_prints(clock):
    # A plain console's lines skip rich's rendering; a recording console renders them.
    outputs = []
    for record in (False, True):
        out = io.StringIO()
        console = Console(file=out, width=200, record=record)
        fit(RichProgress(console=console), epochs=3)
        outputs.append(out.getvalue())
    assert outputs[0] == outputs[1]
    assert outputs[0].count("\n") == 5 and outputs[0].startswith("Epoch 1/3 - ")


def test_live_mode_prints_a_table_row_per_epoch_and_a_summary():
    console, out = live_console()
    assert console.is_terminal
    fit(RichProgress(console=console), epochs=3)
    # Drop cursor and erase codes; the live bar is redrawn after a carriage return.
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue()).replace("\r", "\n")
    assert "Epoch 3/3" in text  # the live bar
    header = [ln for ln in text.splitlines() if "val_accuracy" in ln and "steps/s" in ln]
    assert len(header) == 1  # printed with the first row only
    assert header[0].split() == [
        "epoch",
        "loss",
        "accuracy",
        "val_loss",
        "val_accuracy",
        "learning_rate",
        "time",
        "steps/s",
    ]
    rows = re.findall(r"^\s+([123])/3\s+\d\.\d{4}", text, flags=re.M)
    assert rows == ["1", "2", "3"]
    assert "Trained 3 epochs (12 steps)" in text


def test_throughput_leaves_the_first_execution_out(clock):
    # The first step takes 100 s (compilation); every later step 1 s, validation 50 s.
    def tick(trainer, logs):
        clock.now += 100.0 if trainer.step == 1 else 1.0

    slow_val = LambdaCallback(
        on_validation_end=lambda t, logs: setattr(clock, "now", clock.now + 50.0)
    )
    console, out = plain_console()
    fit(
        RichProgress(console=console),
        epochs=2,
        extra=[LambdaCallback(order=-1, on_train_batch_end=tick), slow_val],
    )
    lines = out.getvalue().splitlines()
    # Epoch 1: steps 2-4 in 3 s. Epoch 2: its 4 steps in 4 s. Validation is not training time.
    assert " - 1.0 steps/s, 16 samples/s - " in lines[0]
    assert " - 1.0 steps/s, 16 samples/s - " in lines[1]
    assert "first step (with compilation) 1:40" in lines[2]
    assert lines[2].endswith("; 1.0 steps/s, 16 samples/s")


def test_values_are_fetched_from_the_device_only_at_refresh(clock):
    fetched = []

    def spy(trainer):
        real = trainer.running_logs

        def running_logs():
            fetched.append(trainer.step)
            return real()

        trainer.running_logs = running_logs

    console, _ = live_console()
    progress = RichProgress(console=console, refresh_per_second=2)
    # Time stands still: after the first refresh, none is due (a fit of 16 steps).
    fit(progress, epochs=4, extra=[LambdaCallback(on_fit_start=spy)])
    assert fetched == [2]
    # Half a second per step: a refresh at every step but the first, which only starts the clock.
    fetched.clear()
    shown = {}

    def look(trainer, logs):  # what the live bar holds after the refresh of step 6
        if trainer.step == 6:
            task = progress._progress.tasks[0]
            shown.update(task.fields, completed=task.completed)

    fit(
        progress,
        epochs=3,
        extra=[
            LambdaCallback(on_fit_start=spy),
            LambdaCallback(
                order=-1, on_train_batch_end=lambda t, logs: setattr(clock, "now", clock.now + 0.5)
            ),
            LambdaCallback(order=300, on_train_batch_end=look),
        ],
    )
    assert fetched == [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    # Step 6 is batch 2 of epoch 2, whose clock ran 1 s for 2 steps: 2 steps/s; 2 steps
    # left in the epoch (1 s) and 4 in epoch 3 (2 s more).
    assert shown["completed"] == 2
    assert shown["speed"] == "2.0 steps/s, 32 samples/s"
    assert shown["eta"] == "1.0s (fit 3.0s)"
    assert shown["values"].startswith("loss ") and "learning_rate 0.1000" in shown["values"]


@pytest.mark.parametrize("make_console", [plain_console, live_console])
def test_pickles_mid_fit_and_prints_again_after_unpickling(make_console):
    console, out = make_console()
    progress = RichProgress(console=console)
    pickled = []
    grab = LambdaCallback(
        order=300, on_epoch_end=lambda t, logs: pickled.append(cloudpickle.dumps(progress))
    )
    fit(progress, epochs=1, extra=[grab])
    clone = cloudpickle.loads(pickled[0])
    assert clone.console is None
    clone.console, out2 = plain_console()
    fit(clone, epochs=1)
    assert out2.getvalue().startswith("Epoch 1/1 - ")


def test_live_can_be_forced_off_on_a_terminal():
    console, out = live_console()
    fit(RichProgress(console=console, live=False), epochs=1)
    assert out.getvalue().startswith("Epoch 1/1 - ")


def test_a_failed_fit_start_elsewhere_is_reported_as_is():
    console, out = live_console()
    with pytest.raises(MonitorError, match="EarlyStopping monitors 'val_f1'"):
        fit(RichProgress(console=console), extra=[EarlyStopping(monitor="val_f1", mode="max")])
    assert "Trained" not in out.getvalue()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(refresh_per_second=0), r"refresh_per_second must be in \(0, 60\], got 0"),
        (dict(console="stdout"), "console must be a rich Console, got str"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        RichProgress(**kwargs)


class _Endless:
    """An endless stream of batches: its epochs have no length."""

    def __iter__(self):
        rng = np.random.default_rng(0)
        while True:
            x = rng.normal(size=(4, 4)).astype(np.float32)
            yield x, (x[:, 0] > 0).astype(np.int32)


def fit_by_steps(progress, extra=()):
    trainer = make_trainer()
    trainer.fit(MLP(), _Endless(), validation_data=tiny_data(8, seed=1), max_steps=12,
                validation_steps_freq=4, callbacks=[progress, *extra])
    return trainer


def test_plain_mode_shows_a_max_steps_run_on_a_stream_by_steps():
    console, out = plain_console()
    fit_by_steps(RichProgress(console=console))
    lines = out.getvalue().splitlines()
    assert [ln.split(" - ")[0] for ln in lines[:3]] == ["Step 4/12", "Step 8/12", "Step 12/12"]
    assert re.match(r"Step 4/12 - val_loss \d\.\d{4}  val_accuracy \d\.\d{4}$", lines[0])
    assert lines[3].startswith("Trained 0 epochs (12 steps) in ") and "stopped: max_steps" in lines[3]
    assert "None" not in out.getvalue()


def test_live_bar_counts_the_steps_of_the_run_when_the_epochs_have_no_length(clock):
    console, out = live_console()
    progress = RichProgress(console=console, refresh_per_second=2)
    shown = {}

    def look(trainer, logs):  # what the live bar holds after the refresh of step 6
        if trainer.step == 6:
            task = progress._progress.tasks[0]
            shown.update(task.fields, completed=task.completed, total=task.total, label=task.description)

    tick = LambdaCallback(order=-1, on_train_batch_end=lambda t, logs: setattr(clock, "now", clock.now + 0.5))
    fit_by_steps(progress, extra=[tick, LambdaCallback(order=300, on_train_batch_end=look)])
    # 2 steps/s since the first step; 6 of the run's 12 steps left: 3 s
    assert (shown["label"], shown["completed"], shown["total"]) == ("Step", 6, 12)
    assert shown["eta"] == "3.0s"
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())
    assert "Step 8/12 - val_loss" in text and "Epoch 1/None" not in text
