"""steps_per_execution's scan unroll: "auto" unrolls convolution steps on CPU only."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from jaxfit import ConfigError, Trainer
from jaxfit.engine import auto_unroll


class TinyCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(2, (3, 3))(x))
        return nn.Dense(3)(x.reshape((x.shape[0], -1)))


def _fit(model, x, y, **kwargs):
    trainer = Trainer(optimizer=optax.sgd(0.1), steps_per_execution=2, **kwargs)
    trainer.fit(model, (x, y), epochs=1, batch_size=4)
    return trainer


def test_auto_unrolls_a_convolution_step_fully_on_cpu():
    rng = np.random.default_rng(0)
    x = rng.random((8, 5, 5, 1), dtype=np.float32)
    y = np.arange(8) % 3
    trainer = _fit(TinyCNN(), x, y)
    assert trainer.fit_config["scan_unroll"] is True


def test_auto_keeps_a_dense_step_rolled(data):
    trainer = _fit(nn.Dense(3), *data)
    assert trainer.fit_config["scan_unroll"] == 1


def test_explicit_unroll_is_used_as_given(data):
    trainer = _fit(nn.Dense(3), *data, scan_unroll=2)
    assert trainer.fit_config["scan_unroll"] == 2


def test_auto_unroll_finds_convolutions_nested_in_control_flow():
    def step(x):
        kernel = jax.numpy.ones((3, 3, 1, 1))
        conv = lambda v: jax.lax.conv_general_dilated(v, kernel, (1, 1), "SAME",  # noqa: E731
                                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jax.lax.cond(x.sum() > 0, conv, lambda v: v, x)

    assert auto_unroll(step, jax.ShapeDtypeStruct((1, 4, 4, 1), np.float32)) is True
    assert auto_unroll(lambda x: x * 2, jax.ShapeDtypeStruct((3,), np.float32)) == 1


@pytest.mark.parametrize("bad", [0, -1, "fast", 1.5, False])
def test_invalid_scan_unroll_is_rejected(bad):
    with pytest.raises(ConfigError, match='scan_unroll must be "auto", True or an int >= 1'):
        Trainer(optimizer=optax.sgd(0.1), scan_unroll=bad)


def _fake_step(delay):
    def step(state, batch, mask):
        import time

        time.sleep(delay)
        return state + 1, np.float32(state)

    return step


@pytest.mark.parametrize("fused_delay, single_delay, expected", [(0.001, 0.01, "fused"),
                                                                 (0.05, 0.0, "single steps")])
def test_fusion_chooser_keeps_the_faster_way(fused_delay, single_delay, expected):
    from jaxfit._fusion import FusionChooser
    from jaxfit.data import Execution

    chosen = []
    chooser = FusionChooser(chosen.append)
    ex = Execution((np.zeros((4, 2, 3)), np.zeros((4, 2))), (2, 2, 2, 2), 2)
    state = 0
    for _ in range(8):
        state, _ = chooser.run(_fake_step(fused_delay), _fake_step(single_delay), state, ex,
                               lambda e: None)
    assert chosen == [expected]
    assert chooser.mode == expected


def test_fused_and_single_steps_train_identically(data):
    from jaxfit import _fusion

    x, y = data
    results = []
    for forced in (_fusion.FUSED, _fusion.SINGLE):
        trainer = Trainer(optimizer=optax.adam(1e-2), steps_per_execution=4)
        original = _fusion.FusionChooser.run

        def run(self, *args, _forced=forced):
            self.mode = _forced
            return original(self, *args)

        _fusion.FusionChooser.run = run
        try:
            trainer.fit(nn.Dense(3), (x, y), epochs=2, batch_size=8)
        finally:
            _fusion.FusionChooser.run = original
        results.append((trainer.history.history["loss"], jax.device_get(trainer.params)))
    (loss_f, params_f), (loss_s, params_s) = results
    np.testing.assert_allclose(loss_f, loss_s, rtol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                           params_f, params_s)


def test_fit_reports_the_execution_it_chose(data):
    trainer = Trainer(optimizer=optax.sgd(0.1), steps_per_execution=2)
    trainer.fit(nn.Dense(3), data, epochs=3, batch_size=4)  # 18 batches: 9 executions per epoch
    assert trainer.fit_config["execution"] in ("fused", "single steps")


def test_unrolled_or_explicit_fusion_is_not_second_guessed():
    from jaxfit._fusion import FusionChooser
    from jaxfit.data import Execution

    chosen = []
    chooser = FusionChooser(chosen.append, measure=lambda: False)
    ex = Execution((np.zeros((2, 1, 3)), np.zeros((2, 1))), (1, 1), 1)
    calls = []

    def single(state, batch, mask):
        calls.append("single")
        return state, np.float32(0)

    for _ in range(4):
        chooser.run(_fake_step(0.0), single, 0, ex, lambda e: None)
    assert chosen == ["fused"] and calls == []


def test_explicit_scan_unroll_keeps_executions_fused(data):
    trainer = Trainer(optimizer=optax.sgd(0.1), steps_per_execution=2, scan_unroll=1)
    trainer.fit(nn.Dense(3), data, epochs=1, batch_size=4)
    assert trainer.fit_config["execution"] == "fused"


def test_an_unrolled_convolution_step_stays_fused():
    rng = np.random.default_rng(0)
    x = rng.random((8, 5, 5, 1), dtype=np.float32)
    trainer = _fit(TinyCNN(), x, np.arange(8) % 3)
    assert trainer.fit_config["scan_unroll"] is True
    assert trainer.fit_config["execution"] == "fused"
