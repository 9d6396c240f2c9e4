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
            return self._initial
        kwargs = {"train": False} if self.takes_train else {}
        params_key, dropout_key = jax.random.split(key)
        variables = jax.jit(lambda x: self.module.init({"params": params_key, "dropout": dropout_key}, x, **kwargs))(x)
        variables = dict(variables)
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

    def merged(self, params: Any, model_state: Any) -> Any:
        """An nnx module holding the given state (for users who want the object back)."""
        if self.kind != "nnx":
            raise ConfigError("merged() is for nnx models; linen models are stateless")
        return nnx.merge(self._graphdef, params, model_state)
