"""TerminateOnNaN with ModelCheckpoint: no checkpoint ever holds non-finite weights.

ModelCheckpoint writes nothing once ``trainer.stop_reason == "terminate_on_nan"``, and it
checks the host copy of the params of every save itself: a save with NaN or inf weights is
skipped with a warning, whoever watches the loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cb_helpers import tiny_data
from conftest import MLP, make_trainer

from jaxfit.callbacks import LambdaCallback, ModelCheckpoint, TerminateOnNaN
from jaxfit.checkpoint import list_checkpoints, read_checkpoint


def poison_after(step: int) -> LambdaCallback:
    def hook(trainer, logs):
        if trainer.step == step:
            trainer.params = jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), trainer.params)

    return LambdaCallback(on_train_batch_end=hook)


@pytest.mark.parametrize("ckpt_kwargs", [dict(), dict(every_n_steps=2)], ids=["epoch_end", "every_2_steps"])
def test_no_checkpoint_holds_nan_weights(tmp_path, ckpt_kwargs):
    # Weights turn NaN after step 9 (epoch 2); TerminateOnNaN sees it at step 12.
    trainer = make_trainer()
    ckpt = ModelCheckpoint(tmp_path, keep_last=None, background=False, **ckpt_kwargs)
    callbacks = [poison_after(9), TerminateOnNaN(every_n_steps=3), ckpt]
    if ckpt_kwargs:  # the step-10 save comes before TerminateOnNaN's check at step 12
        with pytest.warns(RuntimeWarning, match="not saving step 10: the params hold NaN"):
            trainer.fit(MLP(), tiny_data(128), epochs=3, batch_size=16, callbacks=callbacks)
        assert ckpt.skipped_nonfinite == [10]
    else:
        trainer.fit(MLP(), tiny_data(128), epochs=3, batch_size=16, callbacks=callbacks)
    assert trainer.stop_reason == "terminate_on_nan"
    saved = list_checkpoints(tmp_path)
    assert saved and max(c.step for c in saved) <= 9
    for info in saved:
        _, _, state = read_checkpoint(info.path)
        params = jax.tree.leaves(state["train_state"]["state"]["params"])
        assert all(np.isfinite(p).all() for p in params), info.name
