"""An endless stream of tiny batches with its own iterator state, shared by the data tests."""

from __future__ import annotations

import numpy as np


def batch(i, rows=4):
    rng = np.random.default_rng(i)
    x = rng.normal(size=(rows, 4)).astype(np.float32)
    return x, (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0)


class Stream:
    """An infinite stream with its own state; counts the batches it produces."""

    def __init__(self):
        self.produced = []

    def __iter__(self):
        return _StreamIter(self)


class _StreamIter:
    def __init__(self, owner):
        self.owner, self.i = owner, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.owner.produced.append(self.i)
        self.i += 1
        return batch(self.i - 1)

    def get_state(self):
        return {"i": np.int64(self.i)}  # a numpy scalar: stored as a plain int

    def set_state(self, state):
        self.i = state["i"]
