"""TensorBoard: epoch and step scalars in event files, train/validation split, purge on resume."""

from __future__ import annotations

import struct

import cloudpickle
import pytest
from cb_helpers import resume, tiny_data
from conftest import MLP, make_trainer

from jaxfit import ConfigError
from jaxfit.callbacks import LambdaCallback, LearningRateMonitor, TensorBoard

event_pb2 = pytest.importorskip("tensorboardX.proto.event_pb2")


def records(path):
    """The events of one file (TFRecord framing: length, its crc, data, data crc)."""
    data, pos = path.read_bytes(), 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos : pos + 8])
        yield event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
        pos += 12 + length + 4


def events(directory):
    """(file index, step, tag, value) of every scalar, and the purge steps, in write order."""
    files = [list(records(p)) for p in directory.glob("events.out.tfevents.*")]
    files.sort(key=lambda evs: evs[0].wall_time)  # each file opens with a version event
    scalars, purges = [], []
    for i, evs in enumerate(files):
        for event in evs:
            if event.HasField("session_log"):
                purges.append(event.step)
            for value in event.summary.value:
                scalars.append((i, event.step, value.tag, value.simple_value))
    return scalars, purges


def test_epoch_scalars_split_into_train_and_validation(tmp_path):
    trainer = make_trainer()
    history = trainer.fit(
        MLP(),
        tiny_data(),
        validation_data=tiny_data(16, seed=1),
        epochs=2,
        batch_size=16,
        callbacks=[LearningRateMonitor(), TensorBoard(tmp_path)],
    )
    train, _ = events(tmp_path / "train")
    val, _ = events(tmp_path / "validation")
    by_tag = lambda rows, tag: [(s, pytest.approx(v)) for _, s, t, v in rows if t == tag]  # noqa: E731
    assert by_tag(train, "epoch_loss") == list(zip([4, 8], history.history["loss"], strict=True))
    assert by_tag(val, "epoch_loss") == list(zip([4, 8], history.history["val_loss"], strict=True))
    assert by_tag(val, "epoch_accuracy") == list(
        zip([4, 8], history.history["val_accuracy"], strict=True)
    )
    assert by_tag(train, "epoch_learning_rate") == [
        (4, pytest.approx(0.1)),
        (8, pytest.approx(0.1)),
    ]
    assert not [r for r in train if r[2] == "batch_loss"]  # per-step scalars are off by default


def test_batch_loss_every_n_steps_and_purge_after_a_resume(tmp_path):
    trainer = make_trainer()
    trainer.fit(
        MLP(),
        tiny_data(),
        epochs=1,
        batch_size=16,
        callbacks=[TensorBoard(tmp_path, every_n_steps=3)],
    )
    resumed = resume(trainer)
    resumed.fit(epochs=2)
    rows, purges = events(tmp_path / "train")
    assert [(f, s) for f, s, tag, _ in rows if tag == "batch_loss"] == [(0, 3), (1, 6)]
    # The second fit drops anything the first wrote after its step 4.
    assert purges == [5]


def test_pickles_mid_fit_without_its_open_writers(tmp_path):
    tb = TensorBoard(tmp_path)
    pickled = []
    grab = LambdaCallback(
        order=300, on_epoch_end=lambda t, logs: pickled.append(cloudpickle.dumps(tb))
    )
    make_trainer().fit(MLP(), tiny_data(), epochs=1, batch_size=16, callbacks=[tb, grab])
    clone = cloudpickle.loads(pickled[0])
    assert clone._writers == {} and clone.log_dir == str(tmp_path)


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="every_n_steps must be an integer >= 1"):
        TensorBoard(tmp_path, every_n_steps=0)
    with pytest.raises(ConfigError, match="log_dir must be a path"):
        TensorBoard(3)
    for bad in (0, -1.0, True, "2"):
        with pytest.raises(ConfigError, match="flush_secs must be a number of seconds > 0"):
            TensorBoard(tmp_path, flush_secs=bad)


def test_epoch_end_leaves_flushing_to_the_writer_thread(tmp_path, monkeypatch):
    # No fsync on the training thread at epoch ends: the writer is asked for none, and the
    # scalars are all in the files once the fit has ended (closing flushes them).
    import tensorboardX

    flushes = []
    monkeypatch.setattr(tensorboardX.SummaryWriter, "flush", lambda self: flushes.append(self))
    x, y = tiny_data()
    make_trainer().fit(MLP(), (x, y), epochs=3, batch_size=16, verbose=0,
                       callbacks=[TensorBoard(tmp_path / "tb", flush_secs=60)])
    assert flushes == []
    scalars, _ = events(tmp_path / "tb" / "train")
    assert len([v for _, _, tag, v in scalars if tag == "epoch_loss"]) == 3
