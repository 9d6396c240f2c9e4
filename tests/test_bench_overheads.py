"""The overhead probes: what the epoch-gap probe measures and how the table reads."""

from __future__ import annotations

import types

import pytest

from benchmarks import overheads


def _trainer(batch_in_epoch):
    return types.SimpleNamespace(batch_in_epoch=batch_in_epoch)


def test_epoch_gap_spans_last_step_done_to_next_first_dispatch(monkeypatch):
    clock = iter([10.0, 10.25, 20.0, 20.5])
    monkeypatch.setattr(overheads.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(overheads.jax, "block_until_ready", lambda x: x)
    gap = overheads.EpochGap(steps_per_epoch=3)
    for epoch in range(2):
        for b in range(3):
            gap.on_train_batch_start(_trainer(b))
            gap.on_train_batch_end(_trainer(b + 1), {"loss": 0.0})
    gap.on_train_batch_start(_trainer(0))
    # Only the boundaries count: 10.0 -> 10.25 after epoch 1, 20.0 -> 20.5 after epoch 2.
    assert gap.gaps == [0.25, 0.5]


def test_table_reports_medians_ratio_and_failures():
    runs = {
        "checkpoint": [{"background": 0.002, "inline": 0.040},
                       {"background": 0.004, "inline": 0.040}],
        "gap": [{"history_only": 0.001, "all_builtin": 0.003,
                 "all_builtin_callbacks": ["CSVLogger"]}],
        "fresh": [{"first_step_s": 2.0}],
        "resume": [{"error": "exit 1: boom"}],
        "refit": [{"first_step_s": 0.012}, {"first_step_s": 0.016}],
    }
    text = overheads._table([("W1", runs)], reps=2)
    assert ("| W1 | 3.0 (2.0–4.0) | 40.0 (40.0–40.0) | 0.075 | 1.0 (1.0–1.0) "
            "| 3.0 (3.0–3.0) | 2000.0 (2000.0–2000.0) | – | 14.0 (12.0–16.0) |") in text
    assert "All built-ins: CSVLogger (and History)." in text
    assert "- W1 resume: exit 1: boom" in text


@pytest.mark.parametrize("name", ["ModelCheckpoint", "RichProgress", "LRScheduler", "CSVLogger"])
def test_all_builtin_callbacks_include_each_plugin(tmp_path, name):
    from benchmarks.workloads import WORKLOADS

    made = overheads.all_builtin_callbacks(WORKLOADS["W1"], epochs=2, workdir=str(tmp_path))
    assert name in [type(c).__name__ for c in made]


def test_save_syscalls_counts_the_calls_between_the_marks_once_each():
    from benchmarks.save_syscalls import count

    log = """\
12  openat(AT_FDCWD, "/x", O_RDONLY) = 3
12  write(2, "=====MARK=====\\n", 15) = 15
12  mkdir("/r/.tmp-1", 0777 <unfinished ...>
13  futex(0x7f, FUTEX_WAKE_PRIVATE, 1) = 1
12  <... mkdir resumed>)              = 0
12  fsync(4)                          = 0
12  fsync(5)                          = 0
12  write(2, "=====END=====\\n", 14) = 14
12  rename("/a", "/b") = 0
""".splitlines()
    counted, apart = count(log)
    assert counted == {"mkdir": 1, "fsync": 2} and apart == {"futex": 1}
