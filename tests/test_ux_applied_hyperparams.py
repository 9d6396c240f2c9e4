"""LRScheduler and ReduceOnPlateau put the applied value in the epoch logs, so the History
records it and ``python -m jaxfit plot`` draws a learning-rate curve; the PNG's mode."""

from __future__ import annotations

import os
import stat

import numpy as np
import optax
import pytest
from conftest import MLP, make_trainer
from ex_support import png_size

from jaxfit.callbacks import EarlyStopping, LRScheduler, ModelCheckpoint, ReduceOnPlateau


def test_lr_scheduler_records_the_rate_each_epochs_last_step_applied(data):
    # 70 examples, batch 16: 5 steps per epoch; epoch e's last step is step 5e - 1 (0-based).
    schedule = optax.exponential_decay(0.1, 5, 0.5)
    history = make_trainer().fit(MLP(), data, epochs=3, batch_size=16,
                                 callbacks=[LRScheduler(schedule)])  # fmt: skip
    want = [float(schedule(5 * e - 1)) for e in (1, 2, 3)]
    np.testing.assert_allclose(history.history["learning_rate"], want, rtol=1e-6)


def test_a_scheduled_b1_is_recorded_under_its_own_name(data):
    opt = optax.inject_hyperparams(optax.adam)(learning_rate=1e-2, b1=0.9)
    sched = LRScheduler(optax.linear_schedule(0.5, 0.9, 10), hyperparam="b1")
    assert sched.log_keys == ("b1",) and LRScheduler.log_keys == ("learning_rate",)
    history = make_trainer(optimizer=opt).fit(MLP(), data, epochs=2, batch_size=16,
                                              callbacks=[sched])  # fmt: skip
    np.testing.assert_allclose(history.history["b1"], [0.5 + 0.4 * 4 / 10, 0.5 + 0.4 * 9 / 10],
                               rtol=1e-6)  # fmt: skip
    assert "learning_rate" not in history.history


def test_reduce_on_plateau_records_the_value_before_its_reduction(data):
    # mode="max" on a falling loss: no epoch after the first improves, patience 0 halves the
    # rate at every one of them; each epoch records the rate it trained with.
    plateau = ReduceOnPlateau(monitor="loss", mode="max", factor=0.5, patience=0)
    history = make_trainer().fit(MLP(), data, epochs=4, batch_size=16, callbacks=[plateau])
    np.testing.assert_allclose(history.history["learning_rate"], [0.1, 0.1, 0.05, 0.025],
                               rtol=1e-6)  # fmt: skip


def test_a_declared_learning_rate_can_be_monitored(data):
    # check_monitor accepts keys a callback declares in log_keys: no MonitorError at fit start.
    stop = EarlyStopping(monitor="learning_rate", mode="min", patience=1)
    trainer = make_trainer()
    trainer.fit(MLP(), data, epochs=5, batch_size=16,
                callbacks=[LRScheduler(optax.constant_schedule(0.1)), stop])  # fmt: skip
    assert trainer.stop_reason == "early_stopping" and trainer.epoch == 2


def test_plot_of_a_scheduled_run_has_a_learning_rate_panel(tmp_path, data):
    from jaxfit.plotting import plot_command

    make_trainer().fit(MLP(), data, validation_data=data, epochs=2, batch_size=16,
                       callbacks=[LRScheduler(optax.linear_schedule(0.1, 0.01, 10)),
                                  ModelCheckpoint(tmp_path / "run")])  # fmt: skip
    # loss, accuracy and learning rate: three panels (two without a rate, see test_ex_plotting).
    assert png_size(plot_command(tmp_path / "run")) == (1500, 360)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_the_png_honours_the_umask(tmp_path, umask):
    from jaxfit.plotting import plot_history

    old = os.umask(umask)
    try:
        path = plot_history({"loss": [1.0, 0.5]}, tmp_path / "h.png")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
