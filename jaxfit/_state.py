"""A trainer's resumable state as plain data, and back; what checkpoints store.

``state_dict`` is msgpack-ready (nested dicts of numpy arrays and Python scalars). Restoring
builds the state's template *abstractly* — ``jax.eval_shape`` of the step's init on the saved
batch shapes — so loading a run compiles nothing and initialises nothing before the first
resumed step.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from jaxfit import _tree
from jaxfit._placement import local_snapshot
from jaxfit.callback import CallbackList
from jaxfit.checkpoint._sharded import ShardedState
from jaxfit.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from jaxfit.trainer import Trainer

STATE_FORMAT = 2


def state_dict(trainer: Trainer) -> dict[str, Any]:
    sd = meta_dict(trainer)
    sd["train_state"] = train_state_dict(trainer.engine_state)
    return sd


def meta_dict(trainer: Trainer) -> dict[str, Any]:
    """Everything of ``state_dict`` but the arrays of the train state (``train_state`` is
    empty): what a sharded checkpoint stores beside its part files."""
    return {
        "format": STATE_FORMAT,
        "train_state": {},
        "step": trainer._step,
        "epoch": trainer._epochs_completed,
        "batch_in_epoch": trainer.batch_in_epoch,
        # An iterable's position after the last batch trained on: {"epoch", "pass",
        # "consumed", "state"} with the iterator's own state (grain's get_state()), or None
        # for array data, whose (epoch, batch_in_epoch) is the position. See docs/data.md.
        "data": trainer._data_position,
        # 1 in a checkpoint a batch hook wrote at a step whose validation (every
        # validation_steps_freq steps) had not run yet: a resume runs it first.
        "validation_pending": int(trainer._validation_pending),
        "seed": trainer.seed,
        "run_id": trainer.run_id,
        "rng": _seed_key_data(trainer.seed).copy(),
        "input_spec": encode_spec(trainer._batch_spec),
        "history": trainer.history.state_dict(),
        "callbacks": CallbackList.states_of(trainer._user_callbacks),
        "stop_reason": trainer.stop_reason,
    }


def load_state_dict(trainer: Trainer, sd: dict[str, Any]) -> None:
    if trainer._engine is None:
        raise ConfigError("load_state_dict needs the model: build the trainer with Trainer.from_recipe or fit first")
    if sd.get("format") != STATE_FORMAT:
        raise ConfigError(f"unsupported state format {sd.get('format')!r}; this jaxfit reads format {STATE_FORMAT}")
    if int(sd["seed"]) != trainer.seed:
        raise ConfigError(f"the saved run used seed {sd['seed']}, this trainer seed {trainer.seed}")
    spec = decode_spec(sd.get("input_spec")) or trainer._batch_spec
    if spec is None:
        data = trainer._fit_args.get("data")
        if data is None:
            raise ConfigError("cannot rebuild the state's structure: the checkpoint holds no batch "
                              "shapes and no training data was given; pass data= to restore")
        spec = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                                      trainer._source(data, "training data",
                                                      batch_size=trainer._fit_args.get("batch_size")).example())
    assert trainer._engine is not None
    template = trainer._engine.init_state(trainer._model, spec, abstract=True, plan=trainer._plan)
    saved = sd["train_state"]
    if isinstance(saved, ShardedState):
        # Each leaf assembled from the saved slices: on a mesh straight onto its devices,
        # each device from the slices overlapping its own; without one, whole on the host.
        restored = saved.restore(template, trainer._engine.shardings if trainer._plan else None)
        trainer._es = restored if trainer._plan else trainer._place_host_state(restored)
    else:
        restored = _tree.from_dict(template, saved, "train_state")
        # Fresh device buffers, so the first resumed step can donate them; on a mesh each
        # device gets its slices of the saved (global) arrays, whatever mesh saved them.
        trainer._es = trainer._place_host_state(restored)
    trainer._batch_spec = spec
    trainer._masks.clear()
    trainer._step, trainer._epochs_completed = int(sd["step"]), int(sd["epoch"])
    trainer.batch_in_epoch = int(sd["batch_in_epoch"])
    trainer._data_position = sd.get("data")  # absent from checkpoints of older versions
    trainer._validation_pending = bool(sd.get("validation_pending", False))
    trainer.stop_reason = sd.get("stop_reason")
    trainer.run_id = sd.get("run_id") or trainer.run_id
    trainer.history.load_state_dict(sd["history"])
    CallbackList(trainer._user_callbacks).load_state_dict(sd.get("callbacks", {}))


def recipe(trainer: Trainer) -> dict[str, Any]:
    return {
        "trainer": dict(optimizer=trainer.optimizer, loss=trainer.loss, metrics=trainer.metrics,
                        seed=trainer.seed, step=trainer.custom_step,
                        steps_per_execution=trainer.steps_per_execution, scan_unroll=trainer.scan_unroll,
                        input_keys=trainer.input_keys, target_keys=trainer.target_keys,
                        handle_signals=trainer.handle_signals, data_axis=trainer.data_axis,
                        **_layout(trainer)),
        "model": trainer._model,
        "callbacks": list(trainer._user_callbacks),
        "fit": dict(trainer._fit_args),
        "batch_spec": trainer._batch_spec,
    }


def train_state_dict(es: Any) -> dict:
    """The ``train_state`` entry of a state dict: the arrays of ``es`` on the host."""
    # Every array is fetched whole to the host (device_get assembles a sharded leaf from its
    # shards). With several processes, a leaf split across them is built from this
    # process's shards, which must cover it. (ModelCheckpoint writes a sharded state as a
    # sharded checkpoint instead, which gathers nothing.)
    return _tree.to_dict(local_snapshot(es) if jax.process_count() > 1 else es)


def _layout(trainer: Trainer) -> dict[str, Any]:
    """The layout arguments, only when set: a recipe without them loads in older jaxfit and
    ``from_recipe`` drops them when the run is loaded without a mesh."""
    out: dict[str, Any] = {}
    if trainer.rules:
        out["rules"] = list(trainer.rules)
    if trainer.param_rules:
        out["param_rules"] = list(trainer.param_rules)
    if trainer.data_axes is not None:
        out["data_axes"] = tuple(trainer.data_axes)
    return out


@functools.lru_cache(maxsize=8)
def _seed_key_data(seed: int) -> np.ndarray:
    # Computed once per seed: every checkpoint save asks for it, on the training thread.
    return np.asarray(jax.random.key_data(jax.random.key(seed)))


def encode_spec(spec: Any) -> Any:
    """The batch's shapes as msgpack data: arrays, dicts, lists and tuples; None when the
    batch has other containers (a named tuple, a graph batch: the recipe keeps those)."""
    if spec is None:
        return None
    if hasattr(spec, "shape") and hasattr(spec, "dtype"):
        return {"shape": list(spec.shape), "dtype": str(spec.dtype)}
    if isinstance(spec, dict) and all(isinstance(k, str) for k in spec):
        parts = {k: encode_spec(v) for k, v in spec.items()}
        return None if any(v is None for v in parts.values()) else {"dict": parts}
    if type(spec) in (list, tuple):
        items = [encode_spec(v) for v in spec]
        return None if any(v is None for v in items) else {type(spec).__name__: items}
    return None


def decode_spec(node: Any) -> Any:
    if node is None:
        return None
    if "dict" in node:
        return {k: decode_spec(v) for k, v in node["dict"].items()}
    if "tuple" in node:
        return tuple(decode_spec(v) for v in node["tuple"])
    if "list" in node:
        return [decode_spec(v) for v in node["list"]]
    return jax.ShapeDtypeStruct(tuple(node["shape"]), jax.numpy.dtype(node["dtype"]))


def from_recipe(cls: type[Trainer], recipe: dict[str, Any], overrides: dict[str, Any]) -> Trainer:
    """``Trainer.from_recipe``: a trainer built from a recipe, with no state yet."""
    args = {**recipe["trainer"], **overrides}
    # On one device the layout is kept (unused) so that the run's next checkpoints
    # still carry it to a later resume on a mesh.
    layout = {n: args.pop(n) for n in ("rules", "param_rules", "data_axes")
              if n in args and args.get("mesh") is None and n not in overrides}
    trainer = cls(**args)
    for name, value in layout.items():
        setattr(trainer, name, value)
    model = recipe["model"]
    trainer._set_model(trainer.custom_step if model is None and trainer.custom_step is not None else model)
    trainer._user_callbacks = list(recipe.get("callbacks", []))
    trainer._fit_args = dict(recipe.get("fit", {}))
    trainer._batch_spec = recipe.get("batch_spec")
    return trainer
