"""Argument checks shared by the built-in callbacks: one message format for all."""

from __future__ import annotations

from typing import Any

import jax

from jaxfit.errors import ConfigError


def primary_process() -> bool:
    """True in the one process that writes logs and prints (process 0 of a multi-host run).

    Every process runs every callback (decisions such as early stopping must agree), but a
    file or a console shared by N processes would get N copies.
    """
    return jax.process_index() == 0


def check_count(owner: str, name: str, value: Any, minimum: int = 0) -> int:
    """``value`` as an int >= ``minimum``, or a ConfigError naming ``owner`` and ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(
            f"{owner}: {name} must be an integer >= {minimum}, got {name} = {value!r}"
        )
    return value


def check_every(owner: str, name: str, value: Any) -> int | None:
    """A frequency in steps: ``None`` (off) or an int >= 1."""
    return None if value is None else check_count(owner, name, value, minimum=1)


def check_number(owner: str, name: str, value: Any, minimum: float = 0.0) -> float:
    """``value`` as a float >= ``minimum`` (NaN refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= minimum:
        raise ConfigError(f"{owner}: {name} must be a number >= {minimum}, got {name} = {value!r}")
    return float(value)


class EveryNSteps:
    """``due(step)`` is True once per multiple of ``n`` crossed, steps_per_execution or not."""

    def __init__(self, n: int | None) -> None:
        self.n = n
        self._next = 0

    def start(self, step: int) -> None:
        """Count from ``step`` (the step a fit starts at): the next multiple of n is due."""
        if self.n is not None:
            self._next = (step // self.n + 1) * self.n

    def due(self, step: int) -> bool:
        if self.n is None or step < self._next:
            return False
        self.start(step)
        return True
