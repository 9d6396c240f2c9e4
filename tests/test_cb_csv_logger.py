"""CSVLogger: rows per epoch, full precision, new columns, resume truncation, atomic rewrites."""

from __future__ import annotations

import csv

import pytest
from cb_helpers import resume, tiny_data
from conftest import MLP, make_trainer

from jaxfit import ConfigError, DataError
from jaxfit.callbacks import CSVLogger, LambdaCallback, LearningRateMonitor


def read(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_writes_one_row_per_epoch_with_every_log_key(tmp_path):
    path = tmp_path / "log.csv"
    trainer = make_trainer()
    history = trainer.fit(
        MLP(),
        tiny_data(),
        validation_data=tiny_data(16, seed=1),
        epochs=3,
        batch_size=16,
        callbacks=[CSVLogger(path), LearningRateMonitor()],
    )
    rows = read(path)
    assert list(rows[0]) == [
        "epoch",
        "loss",
        "accuracy",
        "val_loss",
        "val_accuracy",
        "learning_rate",
    ]
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    # Full precision: the floats read back are exactly the History's.
    assert [float(r["val_loss"]) for r in rows] == history.history["val_loss"]


def test_a_key_first_seen_later_adds_a_column(tmp_path):
    path = tmp_path / "log.csv"

    def late_key(trainer, logs):
        if trainer.epoch >= 2:
            logs["extra"] = trainer.epoch * 10

    make_trainer().fit(
        MLP(),
        tiny_data(),
        epochs=3,
        batch_size=16,
        callbacks=[LambdaCallback(on_epoch_end=late_key), CSVLogger(path)],
    )
    rows = read(path)
    assert [r["extra"] for r in rows] == ["", "20", "30"]


def test_resume_drops_rows_of_epochs_trained_again(tmp_path):
    path = tmp_path / "log.csv"
    trainer = make_trainer()
    trainer.fit(MLP(), tiny_data(), epochs=2, batch_size=16, callbacks=[CSVLogger(path)])
    saved = trainer.state_dict()  # the checkpoint of epoch 2
    trainer.fit(epochs=4)  # then the run went on to epoch 4 and crashed
    assert [r["epoch"] for r in read(path)] == ["1", "2", "3", "4"]
    rows_before = read(path)[:2]
    crashed = make_trainer()
    crashed.fit(MLP(), tiny_data(), epochs=0, batch_size=16, callbacks=[CSVLogger(path)])
    crashed.load_state_dict(saved)
    resumed = resume(crashed)
    resumed.fit(epochs=3)
    rows = read(path)
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert rows[:2] == rows_before


def test_a_new_run_replaces_the_file_only_when_its_first_epoch_ends(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("epoch,loss\n1,0.5\n")
    with pytest.raises(DataError):  # x and y lengths differ: fails before any epoch
        make_trainer().fit(
            MLP(), (tiny_data()[0], tiny_data()[1][:10]), epochs=1, callbacks=[CSVLogger(path)]
        )
    assert path.read_text() == "epoch,loss\n1,0.5\n"
    make_trainer().fit(MLP(), tiny_data(), epochs=1, batch_size=16, callbacks=[CSVLogger(path)])
    assert [r["epoch"] for r in read(path)] == ["1"] and "accuracy" in read(path)[0]


def test_append_keeps_the_rows_of_an_earlier_run(tmp_path):
    path = tmp_path / "log.csv"
    make_trainer().fit(MLP(), tiny_data(), epochs=2, batch_size=16, callbacks=[CSVLogger(path)])
    make_trainer().fit(
        MLP(), tiny_data(), epochs=1, batch_size=16, callbacks=[CSVLogger(path, append=True)]
    )
    assert [r["epoch"] for r in read(path)] == ["1", "2", "1"]
    assert not list(tmp_path.glob("*.tmp*"))


def test_separator(tmp_path):
    path = tmp_path / "log.tsv"
    make_trainer().fit(
        MLP(), tiny_data(), epochs=1, batch_size=16, callbacks=[CSVLogger(path, separator="\t")]
    )
    assert path.read_text().splitlines()[0] == "epoch\tloss\taccuracy"
    with pytest.raises(ConfigError, match="separator must be one character"):
        CSVLogger(path, separator=", ")


def test_the_file_is_utf8_whatever_the_locale(tmp_path):
    path = tmp_path / "log.csv"

    def named(trainer, logs):
        logs["überschuss_µ"] = f"größe {trainer.epoch}"  # not ASCII: header and rows

    make_trainer().fit(MLP(), tiny_data(), epochs=2, batch_size=16,
                       callbacks=[LambdaCallback(on_epoch_end=named), CSVLogger(path)])
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    # (epoch 1's row comes with the header, in a rewrite; epoch 2's is appended)
    assert [r["überschuss_µ"] for r in rows] == ["größe 1", "größe 2"]
