"""The jaxfit.callbacks entry-point group: built-ins and third-party plugins are listed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import tomllib

import jaxfit.callbacks as callbacks
from jaxfit import Callback
from jaxfit.callbacks import available, load

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def plugin_on_path(tmp_path, monkeypatch):
    """An installed distribution (its dist-info) declaring one callback plugin."""
    (tmp_path / "acme_callbacks.py").write_text(
        "from jaxfit import Callback\n\n"
        "class SlackNotifier(Callback):\n"
        "    def on_fit_end(self, trainer, logs):\n"
        "        pass\n"
    )
    info = tmp_path / "acme_callbacks-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-callbacks\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[jaxfit.callbacks]\n"
        "SlackNotifier = acme_callbacks:SlackNotifier\n"
        "EarlyStopping = acme_callbacks:SlackNotifier\n"  # cannot shadow a built-in
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("acme_callbacks", None)


def test_a_third_party_plugin_is_listed_and_loads(plugin_on_path):
    plugins = available()
    assert plugins["SlackNotifier"].value == "acme_callbacks:SlackNotifier"
    cls = load("SlackNotifier")
    assert issubclass(cls, Callback) and cls.__module__ == "acme_callbacks"


def test_a_plugin_never_replaces_a_builtin(plugin_on_path):
    assert load("EarlyStopping") is callbacks.EarlyStopping


def test_every_registered_builtin_loads_as_a_callback():
    from jaxfit.callbacks._plugins import BUILTINS

    plugins = available()
    for name in BUILTINS:
        assert issubclass(plugins[name].load(), Callback), name


def test_builtins_are_listed_without_an_install():
    plugins = available()
    for name in [
        "EarlyStopping",
        "LRScheduler",
        "ReduceOnPlateau",
        "RichProgress",
        "History",
        "Timer",
    ]:
        assert plugins[name].load() is getattr(callbacks, name)
    assert list(plugins) == sorted(plugins)


def test_pyproject_registers_every_builtin_the_package_exports():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    registered = pyproject["project"]["entry-points"]["jaxfit.callbacks"]
    exported = {
        n
        for n, obj in vars(callbacks).items()
        if isinstance(obj, type) and issubclass(obj, Callback) and not n.startswith("Monitor")
    }
    assert exported <= set(registered)
    assert all(v == f"jaxfit.callbacks:{k}" for k, v in registered.items())
    from jaxfit.callbacks._plugins import BUILTINS

    assert set(BUILTINS) == set(registered)


def test_unknown_plugin_names_the_installed_ones():
    with pytest.raises(
        KeyError, match="no callback plugin named 'Wandb'; installed: CSVLogger, EarlyStopping"
    ):
        load("Wandb")
