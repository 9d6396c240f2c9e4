"""The compiled train step: what XLA gets from the engine, checked on the program itself."""

from __future__ import annotations

import functools
import re
from typing import Any

import jax.numpy as jnp
import numpy as np
import optax
from conftest import MLP

from benchmarks.jaxfit_contender import xent_full_form
from benchmarks.same_program import canonical
from jaxfit import Average, Trainer
from jaxfit.data import Execution


@functools.lru_cache(maxsize=None)
def _compiled_step(scheduled: bool = False, loss: Any = "softmax_cross_entropy") -> str:
    schedules = {"learning_rate": optax.cosine_decay_schedule(1e-3, 100)} if scheduled else {}
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 8)).astype(np.float32), rng.integers(0, 3, 64).astype(np.int32)
    trainer = Trainer(optimizer=optax.inject_hyperparams(optax.adam)(learning_rate=1e-3),
                      loss=loss, seed=0)
    trainer.fit(MLP(), (x, y), epochs=1, batch_size=16, verbose=0)
    engine = trainer._engine
    fn = engine.train_fn(1, schedules, trainer.scan_unroll)
    batch = (x[:16], y[:16])
    return fn.lower(trainer.engine_state, batch, trainer._mask(Execution(batch, (16,), 16))).compile().as_text()


def _entry_copies(hlo: str) -> int:
    return len(re.findall(r"= \S+ copy\(", hlo[hlo.index("ENTRY"):]))


def _aliased_outputs(hlo: str) -> int:
    header = hlo.splitlines()[0]
    return len(re.findall(r"\{\d+\}: \(\d+, \{\}, may-alias\)", header))


def test_a_scheduled_hyperparameter_adds_no_copies_to_the_step():
    # A schedule overwrites the injected learning rate without reading it. Were that input
    # pruned, donation would pair every later scalar output with its neighbour's buffer and
    # XLA would insert a chain of copies (one per scalar leaf after it).
    plain = _compiled_step()
    scheduled = _compiled_step(scheduled=True)
    assert _entry_copies(scheduled) <= _entry_copies(plain) + 1
    assert _aliased_outputs(scheduled) == _aliased_outputs(plain) > 0


def _xent_unmasked(model, batch, ctx):
    x, y = batch
    return Average(jnp.sum(optax.softmax_cross_entropy_with_integer_labels(model(x), y)),
                   ctx.weight)


def test_a_full_form_loss_compiles_to_the_built_in_losss_program():
    # The open step costs nothing: the built-in "softmax_cross_entropy" written by a user
    # as a full-form loss (the harness's xent_full_form) gives XLA the very same program
    # (the same fusions, buffers and aliasing).
    built_in = canonical(_compiled_step())
    assert "fusion" in built_in and len(built_in) > 10_000
    assert canonical(_compiled_step(loss=xent_full_form)) == built_in
    # The comparison sees a change in the loss: the same sum without the mask is another
    # program.
    assert canonical(_compiled_step(loss=_xent_unmasked)) != built_in
