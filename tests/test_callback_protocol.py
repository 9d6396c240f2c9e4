"""The callback protocol: exact hook sequence, ordering, cost, errors, on_fit_end."""

from __future__ import annotations

import pytest
from conftest import MLP, Recorder, make_trainer

from jaxfit import Callback, CallbackError, CallbackList, ConfigError


def test_exact_hook_sequence(data):
    x, y = data  # 40 samples, batch 16: 3 batches per epoch
    rec = Recorder()
    make_trainer().fit(MLP(), (x[:40], y[:40]), validation_data=(x[:8], y[:8]), epochs=2, batch_size=16,
                       callbacks=[rec])
    epoch = lambda e, s0: [  # noqa: E731
        ("epoch_start", e, s0),
        ("batch_start", e, s0), ("batch_end", e, s0 + 1),
        ("batch_start", e, s0 + 1), ("batch_end", e, s0 + 2),
        ("batch_start", e, s0 + 2), ("batch_end", e, s0 + 3),
        ("val_start", e, s0 + 3), ("val_end", e, s0 + 3),
        ("epoch_end", e, s0 + 3),
    ]
    assert rec.calls == [("fit_start", 0, 0), *epoch(1, 0), *epoch(2, 3), ("fit_end", 2, 6)]


def test_logs_handed_to_hooks(data):
    seen = {}

    class Logs(Callback):
        def on_train_batch_end(self, trainer, logs):
            seen["batch"] = sorted(logs)
            seen["batch_loss_is_device_array"] = hasattr(logs["loss"], "block_until_ready")

        def on_validation_end(self, trainer, logs):
            seen["val"] = sorted(logs)

        def on_epoch_end(self, trainer, logs):
            seen["epoch"] = dict(logs)
            logs["extra"] = 1.5  # recorded by History, which runs after the default order

        def on_fit_end(self, trainer, logs):
            seen["fit_end"] = dict(logs)

    x, y = data
    trainer = make_trainer()
    trainer.fit(MLP(), (x, y), validation_data=(x, y), epochs=1, batch_size=16, callbacks=[Logs()])
    assert seen["batch"] == ["loss"] and seen["batch_loss_is_device_array"]
    assert seen["val"] == ["val_accuracy", "val_loss"]
    assert set(seen["epoch"]) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert seen["fit_end"] == {"stop_reason": None, "exception": None}
    assert trainer.history.history["extra"] == [1.5]


def test_callbacks_run_sorted_by_order_ties_in_given_order(data):
    calls = []

    def make(name, order):
        cls = type(name, (Callback,), {"order": order, "on_epoch_end": lambda self, t, logs: calls.append(name)})
        return cls()

    x, y = data
    make_trainer().fit(MLP(), (x, y), epochs=1, batch_size=16,
                       callbacks=[make("Late", 10), make("A", 0), make("Early", -5), make("B", 0)])
    assert calls == ["Early", "A", "B", "Late"]


def test_hooks_not_overridden_are_never_called():
    class OnlyEpochEnd(Callback):
        def on_epoch_end(self, trainer, logs):
            pass

    cbs = CallbackList([OnlyEpochEnd()])
    assert cbs.has("on_epoch_end")
    assert not cbs.has("on_train_batch_end") and not cbs.has("on_train_batch_start")


def test_callback_exception_names_callback_and_hook(data):
    class Broken(Callback):
        def on_epoch_end(self, trainer, logs):
            raise ValueError("boom")

    x, y = data
    with pytest.raises(CallbackError, match=r"callback Broken\.on_epoch_end raised ValueError: boom") as info:
        make_trainer().fit(MLP(), (x, y), epochs=2, batch_size=16, callbacks=[Broken()])
    assert isinstance(info.value.__cause__, ValueError)
    assert info.value.hook == "on_epoch_end"


def test_on_fit_end_runs_however_fit_ends(data):
    ended = []

    class Broken(Callback):
        def on_train_batch_end(self, trainer, logs):
            if trainer.step == 2:
                raise RuntimeError("crash")

    class End(Callback):
        def on_fit_end(self, trainer, logs):
            ended.append((trainer.step, type(logs["exception"]).__name__))

    x, y = data
    with pytest.raises(CallbackError):
        make_trainer().fit(MLP(), (x, y), epochs=2, batch_size=16, callbacks=[Broken(), End()])
    assert ended == [(2, "CallbackError")]


def test_keyboard_interrupt_from_a_hook_passes_unchanged(data):
    class Interrupt(Callback):
        def on_train_batch_end(self, trainer, logs):
            raise KeyboardInterrupt

    x, y = data
    with pytest.raises(KeyboardInterrupt):
        make_trainer().fit(MLP(), (x, y), epochs=1, batch_size=16, callbacks=[Interrupt()])


def test_state_dict_roundtrip_through_trainer(data):
    class Counter(Callback):
        def __init__(self):
            self.n = 0

        def on_epoch_end(self, trainer, logs):
            self.n += 1

        def state_dict(self):
            return {"n": self.n}

        def load_state_dict(self, state):
            self.n = state["n"]

    from jaxfit import Trainer

    x, y = data
    trainer = make_trainer()
    trainer.fit(MLP(), (x, y), epochs=2, batch_size=16, callbacks=[Counter()])
    sd = trainer.state_dict()
    assert sd["callbacks"] == {"Counter": {"n": 2}}
    fresh = Trainer.from_recipe({**trainer.recipe(), "callbacks": [Counter()]})
    fresh.load_state_dict(sd)
    assert fresh._user_callbacks[0].n == 2 and fresh.epoch == 2


def test_two_callbacks_with_one_state_key_are_refused():
    class C(Callback):
        pass

    with pytest.raises(ConfigError, match="share the state_key"):
        CallbackList([C(), C()])


def test_the_states_a_save_records_are_the_callback_lists_own():
    class Counter(Callback):
        def __init__(self, key, order, n):
            self.key, self.order, self.n = key, order, n

        @property
        def state_key(self):
            return self.key

        def state_dict(self):
            return {"n": self.n}

    made = [Counter("late", 300, 1), Counter("early", -5, 2), Counter("mid", 0, 3)]
    states = CallbackList.states_of(made)
    assert states == CallbackList(made).state_dict()
    assert list(states) == ["early", "mid", "late"]  # in run order, as the list keeps them
    with pytest.raises(ConfigError, match="share the state_key"):
        CallbackList.states_of([*made, Counter("mid", 1, 4)])


def test_a_non_callback_is_refused(data):
    x, y = data
    with pytest.raises(ConfigError, match=r"callbacks\[0\] is a function, not a jaxfit.Callback"):
        make_trainer().fit(MLP(), (x, y), epochs=1, callbacks=[lambda: None])


def test_a_callback_that_declines_batch_hooks_is_left_out_of_that_epochs_batches(data):
    x, y = data  # 40 samples, batch 16: 3 batches per epoch

    class OddEpochs(Callback):
        def __init__(self):
            self.batches, self.asked = [], []

        def wants_batch_hooks(self, trainer):
            self.asked.append(trainer.epoch)
            return trainer.epoch % 2 == 1

        def on_train_batch_start(self, trainer):
            self.batches.append(("start", trainer.epoch))

        def on_train_batch_end(self, trainer, logs):
            self.batches.append(("end", trainer.epoch))

    class Always(Callback):
        def __init__(self):
            self.ends = 0

        def on_train_batch_end(self, trainer, logs):
            self.ends += 1

    odd, always = OddEpochs(), Always()
    make_trainer().fit(MLP(), (x[:40], y[:40]), epochs=3, batch_size=16, callbacks=[odd, always])
    assert odd.asked == [1, 2, 3]  # once per epoch, after on_epoch_start
    assert odd.batches == [(kind, e) for e in (1, 3) for _ in range(3) for kind in ("start", "end")]
    assert always.ends == 9  # another callback's answer changes nothing for it


def test_an_error_in_wants_batch_hooks_names_the_callback(data):
    class Broken(Callback):
        def wants_batch_hooks(self, trainer):
            raise ValueError("no idea")

        def on_train_batch_end(self, trainer, logs):
            pass

    x, y = data
    with pytest.raises(CallbackError, match=r"Broken.*wants_batch_hooks.*no idea"):
        make_trainer().fit(MLP(), (x, y), epochs=1, batch_size=16, callbacks=[Broken()])


def test_builtins_decline_batch_hooks_that_would_do_nothing(data, tmp_path):
    pytest.importorskip("tensorboardX")
    from jaxfit.callbacks import ModelCheckpoint, RichProgress, TensorBoard, TerminateOnNaN, Timer

    x, y = data

    class Seen(Callback):
        order = 10_000

        def on_epoch_end(self, trainer, logs):
            self.per_epoch.append(sorted(
                type(cb).__name__ for cb in trainer.callbacks._by_hook["on_train_batch_end"]))

    seen = Seen()
    seen.per_epoch = []
    by_epoch = ModelCheckpoint(tmp_path / "a")
    by_step = ModelCheckpoint(tmp_path / "b", every_n_steps=2)
    make_trainer().fit(MLP(), (x, y), epochs=2, batch_size=16, verbose=0,
                       callbacks=[by_epoch, RichProgress(live=False), Timer(3600, check="step"),
                                  seen])
    # RichProgress times the fit's first execution, then (not live) needs no batch hook.
    assert seen.per_epoch == [["RichProgress", "Timer"], ["Timer"]]
    seen.per_epoch = []
    make_trainer().fit(MLP(), (x, y), epochs=1, batch_size=16, verbose=0,
                       callbacks=[by_step, RichProgress(live=True), seen])
    assert seen.per_epoch == [["ModelCheckpoint", "RichProgress"]]
    seen.per_epoch = []
    for every, wanted in ((None, []), (3, ["TensorBoard", "TerminateOnNaN"])):
        seen.per_epoch = []
        make_trainer().fit(MLP(), (x, y), epochs=1, batch_size=16, verbose=0,
                           callbacks=[TerminateOnNaN(every_n_steps=every),
                                      TensorBoard(tmp_path / f"tb{every}", every_n_steps=every),
                                      seen])
        assert seen.per_epoch == [wanted]  # a batch hook only with every_n_steps
