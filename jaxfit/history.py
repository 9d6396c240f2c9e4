"""``History``: the per-epoch record of a run, returned by ``Trainer.fit``."""

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

    Example:
        >>> history = trainer.fit(model, (x, y), validation_data=(xv, yv), epochs=3)  # doctest: +SKIP
        >>> history.history["val_loss"]  # doctest: +SKIP
        [0.61, 0.42, 0.37]
    """

    order = 50

    def __init__(self) -> None:
        self.history: dict[str, list[float]] = {}
        self.epochs: list[int] = []

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
        return {"history": {k: list(v) for k, v in self.history.items()}, "epochs": list(self.epochs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = {k: [float(x) for x in v] for k, v in state["history"].items()}
        self.epochs = [int(e) for e in state["epochs"]]

    def plot(self, path: str, **kwargs: Any) -> Any:
        """Write a PNG of the loss, metric and learning-rate curves (needs matplotlib)."""
        from jaxfit.plotting import plot_history

        return plot_history(self, path, **kwargs)

    def __repr__(self) -> str:
        return f"History(epochs={len(self.epochs)}, keys={sorted(self.history)})"
