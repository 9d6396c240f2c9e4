"""flax.linen and flax.nnx modules behind one pure ``init`` / ``apply`` interface.

The jitted step only ever sees pytrees: ``params`` (what the optimizer trains) and
``model_state`` (every other collection: linen ``batch_stats`` and friends, nnx
``BatchStat`` and ``nnx.Rngs`` state).
"""

from __future__ import annotations

import inspect
from typing import Any

import jax
from flax import linen as nn
from flax import nnx

from jaxfit.errors import ConfigError


def _takes_train(fn: Any) -> bool:
    try:
        return "train" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


_INIT_CACHE: dict[Any, Any] = {}


def _jitted_init(module: nn.Module, takes_train: bool) -> Any:
    """A jitted ``module.init``, shared by every trainer of an equal module: compiling the
    initialisation costs seconds for a CNN on CPU, and studies build many trainers."""
    kwargs = {"train": False} if takes_train else {}

    def init(rngs: Any, x: Any) -> Any:
        return module.init(rngs, x, **kwargs)

    try:
        key = (module, takes_train)
        hash(key)
    except TypeError:  # a module with unhashable attributes: compile for this trainer only
        return jax.jit(init)
    if key not in _INIT_CACHE:
        if len(_INIT_CACHE) >= 64:
            _INIT_CACHE.pop(next(iter(_INIT_CACHE)))
        _INIT_CACHE[key] = jax.jit(init)
    return _INIT_CACHE[key]


class ModelAdapter:
    """Wraps a flax module.

    * linen: variables are created by ``module.init`` on the first batch, with the params
      key and the ``"dropout"`` base key derived from the trainer's seed.
    * nnx: the module the user built is the initial state (nnx modules initialise when they
      are constructed, from the ``nnx.Rngs`` the user passed); its RNG streams travel in
      ``model_state``, so dropout continues exactly across a resume.

    A module whose ``__call__`` has a ``train`` argument receives ``train=True`` in training
    and ``train=False`` in evaluation; an nnx module without one is switched with
    ``.train()`` / ``.eval()``.
    """

    def __init__(self, module: Any) -> None:
        if isinstance(module, nn.Module):
            self.kind = "linen"
        elif isinstance(module, nnx.Module):
            self.kind = "nnx"
            self._graphdef, params, rest = nnx.split(module, nnx.Param, ...)
            self._initial = (params, rest)
        else:
            raise ConfigError(
                f"model must be a flax.linen.Module or a flax.nnx.Module, got {type(module).__name__}"
            )
        self.module = module
        self.takes_train = _takes_train(type(module).__call__)

    def init(self, key: jax.Array, x: Any) -> tuple[Any, Any]:
        """(params, model_state) for inputs shaped like ``x``."""
        if self.kind == "nnx":
            # Copies: the train step donates its state, which must not delete the arrays of
            # the module the user still holds.
            return jax.tree_util.tree_map(lambda a: a.copy(), self._initial)
        params_key, dropout_key = jax.random.split(key)
        variables = dict(_jitted_init(self.module, self.takes_train)({"params": params_key, "dropout": dropout_key}, x))
        params = variables.pop("params", {})
        return params, variables

    def apply(self, params: Any, model_state: Any, x: Any, *, train: bool, rng: jax.Array | None) -> tuple[Any, Any]:
        """(outputs, new model_state). Evaluation returns ``model_state`` unchanged."""
        if self.kind == "nnx":
            # Rebuild the Variables at the current trace level (inside grad): nnx refuses to
            # mutate a Variable created at an outer level (the jit trace).
            fresh = lambda tree: jax.tree_util.tree_map(lambda a: a, tree)  # noqa: E731
            model = nnx.merge(self._graphdef, fresh(params), fresh(model_state))
            if self.takes_train:
                out = model(x, train=train)
            else:
                model.train() if train else model.eval()
                out = model(x)
            if not train:
                return out, model_state
            _, _, new_state = nnx.split(model, nnx.Param, ...)
            return out, new_state
        kwargs = {"train": train} if self.takes_train else {}
        variables = {"params": params, **model_state}
        rngs = {"dropout": rng} if rng is not None else None
        if train and model_state:
            out, updates = self.module.apply(variables, x, rngs=rngs, mutable=list(model_state), **kwargs)
            return out, {**model_state, **updates}
        return self.module.apply(variables, x, rngs=rngs, **kwargs), model_state

    def sync_module(self, params: Any, model_state: Any) -> None:
        """Write the trained state back into the user's nnx module (copies, so the next
        donating step leaves it intact). Linen modules hold no state: nothing to do."""
        if self.kind == "nnx":
            nnx.update(self.module, *jax.tree_util.tree_map(lambda a: a.copy(), (params, model_state)))

    def merged(self, params: Any, model_state: Any) -> Any:
        """An nnx module holding the given state (for users who want the object back)."""
        if self.kind != "nnx":
            raise ConfigError("merged() is for nnx models; linen models are stateless")
        return nnx.merge(self._graphdef, params, model_state)
