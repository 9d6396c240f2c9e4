"""LambdaCallback: a callback from plain functions, for one-off needs."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from typing import Any

from jaxfit.callback import HOOKS, Callback
from jaxfit.errors import ConfigError

_instances = itertools.count(1)


class LambdaCallback(Callback):
    """A callback whose hooks are the functions given, each taking the hook's arguments.

    Only the hooks given are hooks of this callback: the training loop never calls the
    others (a ``LambdaCallback(on_epoch_end=...)`` adds nothing to the per-step loop).

    Args:
        on_fit_start, on_epoch_start, on_train_batch_start, on_validation_start:
            ``fn(trainer)``.
        on_train_batch_end, on_validation_end, on_epoch_end, on_fit_end:
            ``fn(trainer, logs)``.
        order: where it runs among the callbacks (default 0; lower runs first).
        state_key: its name in checkpoints. It has no state to save, so by default each
            instance gets a distinct numbered key and any number can be used in one run.

    Example:
        >>> from jaxfit.callbacks import LambdaCallback
        >>> seen = []
        >>> cb = LambdaCallback(on_epoch_end=lambda trainer, logs: seen.append(logs["loss"]))
    """

    def __new__(
        cls, order: int = 0, state_key: str | None = None, **hooks: Callable[..., Any] | None
    ) -> LambdaCallback:
        unknown = sorted(set(hooks) - set(HOOKS))
        if unknown:
            raise ConfigError(f"LambdaCallback: unknown hooks {unknown}; hooks are {list(HOOKS)}")
        given = tuple(h for h in HOOKS if hooks.get(h) is not None)
        return super().__new__(_with_hooks(given))

    def __init__(
        self, order: int = 0, state_key: str | None = None, **hooks: Callable[..., Any] | None
    ) -> None:
        if isinstance(order, bool) or not isinstance(order, int):
            raise ConfigError(f"LambdaCallback: order must be an int, got {order!r}")
        for name, fn in hooks.items():
            if fn is not None and not callable(fn):
                raise ConfigError(
                    f"LambdaCallback: {name} must be callable, got {type(fn).__name__}"
                )
        self.order = order
        self.hooks = {h: fn for h, fn in hooks.items() if fn is not None}
        self._state_key = state_key or f"LambdaCallback-{next(_instances)}"

    @property
    def state_key(self) -> str:
        return self._state_key

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuild through the constructor: the per-hook subclass is not importable by name.
        return (_rebuild, (self.order, self._state_key, self.hooks), self.__dict__)

    def __repr__(self) -> str:
        return f"LambdaCallback({', '.join(self.hooks)})"


def _rebuild(order: int, state_key: str, hooks: dict[str, Callable[..., Any]]) -> LambdaCallback:
    return LambdaCallback(order=order, state_key=state_key, **hooks)


def _forward(hook: str) -> Callable[..., Any]:
    def call(self: LambdaCallback, *args: Any) -> None:
        self.hooks[hook](*args)

    call.__name__ = hook
    return call


@functools.cache
def _with_hooks(hooks: tuple[str, ...]) -> type:
    # The dispatcher calls a hook only when the callback's class overrides it, so each set
    # of given hooks gets a subclass that defines exactly those.
    namespace: dict[str, Any] = {h: _forward(h) for h in hooks}
    namespace["__module__"] = __name__
    return type("LambdaCallback", (LambdaCallback,), namespace)
