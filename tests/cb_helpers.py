"""Helpers for the callback tests: a trainer with state but no training, compile counting,
state round trips through msgpack and cloudpickle (what a checkpoint does)."""

from __future__ import annotations

import cloudpickle
import jax
import numpy as np
from conftest import MLP, make_trainer
from flax import serialization

from jaxfit import Trainer

_compiles = {"n": 0}


def _on_event(name: str, *args, **kwargs) -> None:
    if name == "/jax/core/compile/backend_compile_duration":
        _compiles["n"] += 1


jax.monitoring.register_event_duration_secs_listener(_on_event)


def compile_count() -> int:
    """XLA compilations so far in this process (every jit cache miss is one)."""
    return _compiles["n"]


def tiny_data(n: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = ((x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0)).astype(np.int32)
    return x, y


def ready_trainer(**kw) -> Trainer:
    """A trainer whose state exists (fit with epochs=0): hyperparams can be read and written."""
    trainer = make_trainer(**kw)
    trainer.fit(MLP(), tiny_data(), epochs=0, batch_size=16)
    return trainer


def resume(trainer: Trainer) -> Trainer:
    """A new trainer from ``trainer``'s recipe and state, as Trainer.load would build it."""
    recipe = cloudpickle.loads(cloudpickle.dumps(trainer.recipe()))
    state = serialization.msgpack_restore(serialization.msgpack_serialize(trainer.state_dict()))
    fresh = Trainer.from_recipe(recipe)
    fresh.load_state_dict(state)
    return fresh


def leaves(tree) -> list[np.ndarray]:
    return [np.asarray(a) for a in jax.tree.leaves(jax.device_get(tree))]
