"""The shared monitor rule: mode inference and the improvement test, negative values included."""

from __future__ import annotations

import math

import pytest

from jaxfit import ConfigError
from jaxfit.callbacks import MonitorCallback
from jaxfit.callbacks._monitor import infer_mode


@pytest.mark.parametrize(
    "name, mode",
    [
        ("loss", "min"),
        ("val_loss", "min"),
        ("val_mse", "min"),
        ("mean_absolute_error", "min"),
        ("accuracy", "max"),
        ("val_accuracy", "max"),
        ("top_5_accuracy", "max"),
        ("val_auc", "max"),
    ],
)
def test_auto_mode_follows_what_the_name_measures(name, mode):
    assert infer_mode(name) == mode


def test_auto_mode_refuses_to_guess_an_unknown_name():
    with pytest.raises(
        ConfigError, match="cannot tell whether 'val_score'.*mode='min' or mode='max'"
    ):
        MonitorCallback(monitor="val_score")


@pytest.mark.parametrize(
    "mode, best, value, min_delta, improves",
    [
        ("min", 1.0, 0.9, 0.0, True),
        ("min", 1.0, 1.0, 0.0, False),  # equal is not better
        ("min", 1.0, 0.95, 0.1, False),  # better, but by less than min_delta
        ("min", -1.0, -1.2, 0.1, True),  # negative values: absolute, not relative
        ("min", -1.0, -1.05, 0.1, False),
        ("max", -3.0, -2.0, 0.5, True),
        ("max", -3.0, -2.8, 0.5, False),
        ("max", 0.5, 0.6, 0.0, True),
        ("min", 1.0, math.nan, 0.0, False),  # NaN never improves
        ("max", 1.0, math.nan, 0.0, False),
        ("min", math.inf, 1e30, 0.0, True),  # the starting best
        ("max", -math.inf, -1e30, 0.0, True),
    ],
)
def test_improvement_is_beating_best_by_more_than_min_delta(mode, best, value, min_delta, improves):
    m = MonitorCallback(monitor="loss", mode=mode, min_delta=min_delta)
    m.best = best
    assert m.is_improvement(value) is improves


def test_starting_best_is_the_worst_value_of_the_mode():
    assert MonitorCallback(monitor="loss").best == math.inf
    assert MonitorCallback(monitor="accuracy").best == -math.inf


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            dict(mode="minimum"),
            r"mode must be one of \('auto', 'min', 'max'\), got mode = 'minimum'",
        ),
        (dict(min_delta=-0.1), r"min_delta must be a number >= 0.0, got min_delta = -0.1"),
        (dict(monitor=""), "monitor must be a log key"),
    ],
)
def test_bad_monitor_arguments_fail_at_construction(kwargs, match):
    kwargs.setdefault("monitor", "loss")
    with pytest.raises(ConfigError, match=match):
        MonitorCallback(**kwargs)
