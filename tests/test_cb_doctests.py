"""The examples in the built-in callbacks' docstrings run."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import jaxfit.callbacks as callbacks

MODULES = sorted(m.name for m in pkgutil.iter_modules(callbacks.__path__))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write (CSVLogger, checkpoints) stay in tmp
    module = importlib.import_module(f"jaxfit.callbacks.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0
