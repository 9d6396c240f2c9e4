"""LearningRateMonitor, LambdaCallback and Timer."""

from __future__ import annotations

import datetime

import cloudpickle
import optax
import pytest
from cb_helpers import resume, tiny_data
from conftest import MLP, make_trainer

import jaxfit.callbacks.timer as timer_module
from jaxfit import ConfigError, HyperparamError
from jaxfit.callback import CallbackList
from jaxfit.callbacks import LambdaCallback, LearningRateMonitor, LRScheduler, Timer


def test_learning_rate_monitor_puts_the_values_in_the_history():
    schedule = optax.linear_schedule(0.1, 0.0, 8)
    trainer = make_trainer(
        optimizer=optax.inject_hyperparams(optax.adam)(learning_rate=0.0, b1=0.9)
    )
    history = trainer.fit(
        MLP(),
        tiny_data(),
        epochs=2,
        batch_size=16,
        callbacks=[LRScheduler(schedule), LearningRateMonitor(["learning_rate", "b1"])],
    )
    # The value the last step of each epoch used: steps 3 and 7.
    assert history.history["learning_rate"] == pytest.approx(
        [float(schedule(3)), float(schedule(7))]
    )
    assert history.history["b1"] == pytest.approx([0.9, 0.9])


def test_learning_rate_monitor_defaults_to_the_learning_rate_scheduled_by_optax_too():
    trainer = make_trainer(
        optimizer=optax.inject_hyperparams(optax.adamw)(
            learning_rate=optax.constant_schedule(0.1), weight_decay=1e-4
        )
    )
    history = trainer.fit(
        MLP(), tiny_data(), epochs=1, batch_size=16, callbacks=[LearningRateMonitor()]
    )
    assert history.history["learning_rate"] == pytest.approx([0.1])
    assert "weight_decay" not in history.history


def test_learning_rate_monitor_defaults_to_every_hyperparameter_without_a_learning_rate():
    decay = optax.inject_hyperparams(optax.add_decayed_weights)(weight_decay=1e-4)
    trainer = make_trainer(optimizer=optax.chain(decay, optax.sgd(0.1)))
    history = trainer.fit(
        MLP(), tiny_data(), epochs=1, batch_size=16, callbacks=[LearningRateMonitor()]
    )
    assert history.history["weight_decay"] == pytest.approx([1e-4])


def test_learning_rate_monitor_refuses_names_that_are_not_injected():
    with pytest.raises(
        HyperparamError, match=r"\['momentum'\] not injected.*injected: learning_rate"
    ):
        make_trainer().fit(
            MLP(), tiny_data(), epochs=1, callbacks=[LearningRateMonitor(["momentum"])]
        )


def test_lambda_callback_defines_only_the_hooks_given():
    calls = []
    cb = LambdaCallback(
        on_epoch_end=lambda t, logs: calls.append(("end", t.epoch)),
        on_fit_start=lambda t: calls.append(("start", t.epoch)),
    )
    hooks = CallbackList([cb])
    assert hooks.has("on_epoch_end") and hooks.has("on_fit_start")
    assert not hooks.has("on_train_batch_end")  # no per-step call
    make_trainer().fit(MLP(), tiny_data(), epochs=2, batch_size=16, callbacks=[cb])
    assert calls == [("start", 0), ("end", 1), ("end", 2)]


def test_lambda_callback_pickles_and_resumes():
    cb = LambdaCallback(
        order=7, on_epoch_end=lambda t, logs: logs.__setitem__("twice", 2 * logs["loss"])
    )
    clone = cloudpickle.loads(cloudpickle.dumps(cb))
    assert (
        isinstance(clone, LambdaCallback) and clone.order == 7 and clone.state_key == cb.state_key
    )
    trainer = make_trainer()
    trainer.fit(MLP(), tiny_data(), epochs=1, batch_size=16, callbacks=[cb])
    resumed = resume(trainer)
    history = resumed.fit(epochs=2)
    assert history.history["twice"] == pytest.approx([2 * v for v in history.history["loss"]])


def test_lambda_callback_refuses_unknown_hooks():
    with pytest.raises(ConfigError, match=r"unknown hooks \['on_batch_end'\]"):
        LambdaCallback(on_batch_end=print)
    with pytest.raises(ConfigError, match="on_epoch_end must be callable"):
        LambdaCallback(on_epoch_end=3)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def monotonic(self):
        return self.now


def advance(trainer, logs):
    """One second per step, on whatever clock the timer module reads (survives pickling)."""
    timer_module.time.now += 1.0


def test_timer_stops_cleanly_once_the_budget_is_spent(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(timer_module, "time", clock)
    tick = LambdaCallback(order=-1, on_train_batch_end=advance)
    trainer = make_trainer()
    timer = Timer(10)
    trainer.fit(MLP(), tiny_data(), epochs=100, batch_size=16, callbacks=[tick, timer])
    assert trainer.stop_reason == "timer" and trainer.step == 10
    assert trainer.epoch == 2 and trainer.batch_in_epoch == 2  # mid-epoch: a resume continues it
    assert timer.time_remaining() == 0.0


def test_timer_budget_covers_the_whole_run_across_a_resume(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(timer_module, "time", clock)
    tick = LambdaCallback(order=-1, on_train_batch_end=advance)
    trainer = make_trainer()
    timer = Timer("00:00:10")
    trainer.fit(MLP(), tiny_data(), epochs=1, batch_size=16, callbacks=[tick, timer])
    assert timer.time_elapsed() == 4.0 and trainer.stop_reason is None
    resumed = resume(trainer)
    clock.now += 1000.0  # time between the two processes does not count
    resumed.fit(epochs=100)
    assert resumed.stop_reason == "timer" and resumed.step == 10


def test_timer_check_per_epoch_finishes_the_epoch(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(timer_module, "time", clock)
    tick = LambdaCallback(order=-1, on_train_batch_end=advance)
    trainer = make_trainer()
    trainer.fit(
        MLP(), tiny_data(), epochs=100, batch_size=16, callbacks=[tick, Timer(5, check="epoch")]
    )
    assert trainer.stop_reason == "timer" and trainer.step == 8 and trainer.batch_in_epoch == 0


@pytest.mark.parametrize(
    "duration, seconds",
    [
        (90, 90.0),
        (datetime.timedelta(minutes=2), 120.0),
        ("01:00:00", 3600.0),
        ("1:02:00:30", 93630.0),
    ],
)
def test_timer_durations(duration, seconds):
    assert Timer(duration).duration == seconds


@pytest.mark.parametrize(
    "duration, match",
    [("12h", "is not 'HH:MM:SS'"), (0, "must be positive"), ([1], "must be seconds, a timedelta")],
)
def test_timer_bad_durations(duration, match):
    with pytest.raises(ConfigError, match=match):
        Timer(duration)


def test_only_process_zero_writes_logs_and_prints(tmp_path, monkeypatch):
    import io

    from rich.console import Console

    from jaxfit.callbacks import CSVLogger, RichProgress, TensorBoard

    monkeypatch.setattr("jax.process_index", lambda: 1)
    out = io.StringIO()
    make_trainer().fit(
        MLP(),
        tiny_data(),
        epochs=1,
        batch_size=16,
        callbacks=[
            CSVLogger(tmp_path / "log.csv"),
            TensorBoard(tmp_path / "tb", every_n_steps=1),
            RichProgress(console=Console(file=out)),
        ],
    )
    assert not (tmp_path / "log.csv").exists() and not (tmp_path / "tb").exists()
    assert out.getvalue() == ""
