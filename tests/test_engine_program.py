"""The compiled train step: what XLA gets from the engine, checked on the program itself."""

from __future__ import annotations

import re

import numpy as np
import optax
from conftest import MLP

from jaxfit import Trainer
from jaxfit.data import Execution


def _compiled_step(schedules: dict) -> str:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 8)).astype(np.float32), rng.integers(0, 3, 64).astype(np.int32)
    trainer = Trainer(optimizer=optax.inject_hyperparams(optax.adam)(learning_rate=1e-3),
                      loss="softmax_cross_entropy", seed=0)
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
    plain = _compiled_step({})
    scheduled = _compiled_step({"learning_rate": optax.cosine_decay_schedule(1e-3, 100)})
    assert _entry_copies(scheduled) <= _entry_copies(plain) + 1
    assert _aliased_outputs(scheduled) == _aliased_outputs(plain) > 0
