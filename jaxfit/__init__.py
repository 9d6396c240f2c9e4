"""jaxfit: a plugin-based, callback-driven trainer for JAX.

``Trainer.fit`` runs jitted, donated train steps and dispatches to callback plugins
(``jaxfit.callbacks``); ``Trainer.load(run).fit()`` resumes a run exactly where it stopped.

The names that need JAX (``Trainer``, ``TrainState``, ``HyperParams``) are imported on first
use (a module ``__getattr__``): ``import jaxfit``, the errors, ``Callback`` and ``History``
cost no JAX import, so ``python -m jaxfit --help`` and ``info`` answer at once.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import os
import sys
from typing import TYPE_CHECKING, Any

from jaxfit._allocator import tune_allocator as _tune_allocator
from jaxfit._version import __version__ as __version__
from jaxfit.callback import Callback as Callback
from jaxfit.callback import CallbackList as CallbackList
from jaxfit.errors import CallbackError as CallbackError
from jaxfit.errors import ConfigError as ConfigError
from jaxfit.errors import DataError as DataError
from jaxfit.errors import HyperparamError as HyperparamError
from jaxfit.errors import JaxfitError as JaxfitError
from jaxfit.errors import MonitorError as MonitorError
from jaxfit.errors import Preempted as Preempted
from jaxfit.errors import ShapeError as ShapeError
from jaxfit.history import History as History

if TYPE_CHECKING:  # pragma: no cover - for type checkers; at run time see __getattr__
    from jaxfit.hyperparams import HyperParams as HyperParams
    from jaxfit.metrics import Average as Average
    from jaxfit.step import Step as Step
    from jaxfit.step import StepContext as StepContext
    from jaxfit.step import TrainState as TrainState
    from jaxfit.trainer import Trainer as Trainer

# Public name -> the module that defines it, imported when the name is first looked up.
_LAZY = {
    "Average": "jaxfit.metrics",
    "HyperParams": "jaxfit.hyperparams",
    "Step": "jaxfit.step",
    "StepContext": "jaxfit.step",
    "TrainState": "jaxfit.step",
    "Trainer": "jaxfit.trainer",
}

__all__ = [
    "Average", "Callback", "CallbackError", "CallbackList", "ConfigError", "DataError", "History",
    "HyperParams", "HyperparamError", "JaxfitError", "MonitorError", "Preempted",
    "ShapeError", "Step", "StepContext", "TrainState", "Trainer", "__version__",
]  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # the next lookup is a plain attribute
        return value
    # `import jaxfit; jaxfit.trainer` worked while the engine was imported eagerly.
    if not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _CheckoutCallbacksFinder(importlib.abc.MetaPathFinder):
    """Serve ``jaxfit.callbacks`` from the checkout's top-level ``callbacks/`` folder.

    Installed wheels carry the plugins inside the package (pyproject maps the folder to
    ``jaxfit.callbacks``); running from a source checkout (pytest, a script next to the
    sources) they are one level up. Only that one name is mapped, so ``callbacks`` never
    becomes a top-level package.
    """

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "jaxfit.callbacks":
            return None
        return importlib.util.spec_from_file_location(
            fullname,
            os.path.join(self.folder, "__init__.py"),
            submodule_search_locations=[self.folder],
        )


_here = os.path.dirname(os.path.abspath(__file__))
_checkout_callbacks = os.path.join(os.path.dirname(_here), "callbacks")
if not os.path.isdir(os.path.join(_here, "callbacks")) and os.path.isfile(
    os.path.join(_checkout_callbacks, "__init__.py")
):
    sys.meta_path.insert(0, _CheckoutCallbacksFinder(_checkout_callbacks))

# Opt-in glibc malloc tuning for XLA:CPU (JAXFIT_MALLOC_TUNING=1): it must run before JAX's
# backend starts, so it runs on import (see _allocator).
_tune_allocator()
