"""The harness's W4 (lm1b's Transformer LM), the full-form contender and the scaling table.

W4's hand loop A (lm1b's train step) and jaxfit's full-form lm1b loss train alike; the
full-form cross-entropy of `jaxfit-fullform` trains as the built-in loss does. Nothing here
is timed.
"""

from __future__ import annotations

import jax
import numpy as np

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
