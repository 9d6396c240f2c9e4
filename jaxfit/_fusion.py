"""``steps_per_execution``: run each group of ``k`` steps fused, or as ``k`` single steps,
whichever this machine runs faster for this model.

Fusing ``k`` steps in one ``lax.scan`` saves ``k - 1`` dispatches (~1.5x on a model whose step
takes ~0.1 ms), but XLA:CPU runs some ops slower inside a loop: convolutions 25-50x (those
steps are unrolled, see ``steps.auto_unroll``), large matmuls measurably. So when
``scan_unroll="auto"`` keeps the scan rolled, the first executions of a fit are timed both
ways (each way once to compile, then twice more, waiting
for the device around each), and the rest of the fit uses the faster way. The results of
both ways are identical: the same step runs on the same batches in the same order.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import jax

from jaxfit.data import Execution

FUSED, SINGLE = "fused", "single steps"
_TRIALS = (FUSED, SINGLE) * 3  # the first of each way compiles and is not counted


class FusionChooser:
    """Runs ``k``-step executions and settles on fused or single steps after timing both.

    Args:
        on_choice: called once with ``FUSED`` or ``SINGLE`` when the choice is made.
        measure: asked after the first (compiling) fused execution whether to time the two
            ways; when it says no, executions stay fused (an explicit ``scan_unroll``, or
            the unrolled convolution case, which measured faster fused and would otherwise
            compile a second program in the middle of training).
    """

    def __init__(self, on_choice: Callable[[str], None],
                 measure: Callable[[], bool] = lambda: True) -> None:
        self.on_choice = on_choice
        self.measure = measure
        self.mode: str | None = None
        self._trial = 0
        self._seconds: dict[str, list[float]] = {FUSED: [], SINGLE: []}

    def run(self, fused: Callable, single: Callable, state: Any, ex: Execution,
            mask: Callable[[Execution], Any]) -> tuple[Any, Any]:
        """One execution of ``ex.k`` steps; returns ``(state, loss of the last step)``."""
        if self.mode is not None:
            return self._run(self.mode, fused, single, state, ex, mask)
        way = _TRIALS[self._trial]
        jax.block_until_ready(state)  # time this execution alone, not the steps before it
        start = time.perf_counter()
        state, loss = self._run(way, fused, single, state, ex, mask)
        jax.block_until_ready(loss)
        if self._trial >= 2:
            self._seconds[way].append(time.perf_counter() - start)
        self._trial += 1
        if self._trial == 1 and not self.measure():
            self.mode = FUSED
            self.on_choice(self.mode)
        elif self._trial == len(_TRIALS):
            self.mode = min(self._seconds, key=lambda w: min(self._seconds[w]))
            self.on_choice(self.mode)
        return state, loss

    @staticmethod
    def _run(way: str, fused: Callable, single: Callable, state: Any, ex: Execution,
             mask: Callable[[Execution], Any]) -> tuple[Any, Any]:
        if way == FUSED:
            return fused(state, ex.batch, mask(ex))
        loss = None
        for i in range(ex.k):
            one = Execution(jax.tree_util.tree_map(lambda a: a[i], ex.batch), (ex.n_valid[i],), ex.rows)
            state, loss = single(state, one.batch, mask(one))
        return state, loss
