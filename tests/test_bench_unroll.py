"""steps_per_execution's scan unroll: "auto" unrolls convolution steps on CPU only."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from jaxfit import ConfigError, Trainer
from jaxfit.steps import auto_unroll


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
