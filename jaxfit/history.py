"""``History``: the per-epoch (and per-validation) record of a run, returned by ``Trainer.fit``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from jaxfit.callback import Callback

if TYPE_CHECKING:  # pragma: no cover
    from jaxfit.trainer import Trainer


class History(Callback):
    """Records every key of the ``on_epoch_end`` logs, one float per epoch.

    Always on: ``Trainer.fit`` adds it and returns it. It runs after the default order
    (``order = 50``), so keys that other callbacks add to the epoch logs (the learning rate,
    say) are recorded too; a key that first appears in a later epoch is padded with NaN for
    the epochs before, so every list has one entry per epoch.

    ``history.validations`` records every validation of the run in order, those every
    ``validation_steps_freq`` steps and those at epoch ends alike: one dict each, with
    ``"step"`` (train steps completed), ``"epoch"`` (the epoch under way) and the
    ``on_validation_end`` logs that are scalars (the ``val_`` metrics, and keys callbacks
    add, such as the learning rate ``ReduceOnPlateau(check_on="validation")`` applied).
    It is checkpointed and restored with the rest of the history.

    Example:
        >>> history = trainer.fit(model, (x, y), validation_data=(xv, yv), epochs=3)  # doctest: +SKIP
        >>> history.history["val_loss"]  # doctest: +SKIP
        [0.61, 0.42, 0.37]
    """

    order = 50

    def __init__(self) -> None:
        self.history: dict[str, list[float]] = {}
        self.epochs: list[int] = []
        self.validations: list[dict[str, float | int]] = []

    def on_validation_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        record: dict[str, float | int] = {}
        for key, value in logs.items():
            try:
                record[key] = float(value)
            except (TypeError, ValueError):
                continue
        record.update(step=int(trainer.step), epoch=int(trainer.epoch))
        self.validations.append(record)

    def on_epoch_end(self, trainer: Trainer, logs: dict[str, Any]) -> None:
        n = len(self.epochs)
        self.epochs.append(int(trainer.epoch))
        for key, value in logs.items():
            try:
                value = float(value)
            except (TypeError, ValueError):
                continue  # not a scalar: nothing to plot or compare
            self.history.setdefault(key, [float("nan")] * n).append(value)
        for values in self.history.values():
            if len(values) < n + 1:
                values.append(float("nan"))

    def state_dict(self) -> dict[str, Any]:
        return {"history": {k: list(v) for k, v in self.history.items()}, "epochs": list(self.epochs),
                "validations": [dict(v) for v in self.validations]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = {k: [float(x) for x in v] for k, v in state["history"].items()}
        self.epochs = [int(e) for e in state["epochs"]]
        # Absent from checkpoints written before per-validation records existed.
        self.validations = [{k: int(v) if k in ("step", "epoch") else float(v) for k, v in rec.items()}
                            for rec in state.get("validations", [])]

    def plot(self, path: str, **kwargs: Any) -> Any:
        """Write a PNG of the loss, metric and learning-rate curves (needs matplotlib)."""
        from jaxfit.plotting import plot_history

        return plot_history(self, path, **kwargs)

    def __repr__(self) -> str:
        return (f"History(epochs={len(self.epochs)}, validations={len(self.validations)}, "
                f"keys={sorted(self.history)})")
