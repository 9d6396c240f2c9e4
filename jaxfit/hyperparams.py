"""``HyperParams``: read and write an optimizer's injected hyperparameters between steps.

optax keeps injected hyperparameters in ``opt_state.hyperparams`` as device arrays. A write
that keeps the stored dtype and placement does not recompile the step; a Python float
would (and a Python int would silently turn a learning rate into int32). Every write here
goes through the stored leaf's dtype and sharding.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any, Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxfit.errors import HyperparamError

if TYPE_CHECKING:  # pragma: no cover
    from jaxfit.trainer import Trainer

_INJECT_STATES = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)
_HOWTO = (
    "Inject it when building the optimizer, e.g. "
    "optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)"
)


class HyperparamSlot(NamedTuple):
    """Where one injected hyperparameter lives in the optimizer state."""

    name: str  # public name: the plain name, or "<path>.<name>" when injected twice
    node_path: tuple  # key path of the Inject*State node inside opt_state
    key: str  # the hyperparameter's name inside that node
    scheduled: bool  # given to optax as a schedule (optax recomputes it every step)


def find_slots(opt_state: Any) -> dict[str, HyperparamSlot]:
    """Every injected hyperparameter in ``opt_state`` (chains, MultiSteps, ... included)."""
    nodes = jax.tree_util.tree_flatten_with_path(opt_state, is_leaf=lambda n: isinstance(n, _INJECT_STATES))[0]
    found: list[tuple[tuple, str, bool]] = []
    for path, node in nodes:
        if not isinstance(node, _INJECT_STATES):
            continue
        sched = set(getattr(node, "hyperparams_states", {}) or {})
        for key, value in node.hyperparams.items():
            dtype = getattr(value, "dtype", None)
            # jnp.issubdtype: bfloat16 is not a numpy number (np.issubdtype says False).
            if getattr(value, "shape", None) == () and dtype is not None and jnp.issubdtype(dtype, jnp.number):
                found.append((tuple(path), key, bool(key in sched)))
    counts: dict[str, int] = {}
    for _, key, _ in found:
        counts[key] = counts.get(key, 0) + 1
    slots = {}
    for path, key, scheduled in found:
        name = key if counts[key] == 1 else f"{_path_str(path)}.{key}"
        slots[name] = HyperparamSlot(name, path, key, scheduled)
    return slots


def _path_str(path: tuple) -> str:
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
    return ".".join(parts) or "opt_state"


def node_at(tree: Any, path: tuple) -> Any:
    for k in path:
        if hasattr(k, "name"):
            tree = getattr(tree, k.name)
        elif hasattr(k, "idx"):
            tree = tree[k.idx]
        else:
            tree = tree[k.key]
    return tree


def with_values(opt_state: Any, slots: dict[str, HyperparamSlot], values: dict[str, Any]) -> Any:
    """A copy of ``opt_state`` with hyperparameters replaced, for use inside a traced step."""
    if not values:
        return opt_state
    by_node: dict[tuple, dict[str, Any]] = {}
    for name, v in values.items():
        slot = slots[name]
        by_node.setdefault(slot.node_path, {})[slot.key] = v

    def rebuild(node: Any, path: tuple) -> Any:
        if path in by_node:
            hp = dict(node.hyperparams)
            for key, v in by_node[path].items():
                hp[key] = jax.numpy.asarray(v, hp[key].dtype)
            return node._replace(hyperparams=hp)
        return node

    return jax.tree_util.tree_map_with_path(
        lambda p, n: rebuild(n, tuple(p)), opt_state, is_leaf=lambda n: isinstance(n, _INJECT_STATES)
    )


class HyperParams(MutableMapping):
    """The optimizer's injected hyperparameters as a mutable mapping of Python floats.

    * ``hp["learning_rate"]`` — the value the last step used (fetches one scalar).
    * ``hp["learning_rate"] = 1e-4`` — used from the next step on; no recompilation.
    * ``hp.attach_schedule(name, fn)`` — the jitted step computes ``fn(step) * hp.scale(name)``
      on the device before every update (``LRScheduler`` uses this; no host work per step).

    Example:
        >>> trainer = Trainer(optimizer=optax.inject_hyperparams(optax.adam)(learning_rate=1e-3))  # doctest: +SKIP
        >>> trainer.hyperparams["learning_rate"] = 3e-4  # doctest: +SKIP
    """

    def __init__(self, trainer: Trainer) -> None:
        self._trainer = trainer

    # -- lookup -----------------------------------------------------------------
    @property
    def _slots(self) -> dict[str, HyperparamSlot]:
        return self._trainer._hp_slots()

    def _slot(self, name: str) -> HyperparamSlot:
        slots = self._slots
        if name not in slots:
            known = ", ".join(sorted(slots)) or "none"
            raise HyperparamError(
                f"hyperparameter {name!r} is not injected into the optimizer "
                f"(injected: {known}). {_HOWTO}."
            )
        return slots[name]

    @property
    def names(self) -> list[str]:
        return sorted(self._slots)

    def is_scheduled(self, name: str) -> bool:
        """True when optax itself recomputes ``name`` from a schedule every step."""
        return self._slot(name).scheduled

    def check_writable(self, name: str, owner: Any = None) -> None:
        """Raise ``HyperparamError`` unless ``name`` is injected as a number."""
        slot = self._slot(name)
        if slot.scheduled:
            who = f"{type(owner).__name__} writes {name!r}, but " if owner is not None else ""
            raise HyperparamError(
                f"{who}hyperparameter {name!r} was injected as a schedule: optax recomputes it "
                "every step and ignores writes. Inject a number instead, e.g. "
                "optax.inject_hyperparams(optax.adam)(learning_rate=1e-3), and drive it with "
                "jaxfit.callbacks.LRScheduler(schedule)."
            )

    # -- mapping ----------------------------------------------------------------
    def __getitem__(self, name: str) -> float:
        slot = self._slot(name)
        node = node_at(self._trainer.state, slot.node_path)
        return float(jax.device_get(node.hyperparams[slot.key]))

    def __setitem__(self, name: str, value: Any) -> None:
        self.check_writable(name)
        owner = self._trainer._schedules.get(name, (None, None))[1]
        if owner is not None:
            raise HyperparamError(
                f"hyperparameter {name!r} is driven by {type(owner).__name__} (a schedule "
                "attached to the step), which would overwrite this write at the next step. "
                f"Scale it with trainer.hyperparams.set_scale({name!r}, factor) instead, or "
                "remove the scheduler."
            )
        slot = self._slot(name)
        node = node_at(self._trainer.state, slot.node_path)
        node.hyperparams[slot.key] = _like(node.hyperparams[slot.key], value, name)

    def __delitem__(self, name: str) -> None:
        raise TypeError("injected hyperparameters cannot be deleted")

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self._slots)

    def __repr__(self) -> str:
        try:
            return f"HyperParams({dict(self.items())})"
        except Exception:  # no state yet
            return f"HyperParams(names={self.names})"

    # -- schedules inside the step -----------------------------------------------
    def attach_schedule(self, name: str, fn: Callable[[Any], Any], owner: Any = None,
                        count: str = "updates") -> None:
        """Compute ``name`` as ``fn(step) * scale(name)`` inside the jitted step.

        ``fn`` receives the optimizer's own update count before this update (the ``count``
        of its ``inject_hyperparams`` state: 0 for the first update, and inside
        ``optax.MultiSteps`` one per real update, not per micro-batch), as
        ``inject_hyperparams(opt)(name=fn)`` would, as a traced int32 array; it must be
        jax-traceable (every optax schedule is). ``count="steps"`` hands it the run's
        train-step count instead (``trainer.step``: batches, micro-batches included).
        Call from ``on_fit_start``: attaching after compilation recompiles the step.
        """
        self.check_writable(name, owner)
        current = self._trainer._schedules.get(name)
        if current is not None and current[1] is not owner:
            raise HyperparamError(
                f"{type(owner).__name__} and {type(current[1]).__name__} both schedule {name!r}; "
                "only one schedule per hyperparameter can drive the step"
            )
        if count not in ("updates", "steps"):
            raise HyperparamError(f'count must be "updates" or "steps", got {count!r}')
        fn = _StepClocked(fn) if count == "steps" else fn
        self._trainer._schedules[name] = (fn, owner)

    def detach_schedule(self, name: str) -> None:
        self._trainer._schedules.pop(name, None)

    def schedule_of(self, name: str) -> Callable | None:
        entry = self._trainer._schedules.get(name)
        return getattr(entry[0], "fn", entry[0]) if entry else None

    def scale(self, name: str) -> float:
        """The multiplier applied to the schedule attached to ``name`` (1.0 by default)."""
        self._slot(name)
        return float(jax.device_get(self._trainer.engine_state.hp_scales[name]))

    def set_scale(self, name: str, value: float) -> None:
        """Set the multiplier of ``name``'s schedule; takes effect at the next step."""
        self.check_writable(name)
        scales = self._trainer.engine_state.hp_scales
        scales[name] = _like(scales[name], value, f"scale of {name}")


class _StepClocked:
    """A schedule that counts train steps, not optimizer updates (the engine checks for it)."""

    steps = True

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.fn = fn

    def __call__(self, count: Any) -> Any:
        return self.fn(count)


def _like(old: jax.Array, value: Any, what: str) -> jax.Array:
    """``value`` with ``old``'s dtype, shape and placement, so the step does not recompile."""
    try:
        arr = np.asarray(value, dtype=old.dtype)
    except (TypeError, ValueError) as e:
        raise HyperparamError(f"{what} must be a number, got {value!r}") from e
    if arr.shape != ():
        raise HyperparamError(f"{what} must be a scalar, got shape {arr.shape}")
    return place_like(arr, old)


def place_like(arr: Any, old: jax.Array) -> jax.Array:
    """``arr`` on ``old``'s device(s), committed only if ``old`` is: jit keys its cache on
    commitment, so a committed copy of an uncommitted leaf would recompile the step."""
    return jax.device_put(arr, old.sharding) if old.committed else jax.device_put(arr)
