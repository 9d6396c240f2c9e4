"""The benchmark harness: ratios within a repetition, the table, the chart, a real quick run."""

from __future__ import annotations

import json

import pytest

from benchmarks import run as bench_run
from benchmarks.measure import Clock
from benchmarks.report import markdown, summarize


def _r(contender, rep, steps, rss=100.0, workload="W1"):
    return {"contender": contender, "workload": workload, "rep": rep, "steps_per_s": steps,
            "examples_per_s": 32 * steps, "compile_s": 1.0, "ttfs_s": 2.0, "peak_rss_mb": rss}


def test_ratios_are_taken_against_a_of_the_same_repetition():
    # The machine got twice as slow in repetition 1: per-repetition ratios stay 1.5.
    results = [_r("A", 0, 100), _r("X", 0, 150), _r("A", 1, 50), _r("X", 1, 75, rss=120)]
    s = summarize(results)
    assert s[("X", "W1")]["ratio"] == (1.5, 1.5, 1.5)
    assert s[("X", "W1")]["steps_per_s"] == (112.5, 75, 150)
    assert s[("X", "W1")]["rss_ratio"] == (1.1, 1.0, 1.2)
    assert s[("A", "W1")]["n"] == 2


def test_table_shows_median_and_range_and_names_skipped_and_failed_runs():
    results = [_r("A", r, 100) for r in range(3)]
    results += [_r("X", r, v) for r, v in enumerate([80, 90, 120])]
    errors = [{"contender": "Y", "workload": "W1", "rep": 0, "error": "exit 1: boom"}]
    text = markdown(summarize(results + errors), [("A", "A hand loop"), ("X", "X thing")],
                    ["W1", "W2"], {("X", "W2"): "too slow"}, errors)
    assert "| X thing | 0.90 (0.80–1.20) | skipped |" in text
    assert "X on W2: too slow" in text
    assert "Y on W1 (rep 0): exit 1: boom" in text


def test_clock_refuses_a_run_without_a_measured_epoch():
    clock = Clock()
    clock.start()
    clock.first_step()
    clock.epoch_end()
    with pytest.raises(RuntimeError, match="need start, first step and >= 2 epoch ends"):
        clock.result(steps_per_epoch=10, batch_size=4)


def test_epochs_a_contender_calls_warm_up_are_left_out_of_steady_time(monkeypatch):
    import benchmarks.measure as measure

    now = iter([0.0, 1.0, 2.0, 10.0, 11.0, 12.0, 13.0])  # start, first step, 5 epoch ends
    monkeypatch.setattr(measure.time, "perf_counter", lambda: next(now))
    clock = Clock()
    clock.start()
    clock.first_step()
    clock.epoch_end()
    clock.epoch_end(warming_up=True)  # 8 s: e.g. a second program compiled in that epoch
    clock.epoch_end()
    clock.epoch_end()
    got = clock.result(steps_per_epoch=10, batch_size=4)
    assert got["steps_per_s"] == 20 / 2.0 and got["warmup_epochs"] == 2
    assert got["epoch_s"] == [1.0, 1.0]
    clock.epoch_end(warming_up=True)
    with pytest.raises(RuntimeError, match="4 of them warming up"):
        clock.result(steps_per_epoch=10, batch_size=4)


def test_unknown_names_are_rejected_with_the_choices(tmp_path):
    with pytest.raises(SystemExit, match="unknown contender.*choose from"):
        bench_run.main(["--contenders", "A,Z", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown workload.*W4"):
        bench_run.main(["--workloads", "W9", "--out", str(tmp_path)])


@pytest.mark.slow
@pytest.mark.multiprocess
def test_quick_run_writes_table_results_and_chart(tmp_path):
    results = bench_run.main(["--quick", "--workloads", "W1", "--contenders",
                              "A,jaxfit-callbacks", "--epochs", "3", "--out", str(tmp_path)])
    assert [r["contender"] for r in results] == ["A", "jaxfit-callbacks"]
    assert all("error" not in r and r["measured_steps"] == 2 * 56 for r in results)
    table = (tmp_path / "table.md").read_text()
    assert "| A hand loop | 1.00 |" in table
    assert "| jaxfit fit + everyday callbacks |" in table
    assert "python -m benchmarks.run --quick" in table
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["mode"] == "quick" and len(saved["results"]) == 2
    assert (tmp_path / "ratios.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_same_run_comparisons_pair_contenders_within_a_repetition():
    from benchmarks.report import comparisons

    results = [_r("jaxfit-callbacks", 0, 100), _r("jaxfit-fullform", 0, 99),
               _r("jaxfit-callbacks", 1, 50), _r("jaxfit-fullform", 1, 51),
               _r("jaxfit-fullform", 2, 80),  # its pair failed: left out
               {"contender": "jaxfit-callbacks", "workload": "W1", "rep": 2, "error": "x"},
               _r("C", 0, 40), _r("jaxfit-plain", 0, 80)]
    compared = dict(comparisons(results))
    full = compared["full-form loss / built-in loss, both with the everyday callbacks "
                    "(target >= 0.98)"]["W1"]
    assert full == pytest.approx((1.005, 0.99, 1.02))
    assert compared["jaxfit fit / Keras fit, no callbacks (ahead: > 1)"]["W1"] == (2.0, 2.0, 2.0)
    assert not any("steps_per_execution" in label for label in compared)
    text = markdown(summarize(results), [("C", "C")], ["W1"], {}, [], comparisons(results))
    assert "| full-form loss / built-in loss, both with the everyday callbacks (target >= 0.98) " \
           "| 1.00 (0.99–1.02) |" in text  # 1.005 shown as 1.00


def test_clock_records_rss_per_epoch_only_when_asked():
    for track in (False, True):
        clock = Clock(track_rss=track)
        clock.start()
        clock.first_step()
        for _ in range(3):
            clock.epoch_end()
        result = clock.result(steps_per_epoch=10, batch_size=4)
        if track:
            assert len(result["epoch_rss_mb"]) == 3
            # (the kernel updates the high-water mark lazily: now may read a page or two above)
            assert all(0 < v < result["peak_rss_mb"] + 8 for v in result["epoch_rss_mb"])
        else:
            assert "epoch_rss_mb" not in result
