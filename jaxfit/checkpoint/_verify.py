"""``verify_resume``: prove that stopping and resuming a run changes nothing."""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cloudpickle
import numpy as np

from jaxfit.callback import Callback
from jaxfit.checkpoint._load import load_trainer

if TYPE_CHECKING:  # pragma: no cover
    from jaxfit.trainer import Trainer


class _StopAt(Callback):
    """Stops the run once after step ``at``; its state keeps it from firing after the resume."""

    order = 90  # before ModelCheckpoint, so the stopped flag is in the saved state

    def __init__(self, at: int) -> None:
        self.at, self.fired = at, False

    def on_train_batch_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        if not self.fired and trainer.step >= self.at:
            self.fired = True
            trainer.stop_training, trainer.stop_reason = True, "verify_resume"

    def state_dict(self) -> dict[str, Any]:
        return {"at": self.at, "fired": self.fired}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.at, self.fired = int(state["at"]), bool(state["fired"])


@dataclasses.dataclass
class ResumeReport:
    """The outcome of :func:`verify_resume`; true when every resume matched.

    Attributes:
      total_steps: optimizer steps of the uninterrupted run.
      stopped_at: the steps where the run was stopped, saved and loaded again.
      mismatches: for each difference, the stop step, the path in the state and how it
        differs. Empty when the resumed runs were bit-identical to the uninterrupted one.
    """

    total_steps: int
    stopped_at: list[int]
    mismatches: list[str]

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        head = (f"resume check: stopped at steps {self.stopped_at} of {self.total_steps}: ")
        if self.ok:
            return head + "every resumed run matched the uninterrupted one bit for bit"
        return head + f"{len(self.mismatches)} difference(s):\n  " + "\n  ".join(self.mismatches)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}/{key}" if prefix else str(key)))
        return out
    return {prefix: tree}


def _differences(want: dict, got: dict, label: str) -> list[str]:
    diffs = []
    a, b = _flatten(want), _flatten(got)
    for path in sorted(set(a) | set(b)):
        if path not in a or path not in b:
            diffs.append(f"stop at {label}: {path} present in only one run")
            continue
        x, y = np.asarray(a[path]), np.asarray(b[path])
        if x.shape != y.shape or x.dtype != y.dtype or x.tobytes() != y.tobytes():
            detail = f"shapes {x.shape} vs {y.shape}" if x.shape != y.shape else ""
            if not detail and x.dtype.kind in "fc":
                detail = f"max |difference| {np.max(np.abs(x.astype(np.float64) - y)):.3g}"
            diffs.append(f"stop at {label}: {path} differs {detail}".rstrip())
    return diffs


def _comparable(trainer: Trainer) -> dict:
    sd = trainer.state_dict()
    return {"train_state": sd["train_state"], "step": sd["step"], "epoch": sd["epoch"],
            "history": {k: np.asarray(v) for k, v in trainer.history.history.items()}}


def verify_resume(trainer: Trainer, model: Any, data: Any, *,
                  stop_at: int | Sequence[int] | None = None,
                  callbacks: Sequence[Callback] = (), **fit_args: Any) -> ResumeReport:
    """Checks that stopping a run, saving it, loading it and fitting on reproduces the
    uninterrupted run bit for bit (params, optimizer and model state, metrics, history).

    The run is trained once without interruption, then once more for each step in
    ``stop_at``: stopped after that step, checkpointed into a temporary directory, loaded
    with ``Trainer.load`` (through the files, as a new process would) and fitted to the end.
    Use it on a small slice of your data when you change the model, the data pipeline or a
    callback: a non-deterministic piece (an iterable that reshuffles differently each pass,
    a callback that keeps state without ``state_dict``) shows up as a difference.

    ``trainer`` is only a template: it is not trained. Any ``ModelCheckpoint`` in
    ``callbacks`` is left out (checkpoints go to a temporary directory).

    Args:
      trainer: a ``Trainer`` configured as for the real run.
      model, data, callbacks, **fit_args: what you would pass to ``fit`` (``epochs``,
        ``batch_size``, ``validation_data``, ...).
      stop_at: the step(s) to stop at. Default: the middle of the run.

    Returns:
      A :class:`ResumeReport`, true when every resumed run matched.

    Example:
      >>> report = verify_resume(Trainer(optimizer=opt), Net(), (x, y),  # doctest: +SKIP
      ...                        epochs=3, batch_size=32, stop_at=[5, 8])
      >>> assert report, report  # doctest: +SKIP
    """
    from jaxfit.callbacks import ModelCheckpoint
    from jaxfit.trainer import Trainer as TrainerClass

    recipe = trainer.recipe()
    recipe.update(model=model, fit={"data": data, **fit_args},
                  callbacks=[cb for cb in callbacks if not isinstance(cb, ModelCheckpoint)])
    blob = cloudpickle.dumps(recipe)  # every run starts from its own copy of everything

    reference = TrainerClass.from_recipe(cloudpickle.loads(blob))
    reference.fit()
    want = _comparable(reference)
    total = reference.step
    if stop_at is None:
        stop_at = [max(1, total // 2)]
    stops = [int(stop_at)] if isinstance(stop_at, (int, np.integer)) else [int(s) for s in stop_at]
    if not stops or not all(0 < s < total for s in stops):
        raise ValueError(
            f"stop_at must be between 1 and {total - 1} (the run has {total} steps), "
            f"got stop_at = {stop_at!r}"
        )
    mismatches: list[str] = []
    for step in stops:
        copy = cloudpickle.loads(blob)
        with tempfile.TemporaryDirectory(prefix="jaxfit-verify-") as tmp:
            run_dir = Path(tmp) / "run"
            copy["callbacks"] = [*copy["callbacks"], _StopAt(step),
                                 ModelCheckpoint(run_dir, every_n_epochs=None, keep_last=1)]
            TrainerClass.from_recipe(copy).fit()
            resumed = load_trainer(run_dir, trusted=True)  # our own files, just written
            resumed.fit()
            mismatches += _differences(want, _comparable(resumed), str(step))
    return ResumeReport(total_steps=total, stopped_at=stops, mismatches=mismatches)
