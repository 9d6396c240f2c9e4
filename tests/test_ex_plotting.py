"""plot_history / plot_curves: what is drawn, the image written, and the failure modes."""

import os
import sys
import types

import pytest
from ex_support import png_size

from jaxfit import plotting
from jaxfit.plotting import Panel, is_learning_rate_key, plot_command, plot_curves, plot_history

HISTORY = {
    "loss": [1.2, 0.8, 0.6],
    "val_loss": [1.3, 0.9, 0.8],
    "accuracy": [0.6, 0.7, 0.8],
    "val_accuracy": [0.55, 0.7, 0.75],
    "learning_rate": [0.1, 0.01, 0.001],
}


@pytest.fixture
def captured(monkeypatch):
    """Replaces plot_curves to record the panels plot_history builds."""
    calls = []
    monkeypatch.setattr(plotting, "plot_curves", lambda panels, path, **kw: calls.append(panels))
    return calls


def test_plot_history_writes_a_png_of_three_panels(tmp_path):
    path = plot_history(HISTORY, tmp_path / "run.png", title="run")
    assert path == tmp_path / "run.png"
    assert png_size(path) == (1500, 360)  # 3 panels of 5 x 3.6 inches at 100 dpi


def test_four_panels_wrap_to_a_second_row(tmp_path):
    history = dict(HISTORY, top5=[0.9, 0.95, 0.97])
    assert png_size(plot_history(history, tmp_path / "a.png", dpi=50)) == (750, 360)


def test_history_object_and_dict_give_the_same_panels(captured):
    plot_history(HISTORY, "unused.png")
    plot_history(types.SimpleNamespace(history=HISTORY), "unused.png")
    assert [p.title for p in captured[0]] == [p.title for p in captured[1]]


def test_train_and_val_share_a_panel_loss_first_lr_last(captured):
    history = {"learning_rate": [0.1, 0.1], "val_accuracy": [0.5, 0.6], "accuracy": [0.4, 0.7],
               "loss": [1.0, 0.5], "val_loss": [1.1, 0.6]}
    plot_history(history, "unused.png")
    panels = captured[0]
    assert [p.title for p in panels] == ["loss", "accuracy", "learning rate"]
    assert panels[1].series == {"train": ([1, 2], [0.4, 0.7]), "val": ([1, 2], [0.5, 0.6])}
    assert panels[2].ylabel == "learning rate" and panels[0].xlabel == "epoch"


def test_learning_rate_gets_a_log_axis_only_when_it_spans_a_decade(captured):
    plot_history({"lr": [0.1, 0.001]}, "unused.png")
    plot_history({"lr": [0.1, 0.05]}, "unused.png")
    plot_history({"loss": [100.0, 0.1]}, "unused.png")
    assert [panels[0].logy for panels in captured] == [True, False, False]


def test_non_numeric_entries_are_skipped_and_none_leaves_a_gap(captured):
    plot_history({"loss": [1.0, 0.5], "val_loss": [None, 0.4], "note": ["a", "b"]}, "x.png")
    (panel,) = captured[0]
    assert panel.series["val"] == ([1, 2], [None, 0.4])


@pytest.mark.parametrize(
    "key, expected",
    [("lr", True), ("learning_rate", True), ("1.learning_rate", True), ("lr_group0", True),
     ("val_loss", False), ("b1", False), ("clr_x", False)],
)
def test_is_learning_rate_key(key, expected):
    assert is_learning_rate_key(key) is expected


def test_empty_history_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"no numeric series to plot \(keys: none\)"):
        plot_history({}, tmp_path / "a.png")
    assert not (tmp_path / "a.png").exists()


def test_wrong_type_is_a_clear_error(tmp_path):
    with pytest.raises(TypeError, match="expects a jaxfit History or a dict.*got list"):
        plot_history([1, 2], tmp_path / "a.png")


def test_mismatched_series_lengths_are_rejected(tmp_path):
    panel = Panel("p", "step", "lr", {"a": ([1, 2, 3], [0.1, 0.2])})
    with pytest.raises(ValueError, match=r"series 'a': 3 x values but 2 y values"):
        plot_curves([panel], tmp_path / "a.png")


def test_no_panels_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="at least one Panel"):
        plot_curves([], tmp_path / "a.png")


def test_failed_save_keeps_the_previous_image(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    path = plot_history(HISTORY, tmp_path / "run.png")
    before = path.read_bytes()

    def broken_savefig(self, f, **kwargs):
        f.write(b"half an image")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(OSError, match="disk full"):
        plot_history({"loss": [3.0, 2.0]}, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["run.png"]  # no temporary file left behind


def test_missing_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install 'jaxfit\[plot\]'"):
        plot_history(HISTORY, tmp_path / "a.png")


def test_creates_missing_parent_folders(tmp_path):
    path = plot_history({"loss": [1.0]}, tmp_path / "a" / "b" / "run.png")
    assert png_size(path) == (500, 360)


def checkpointed_run(tmp_path, data, **checkpoint_args):
    import optax
    from conftest import MLP

    from jaxfit import Trainer
    from jaxfit.callbacks import ModelCheckpoint

    trainer = Trainer(optimizer=optax.inject_hyperparams(optax.sgd)(learning_rate=0.1),
                      metrics=["accuracy"], seed=0)  # fmt: skip
    trainer.fit(MLP(), data, validation_data=data, epochs=2, batch_size=16, verbose=0,
                callbacks=[ModelCheckpoint(tmp_path / "run", **checkpoint_args)])  # fmt: skip
    return tmp_path / "run"


def test_plot_command_plots_the_newest_checkpoint_of_a_run(tmp_path, data):
    run = checkpointed_run(tmp_path, data)
    path = plot_command(run)
    assert path == run / "history.png"
    assert png_size(path) == (1000, 360)  # loss and accuracy, train against val


def test_plot_command_writes_where_asked_from_one_checkpoint(tmp_path, data):
    run = checkpointed_run(tmp_path, data)
    first = sorted(p for p in run.iterdir() if p.is_dir())[0]
    assert png_size(plot_command(first, tmp_path / "out" / "first.png")) == (1000, 360)


def test_plot_command_before_the_first_epoch_ends_is_a_clear_error(tmp_path, data):
    run = checkpointed_run(tmp_path, data, every_n_epochs=None, every_n_steps=1, keep_last=None)
    first = sorted(p for p in run.iterdir() if p.is_dir())[0]
    with pytest.raises(ValueError, match="holds no history yet: it was saved before the first"):
        plot_command(first)


def test_a_run_that_ended_no_epoch_is_drawn_from_its_validations_by_step(captured):
    vals = [{"step": 3, "epoch": 1, "val_loss": 0.9, "val_accuracy": 0.5, "learning_rate": 0.1},
            {"step": 6, "epoch": 1, "val_loss": 0.7, "val_accuracy": 0.6, "learning_rate": 0.05}]
    plot_history(types.SimpleNamespace(history={}, validations=vals), "unused.png")
    panels = captured[0]
    assert [p.title for p in panels] == ["val_loss", "val_accuracy", "learning rate"]
    assert panels[0].xlabel == "step" and panels[0].series == {"val_loss": ([3.0, 6.0], [0.9, 0.7])}
    plot_history(types.SimpleNamespace(history=HISTORY, validations=vals), "unused.png")
    assert captured[1][0].xlabel == "epoch"  # a run with epochs is drawn by epoch


def test_plot_command_draws_a_run_by_steps_from_its_validations(tmp_path, data):
    import optax
    from conftest import MLP

    from jaxfit import Trainer
    from jaxfit.callbacks import ModelCheckpoint

    x, y = data
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    trainer = Trainer(optimizer=optax.sgd(0.1), metrics=["accuracy"], seed=0)
    trainer.fit(MLP(), batches, validation_data=data, max_steps=3, validation_steps_freq=1, verbose=0,
                callbacks=[ModelCheckpoint(tmp_path / "run", every_n_epochs=None)])
    assert trainer.history.history == {} and len(trainer.history.validations) == 3
    assert png_size(plot_command(tmp_path / "run")) == (1000, 360)  # val_loss, val_accuracy by step


def test_plot_command_on_a_missing_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint or run directory"):
        plot_command(tmp_path / "nope")


def test_wide_and_tall_panels_take_their_cells(tmp_path):
    line = {"a": ([1, 2], [1.0, 2.0])}
    panels = [Panel("p", "x", "y", line) for _ in range(3)]
    panels.append(Panel("wide", "x", "y", dict(line, b=([1, 2], [2.0, 1.0])), span=3, rows=2,
                        legend="outside"))  # fmt: skip
    assert plotting._place(panels, 3) == [(0, 0, 1, 1), (0, 1, 1, 1), (0, 2, 1, 1), (1, 0, 3, 2)]
    path = plot_curves(panels, tmp_path / "grid.png", ncols=3, panel_size=(2.0, 1.5))
    assert png_size(path) == (600, 450)  # 3 columns x 3 rows of 2 x 1.5 inches


def test_a_panel_too_wide_for_the_row_starts_the_next_one():
    line = {"a": ([1], [1.0])}
    panels = [Panel("p", "x", "y", line), Panel("w", "x", "y", line, span=2),
              Panel("q", "x", "y", line)]  # fmt: skip
    assert plotting._place(panels, 2) == [(0, 0, 1, 1), (1, 0, 2, 1), (2, 0, 1, 1)]


def test_history_plot_of_a_real_fit_draws_loss_metric_and_learning_rate(tmp_path, data):
    import optax
    from conftest import MLP

    from jaxfit import Trainer
    from jaxfit.callbacks import LearningRateMonitor, LRScheduler

    trainer = Trainer(optimizer=optax.inject_hyperparams(optax.sgd)(learning_rate=0.1),
                      metrics=["accuracy"], seed=0)  # fmt: skip
    history = trainer.fit(MLP(), data, validation_data=data, epochs=3, batch_size=16,
                          callbacks=[LRScheduler(optax.exponential_decay(0.1, 5, 0.1)),
                                     LearningRateMonitor()])  # fmt: skip
    assert png_size(history.plot(tmp_path / "h.png")) == (1500, 360)


def test_cli_plot_writes_the_png_and_prints_its_path(tmp_path, data, capsys):
    from jaxfit.__main__ import main

    run = checkpointed_run(tmp_path, data)
    assert main(["plot", str(run), "--out", str(tmp_path / "cli.png")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli.png")
    assert png_size(tmp_path / "cli.png") == (1000, 360)


def test_cli_plot_of_a_missing_run_fails_with_a_message(tmp_path, capsys):
    from jaxfit.__main__ import main

    assert main(["plot", str(tmp_path / "nope")]) == 1
    assert "error: no checkpoint or run directory at" in capsys.readouterr().err
