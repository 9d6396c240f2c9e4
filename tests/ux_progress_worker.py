"""Trains a tiny model with RichProgress on a real terminal, for tests/test_ux_terminal.py.

Usage: python ux_progress_worker.py DIR. It trains 3 epochs of 8 steps; at step 5 of
epoch 2 (after the live bar's refresh) it writes DIR/paused and waits until DIR/go exists,
so the test can capture the screen with the bar, the table's first row and its header on
it; then it finishes and writes DIR/done.
"""

from __future__ import annotations

import os
import sys
import time

# Run with PYTHONPATH=<checkout>:<checkout>/tests (test_ux_terminal.py does): this jaxfit
# and the suite's helpers.
import numpy as np
import optax
from conftest import MLP

from jaxfit import Trainer
from jaxfit.callbacks import LambdaCallback, LRScheduler, RichProgress


def main() -> None:
    folder = sys.argv[1]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 4)).astype(np.float32)
    y = ((x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0)).astype(np.int32)

    def slow(trainer, logs):
        # Epoch 2 steps slower than the refresh period: RichProgress refreshes the bar at
        # each of them (it runs after this callback), the last time at batch 5.
        if 9 <= trainer.step <= 13:
            time.sleep(0.3)

    def pause(trainer, logs):
        if trainer.step == 13:  # epoch 2, batch 5: the bar has been refreshed
            time.sleep(0.6)  # rich redraws at 4 Hz: let it draw the refreshed values
            open(os.path.join(folder, "paused"), "w").close()
            while not os.path.exists(os.path.join(folder, "go")):
                time.sleep(0.05)

    trainer = Trainer(optimizer=optax.inject_hyperparams(optax.sgd)(learning_rate=0.1),
                      metrics=["accuracy"], seed=0)  # fmt: skip
    trainer.fit(
        MLP(), (x, y), validation_data=(x, y), epochs=3, batch_size=16,
        callbacks=[
            LRScheduler(optax.linear_schedule(0.1, 0.01, 24)),
            LambdaCallback(order=-1, on_train_batch_end=slow),
            RichProgress(refresh_per_second=4),
            LambdaCallback(order=300, on_train_batch_end=pause),
        ],
    )  # fmt: skip
    open(os.path.join(folder, "done"), "w").close()
    time.sleep(3600)  # keep the pane (the test kills the session)


if __name__ == "__main__":
    main()
