"""LRScheduler + ReduceOnPlateau + EarlyStopping resumed through a real checkpoint, mid-epoch."""

from __future__ import annotations

import numpy as np
import optax
from cb_helpers import leaves, tiny_data
from conftest import MLP, make_trainer

from jaxfit import Trainer
from jaxfit.callbacks import (
    EarlyStopping,
    LambdaCallback,
    LRScheduler,
    ModelCheckpoint,
    ReduceOnPlateau,
)

SCHEDULE = optax.warmup_cosine_decay_schedule(0.0, 0.2, 4, 24, end_value=0.01)


def stop_at_step_10(trainer, logs):
    if trainer.step == 10:  # mid epoch 3 (4 steps an epoch)
        trainer.stop_training = True


def callbacks():
    return [
        LRScheduler(SCHEDULE),
        ReduceOnPlateau(monitor="loss", factor=0.5, patience=1, min_delta=1e9),
        EarlyStopping(monitor="loss", patience=100, restore_best=False),
    ]


def test_a_run_stopped_mid_epoch_and_loaded_ends_exactly_like_an_uninterrupted_one(tmp_path):
    straight = make_trainer()
    straight.fit(MLP(), tiny_data(), epochs=6, batch_size=16, callbacks=callbacks())

    first = make_trainer()
    first.fit(
        MLP(),
        tiny_data(),
        epochs=6,
        batch_size=16,
        callbacks=[
            *callbacks(),
            LambdaCallback(on_train_batch_end=stop_at_step_10),
            ModelCheckpoint(tmp_path),
        ],
    )
    assert (first.step, first.batch_in_epoch) == (10, 2)

    resumed = Trainer.load(tmp_path)
    assert (resumed.step, resumed.batch_in_epoch) == (10, 2)
    resumed.fit()

    assert resumed.step == straight.step == 24
    for a, b in zip(leaves(resumed.params), leaves(straight.params), strict=True):
        np.testing.assert_array_equal(a, b)
    for cls in (ReduceOnPlateau, EarlyStopping):
        assert (
            resumed.callbacks.find(cls)[0].state_dict()
            == straight.callbacks.find(cls)[0].state_dict()
        )
    # A reduction at the end of each of epochs 2..6; the plateau scale is checkpointed with
    # the train state, so the resumed run carries the two made before the stop.
    assert resumed.hyperparams["learning_rate"] == straight.hyperparams["learning_rate"]
    assert (
        resumed.hyperparams.scale("learning_rate")
        == straight.hyperparams.scale("learning_rate")
        == 0.5**5
    )
    assert resumed.history.history == straight.history.history
