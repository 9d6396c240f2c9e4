"""The harness's W4 (lm1b's Transformer LM), the full-form contender and the scaling table.

W4's hand loop A (lm1b's train step) and jaxfit's full-form lm1b loss train alike; the
full-form cross-entropy of `jaxfit-fullform` trains as the built-in loss does; the scaling
mode's table comes out of fake measurements. Nothing here is timed.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from benchmarks import scaling
from benchmarks.hand import lm_state
from benchmarks.jaxfit_contender import xent_full_form
from benchmarks.lm1b import lm1b_loss, make_train_step
from benchmarks.workloads import SCALED, WORKLOADS, mlp_params
from jaxfit import Callback, Trainer
from tests.programs_support import assert_bitwise, assert_changed


class BatchLosses(Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, logs):
        self.losses.append(float(logs["loss"]))


@pytest.mark.slow
def test_w4_hand_step_and_jaxfit_full_form_loss_agree_and_train_alike():
    w = WORKLOADS["W4"]
    (tokens,) = w.data()
    tokens = tokens[: 3 * w.batch_size]
    assert (tokens == 0).any() and (tokens[:, 0] > 0).all()  # padded sentences, none empty
    state = lm_state(w, tokens)
    start = state.params
    step = jax.jit(make_train_step(w.make_model(), w.schedule(),
                                   jax.random.fold_in(jax.random.key(0), 1)))
    hand_losses = []
    for i in range(3):
        state, m = step(state, tokens[i * w.batch_size:(i + 1) * w.batch_size])
        hand_losses.append(float(m["loss"] / m["denominator"]))

    record = BatchLosses()
    trainer = Trainer(optimizer=w.make_optimizer(), loss=lm1b_loss, seed=0)
    trainer.fit(w.make_model(), {"inputs": tokens}, epochs=1, batch_size=w.batch_size,
                shuffle=False, initial_params=start, callbacks=[record], verbose=0)
    # The loss of each batch (the first from the same params: one batch's loss) ...
    np.testing.assert_allclose(record.losses, hand_losses, rtol=1e-6)
    # ... and the params after 3 steps, bit for bit (same keys, same sums, same update).
    assert_changed(state.params, start)
    assert_bitwise(trainer.params, state.params)


@pytest.mark.slow
def test_full_form_cross_entropy_trains_as_the_built_in_loss():
    w = WORKLOADS["W1"]
    x, y = (a[: 3 * w.batch_size] for a in w.data())
    runs = []
    for loss in ("softmax_cross_entropy", xent_full_form):
        record = BatchLosses()
        trainer = Trainer(optimizer=w.make_optimizer(), loss=loss, seed=0)
        trainer.fit(w.make_model(), (x, y), epochs=1, batch_size=w.batch_size, shuffle=False,
                    callbacks=[record], verbose=0)
        runs.append((record.losses, trainer.params))
    np.testing.assert_allclose(runs[0][0], runs[1][0], rtol=1e-6)
    assert_bitwise(runs[1][1], runs[0][1])


def test_scaled_w3_has_4x_and_16x_the_params_and_10x_the_rows():
    base = mlp_params((512, 512), 784)
    assert abs(mlp_params(SCALED["W3-p4"].hidden, 784) / base - 4) < 0.1
    assert abs(mlp_params(SCALED["W3-p16"].hidden, 784) / base - 16) < 0.3
    assert SCALED["W3-r10"].batches == 10 * WORKLOADS["W3"].batches
    assert SCALED["W3-r10"].hidden == (512, 512)


def _run(contender, workload, rep, steps, peak, epoch_rss):
    return {"contender": contender, "workload": workload, "rep": rep, "steps_per_s": steps,
            "examples_per_s": 128 * steps, "compile_s": 1.0, "ttfs_s": 2.0,
            "peak_rss_mb": peak, "epoch_rss_mb": epoch_rss}


def test_scaling_table_from_fake_measurements():
    results = [
        _run("A", "W3", 0, 200.0, 400.0, [390, 395, 395, 396]),
        _run("jaxfit-callbacks", "W3", 0, 190.0, 420.0, [400, 410, 411, 412]),
        _run("A", "W3-p16", 0, 20.0, 900.0, [880, 890, 890]),
        _run("jaxfit-callbacks", "W3-p16", 0, 19.0, 990.0, [950, 960, 990]),
        {"contender": "A", "workload": "W3-p16", "rep": 1, "error": "exit 1: boom"},
    ]
    rows = scaling.scaling_rows(results, ["W3", "W3-p16"])
    assert [r["variant"] for r in rows] == ["W3", "W3-p16"]
    assert rows[0]["ratio"] == (0.95, 0.95, 0.95) and rows[1]["ratio"] == (0.95, 0.95, 0.95)
    assert rows[0]["params_x"] == 1.0 and 15.5 < rows[1]["params_x"] < 16.5
    # growth from the end of epoch 2 to the end of the last epoch
    assert rows[0]["a_growth"][0] == 1 and rows[0]["j_growth"][0] == 2
    assert rows[1]["j_growth"][0] == 30
    text = scaling.scaling_markdown(rows, "Command: `x`\n", [results[-1]])
    assert text.startswith("Command: `x`")
    assert "| W3 | 512-512 | 669,706 | 1.0 |" in text
    assert "| 200.0 | 190.0 | 0.95 | 400 | 420 | 1.05 | +1.0 / +2.0 |" in text
    assert "| 20.0 | 19.0 | 0.95 | 900 | 990 | 1.10 | +0.0 / +30.0 |" in text
    assert "- W3-p16: ratio to A 0.95 against 0.95 at W3" in text
    assert "jaxfit peak RSS +570 MiB over W3" in text
    assert "A on W3-p16 (rep 1): exit 1: boom" in text


def test_scaling_writes_its_table_and_json(tmp_path, monkeypatch):
    def fake_run(name, workload, epochs, rep, timeout, extra_args=()):
        assert extra_args == ("--track-rss",) and epochs == 3
        steps = 100.0 if name == "A" else 98.0
        return _run(name, workload, rep, steps, 300.0, [290.0, 295.0, 295.5])

    monkeypatch.setattr(scaling, "_run_one", fake_run)
    results = scaling.main(["--quick", "--variants", "W3,W3-r10", "--out", str(tmp_path)])
    assert [(r["contender"], r["workload"]) for r in results] == [
        ("A", "W3"), ("jaxfit-callbacks", "W3"), ("A", "W3-r10"), ("jaxfit-callbacks", "W3-r10")]
    text = (tmp_path / "scaling.md").read_text()
    assert "python -m benchmarks.scaling --quick --variants W3,W3-r10" in text
    assert "| W3-r10 | 512-512 | 669,706 | 1.0 | 8 | 81,920 | 640 |" in text
    assert (tmp_path / "scaling.json").exists()
