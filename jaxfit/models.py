"""flax.linen and flax.nnx modules behind one pure interface, called the way they declare.

The jitted step only ever sees pytrees: ``params`` (what the optimizer trains) and
``model_state`` (the other variables: linen ``batch_stats`` and friends, nnx ``BatchStat``
and ``nnx.Rngs`` state). Values a model *sows* (linen ``self.sow``, nnx ``nnx.Intermediate``)
are never model state: they are collected fresh by every call and handed to the loss.

How a module is called (``ModelAdapter.call``):

* Inputs: a tuple or list is passed as positional arguments, ``model(*inputs)``; a dict
  whose keys are all parameter names of ``__call__`` as keywords, ``model(**inputs)``;
  anything else (an array, another dict, a graph batch) as the one argument.
* Mode flags, whichever ``__call__`` declares: ``train``, ``training`` and ``is_training``
  get ``True`` in training, ``deterministic`` gets ``False``; evaluation gets the
  opposite. An nnx module that declares none is switched with ``.train()`` / ``.eval()``.
* Randomness: linen gets one key per RNG stream (``"dropout"`` and any other stream the
  model asks for, found when the step is first traced); an nnx module whose ``__call__``
  takes ``rngs`` gets an ``nnx.Rngs`` made from the step key. Every key is derived from
  the trainer's seed and the step number (see ``jaxfit.step.stream_key``).
"""

from __future__ import annotations

import inspect
import re
import zlib
from typing import Any, cast

import jax
import jax.numpy as jnp
from flax import errors as flax_errors
from flax import linen as nn
from flax import nnx

from jaxfit.errors import ConfigError

TRUE_FLAGS = ("train", "training", "is_training")
FALSE_FLAGS = ("deterministic",)
_RNG_NEEDED = re.compile(r'needs PRNG for "([^"]+)"')


def _parameters(fn: Any) -> dict[str, inspect.Parameter]:
    try:
        params = dict(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return {}
    params.pop("self", None)
    return params


def missing_stream(error: BaseException) -> str | None:
    """The RNG stream a linen ``InvalidRngError`` asks for, or None."""
    m = _RNG_NEEDED.search(str(error))
    return m.group(1) if m else None


_INIT_CACHE: dict[Any, Any] = {}


def _jitted_init(module: nn.Module, kwargs_key: tuple) -> Any:
    """A jitted ``module.init``, shared by every trainer of an equal module: compiling the
    initialisation costs seconds for a CNN on CPU, and studies build many trainers."""
    kwargs = dict(kwargs_key)

    def init(rngs: Any, args: tuple, kw: dict) -> Any:
        return module.init(rngs, *args, **kw, **kwargs)

    try:
        key = (module, kwargs_key)
        hash(key)
    except TypeError:  # a module with unhashable attributes: compile for this trainer only
        return jax.jit(init)
    if key not in _INIT_CACHE:
        if len(_INIT_CACHE) >= 64:
            _INIT_CACHE.pop(next(iter(_INIT_CACHE)))
        _INIT_CACHE[key] = jax.jit(init)
    return _INIT_CACHE[key]


def _is_sown(collection: Any) -> bool:
    """True for a collection written by ``sow``: every entry is a tuple of values."""
    leaves = jax.tree_util.tree_flatten_with_path(collection)[0]
    return bool(leaves) and all(
        path and isinstance(path[-1], jax.tree_util.SequenceKey) for path, _ in leaves
    )


class ModelAdapter:
    """Wraps a flax module for the step: ``init`` once, then ``call`` inside the step.

    * linen: variables are created by ``module.init`` on the first batch. Collections the
      model sows into (``intermediates`` always, and any collection made only of sow
      tuples) are left out of ``model_state``.
    * nnx: the module the user built is the initial state (nnx modules initialise when
      they are constructed); its RNG streams travel in ``model_state``, so dropout continues
      exactly across a resume. ``nnx.Intermediate`` values are left out of the state.
    """

    def __init__(self, module: Any) -> None:
        if isinstance(module, nn.Module):
            self.kind = "linen"
        elif isinstance(module, nnx.Module):
            self.kind = "nnx"
            self._graphdef, params, rest = cast("tuple[nnx.GraphDef, Any, Any]", nnx.split(module, nnx.Param, ...))
            self._initial = (params, rest)
        else:
            raise ConfigError(
                f"model must be a flax.linen.Module or a flax.nnx.Module, got {type(module).__name__}"
            )
        self.module = module
        self.call_params = _parameters(type(module).__call__)
        self.flags = [f for f in (*TRUE_FLAGS, *FALSE_FLAGS) if f in self.call_params]
        self.takes_rngs = self.kind == "nnx" and "rngs" in self.call_params
        self.streams: list[str] = ["dropout"]
        self.sown: list[str] = ["intermediates"]

    # ---------------------------------------------------------------- inputs
    def arguments(self, inputs: Any) -> tuple[tuple, dict]:
        """Positional and keyword arguments for ``inputs`` (see the module docstring)."""
        if isinstance(inputs, (tuple, list)) and not hasattr(inputs, "_fields"):
            return tuple(inputs), {}
        if isinstance(inputs, dict) and inputs and all(k in self.call_params for k in inputs):
            return (), dict(inputs)
        return (inputs,), {}

    def flag_kwargs(self, train: bool, given: dict) -> dict:
        return {f: (train if f in TRUE_FLAGS else not train) for f in self.flags if f not in given}

    def _unfilled(self, name: str, args: tuple, kwargs: dict) -> bool:
        if name in kwargs:
            return False
        positional = [n for n, p in self.call_params.items()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        return not (name in positional and positional.index(name) < len(args))

    # ------------------------------------------------------------------ init
    def init(self, key: jax.Array, inputs: Any) -> tuple[Any, Any]:
        """(params, model_state) for inputs shaped like ``inputs``. Runs jitted, or under
        ``jax.eval_shape`` to build a template without computing anything."""
        if self.kind == "nnx":
            # Copies: the train step donates its state, which must not delete the arrays of
            # the module the user still holds.
            params, rest = jax.tree_util.tree_map(_copy, self._initial)
            return params, _drop_intermediates(rest)
        args, kwargs = self.arguments(inputs)
        flags = tuple(sorted(self.flag_kwargs(False, kwargs).items()))
        init = _jitted_init(self.module, flags)
        return self.split_variables(self.init_streams(key, lambda rngs: init(rngs, args, kwargs)))

    def init_streams(self, key: jax.Array, init: Any) -> Any:
        """``init(rngs)`` with keys for ``"params"``, ``"dropout"`` and every other stream the
        model asks for while it initialises (seq2seq's ``"lstm"``)."""
        params_key, dropout_key = jax.random.split(key)
        rngs = {"params": params_key, "dropout": dropout_key}
        for _ in range(16):
            try:
                return init(rngs)
            except flax_errors.InvalidRngError as e:
                name = missing_stream(e)
                if name is None or name in rngs:
                    raise
                if name not in self.streams:
                    self.streams.append(name)
                rngs = {**rngs, name: jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)}
        raise ConfigError("the model asks for more than 16 RNG streams while it initialises")

    def split_variables(self, variables: Any) -> tuple[Any, Any]:
        """(params, model_state) of linen variables; sown collections are left out."""
        variables = dict(variables)
        params = variables.pop("params", {})
        for name in [n for n, col in variables.items() if n == "intermediates" or _is_sown(col)]:
            variables.pop(name)
            if name not in self.sown:
                self.sown.append(name)
        return params, variables

    # ------------------------------------------------------------------ call
    def call(self, params: Any, model_state: Any, args: tuple, kwargs: dict, *, train: bool,
             key: jax.Array | None, stream_key: Any, method: str | None = None) -> tuple[Any, Any, dict]:
        """``(outputs, new model_state, sown)``; evaluation returns ``model_state`` unchanged.

        ``stream_key(key, name)`` derives the key of one RNG stream from the step key.
        """
        if self.kind == "nnx":
            return self._call_nnx(params, model_state, args, kwargs, train=train, key=key,
                                  stream_key=stream_key, method=method)
        kwargs = {**self.flag_kwargs(train, kwargs), **kwargs} if method is None else kwargs
        variables = {"params": params, **model_state}
        rngs = {s: stream_key(key, s) for s in self.streams} if key is not None else None
        mutable = [*(model_state if train else []), *self.sown]
        for _ in range(16):
            try:
                out, updates = self.module.apply(variables, *args, rngs=rngs, mutable=mutable,
                                                 method=method, **kwargs)
                break
            except flax_errors.InvalidRngError as e:
                # A stream other than "dropout" ("lstm", a VAE's "sample"): the model says
                # which when the step is first traced; it gets its own key from then on.
                name = missing_stream(e)
                if key is None or name is None or name in self.streams:
                    raise
                self.streams.append(name)
                rngs = {s: stream_key(key, s) for s in self.streams}
        updates = dict(updates)
        sown = {name: updates.pop(name) for name in self.sown if name in updates}
        new_state = {**model_state, **updates} if train else model_state
        return out, new_state, sown

    def _call_nnx(self, params: Any, model_state: Any, args: tuple, kwargs: dict, *, train: bool,
                  key: jax.Array | None, stream_key: Any, method: str | None) -> tuple[Any, Any, dict]:
        # Rebuild the Variables at the current trace level (inside grad): nnx refuses to
        # mutate a Variable created at an outer level (the jit trace).
        fresh = lambda tree: jax.tree_util.tree_map(lambda a: a, tree)  # noqa: E731
        model = nnx.merge(self._graphdef, fresh(params), fresh(model_state))
        if not self.flags:
            model.train() if train else model.eval()
        kwargs = dict(kwargs)
        if method is None:
            kwargs = {**self.flag_kwargs(train, kwargs), **kwargs}
            if self.takes_rngs and key is not None and self._unfilled("rngs", args, kwargs):
                kwargs["rngs"] = nnx.Rngs(stream_key(key, "dropout"))
        fn = model if method is None else getattr(model, method)
        out = fn(*args, **kwargs)
        sown = nnx.pop(model, nnx.Intermediate)
        if not train:
            return out, model_state, _plain(sown)
        _, _, new_state = cast("tuple[nnx.GraphDef, Any, Any]", nnx.split(model, nnx.Param, ...))
        return out, new_state, _plain(sown)

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


def _copy(a: Any) -> Any:
    """A copy of an array or typed key that also works while tracing (``eval_shape``)."""
    if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(jnp.copy(jax.random.key_data(a)), impl=jax.random.key_impl(a))
    return jnp.copy(a)


def _drop_intermediates(state: Any) -> Any:
    if isinstance(state, nnx.State):
        _, kept = state.split(nnx.Intermediate, ...) if _has_intermediate(state) else (None, state)
        return kept
    return state


def _has_intermediate(state: Any) -> bool:
    try:
        return bool(jax.tree_util.tree_leaves(state.filter(nnx.Intermediate)))
    except Exception:  # noqa: BLE001 - an empty filter raises in some nnx versions
        return False


def _plain(state: Any) -> dict:
    """Sown nnx values as a plain nested dict (what ``ctx.sown`` holds for linen too)."""
    if isinstance(state, nnx.State):
        return nnx.to_pure_dict(state)
    return dict(state) if state else {}
