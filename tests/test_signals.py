"""SIGTERM / Ctrl-C during fit: finish the step, run on_fit_end, raise, restore handlers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
from conftest import MLP, make_trainer

from jaxfit import Callback, Preempted


class SendAt(Callback):
    def __init__(self, signum, step):
        self.signum, self.at, self.ended = signum, step, None

    def on_train_batch_end(self, trainer, logs):
        if trainer.step == self.at:
            os.kill(os.getpid(), self.signum)

    def on_fit_end(self, trainer, logs):
        self.ended = (trainer.step, logs["stop_reason"])


def test_sigterm_finishes_the_step_and_raises_preempted(data):
    x, y = data
    before = signal.getsignal(signal.SIGTERM)
    cb = SendAt(signal.SIGTERM, 3)
    trainer = make_trainer()
    with pytest.raises(Preempted) as info:
        trainer.fit(MLP(), (x, y), epochs=3, batch_size=16, callbacks=[cb])
    assert info.value.code == 143
    assert cb.ended == (3, "preempted") and trainer.stop_reason == "preempted"
    assert (trainer.epoch, trainer.batch_in_epoch) == (0, 3)  # epochs completed, position in epoch 1
    assert signal.getsignal(signal.SIGTERM) is before


def test_ctrl_c_stops_cleanly_with_keyboard_interrupt(data):
    x, y = data
    before = signal.getsignal(signal.SIGINT)
    cb = SendAt(signal.SIGINT, 2)
    trainer = make_trainer()
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(MLP(), (x, y), epochs=3, batch_size=16, callbacks=[cb])
    assert cb.ended == (2, "interrupted")
    assert signal.getsignal(signal.SIGINT) is before
    trainer.fit(callbacks=[])  # and the run continues where it stopped
    assert trainer.step == 15


@pytest.mark.multiprocess
def test_preempted_process_exits_with_status_143(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})
        import numpy as np
        from conftest import MLP, make_trainer
        from test_signals import SendAt
        x = np.random.rand(64, 4).astype("float32"); y = np.arange(64) % 3
        make_trainer().fit(MLP(), (x, y), epochs=2, batch_size=16, callbacks=[SendAt(signal.SIGTERM, 2)])
        print("not reached")
    """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 143, proc.stderr
    assert "not reached" not in proc.stdout
