"""The callback protocol: the ``Callback`` base class and its dispatcher.

Hooks run on the host, around compiled work. Anything that belongs in the gradient path
(clipping, accumulation, EMA, NaN guards) is an optax transformation, not a hook.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

from jaxfit.errors import CallbackError, ConfigError, JaxfitError

if TYPE_CHECKING:  # pragma: no cover
    from jaxfit.trainer import Trainer

HOOKS = (
    "setup",
    "on_fit_start",
    "on_epoch_start",
    "on_train_batch_start",
    "on_train_batch_end",
    "on_validation_start",
    "on_validation_end",
    "on_epoch_end",
    "on_fit_end",
    "teardown",
)

BATCH_HOOKS = ("on_train_batch_start", "on_train_batch_end")


class Callback:
    """Base class of every callback. Override the hooks you need; the others cost nothing.

    Hooks and what they receive:

    * ``setup(trainer)`` — the very first thing ``fit`` does, before any data is read, any
      model is initialised or anything compiles. ``trainer.run_id`` is known and
      ``trainer.resuming`` says whether this fit continues an existing run. Claim and check
      resources here (a run directory, a lock) so a conflict costs the user no time.
    * ``on_fit_start(trainer)`` — the state is initialised, nothing compiled yet. Check
      your configuration here (``trainer.check_monitor``,
      ``trainer.hyperparams.check_writable``) so a mistake fails in the first second.
    * ``on_epoch_start(trainer)`` — ``trainer.epoch`` is the (1-based) epoch starting.
    * ``on_train_batch_start(trainer)`` — before each execution of the train step
      (``steps_per_execution`` steps at once).
    * ``on_train_batch_end(trainer, logs)`` — ``logs = {"loss": <device scalar>}``, the
      loss of the last step executed. It is a device array: reading it waits for the
      device, so do that every N steps, not every step.
    * ``on_validation_start(trainer)``; ``on_validation_end(trainer, logs)`` with
      ``{"val_loss": float, "val_<metric>": float, ...}``, and ``"step"`` for a validation
      every ``validation_steps_freq`` steps (an epoch-end one has none). Keys a callback
      adds are recorded in ``History.validations``.
    * ``on_epoch_end(trainer, logs)`` — the epoch's train and validation loss and metrics
      as floats. Keys a callback adds to ``logs`` are recorded by ``History``.
    * ``on_fit_end(trainer, logs)`` — runs however ``fit`` ends once it has started, with
      ``{"stop_reason": str | None, "exception": BaseException | None}``.
    * ``teardown(trainer)`` — the very last thing ``fit`` does, whenever ``setup`` ran, even
      when the fit failed before it started (a data error, say): release what ``setup`` took.

    Callbacks run sorted by ``order`` (lower first, ties in the order given). A callback
    with state implements ``state_dict``/``load_state_dict``; the state is saved in every
    checkpoint under ``state_key``.

    Example:
        >>> from jaxfit import Callback
        >>> class PrintLR(Callback):
        ...     def on_epoch_end(self, trainer, logs):
        ...         print(trainer.epoch, trainer.hyperparams["learning_rate"], logs["loss"])
    """

    order: int = 0
    #: Keys this callback adds to the ``on_epoch_end`` logs. Declaring them lets monitoring
    #: callbacks (ModelCheckpoint, EarlyStopping, ReduceOnPlateau) accept them in
    #: ``trainer.check_monitor``; run this callback before those (a lower ``order``).
    log_keys: tuple[str, ...] = ()

    @property
    def state_key(self) -> str:
        """The name of this callback's entry in a checkpoint (unique within a run)."""
        return type(self).__name__

    def state_dict(self) -> dict[str, Any]:
        """The callback's resumable state: numbers, strings, lists, str-keyed dicts, arrays."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""

    def wants_batch_hooks(self, trainer: Trainer) -> bool:
        """Whether the batch hooks this callback overrides (``on_train_batch_start``,
        ``on_train_batch_end``) run during the epoch that starts: asked at each epoch's
        start, after ``on_epoch_start``. True unless overridden.

        A dispatch-bound loop pays for every hook call of every step. A callback whose batch
        hooks only matter some of the time (a progress display that is not drawn live, a
        checkpoint that is not due by steps) returns False when they would do nothing, and
        the loop leaves them out for that epoch.
        """
        return True

    def setup(self, trainer: Trainer) -> None: ...
    def on_fit_start(self, trainer: Trainer) -> None: ...
    def on_epoch_start(self, trainer: Trainer) -> None: ...
    def on_train_batch_start(self, trainer: Trainer) -> None: ...
    def on_train_batch_end(self, trainer: Trainer, logs: dict[str, Any]) -> None: ...
    def on_validation_start(self, trainer: Trainer) -> None: ...
    def on_validation_end(self, trainer: Trainer, logs: dict[str, Any]) -> None: ...
    def on_epoch_end(self, trainer: Trainer, logs: dict[str, Any]) -> None: ...
    def on_fit_end(self, trainer: Trainer, logs: dict[str, Any]) -> None: ...
    def teardown(self, trainer: Trainer) -> None: ...


def _overrides(callback: Callback, hook: str) -> bool:
    return getattr(type(callback), hook, None) is not getattr(Callback, hook)


class CallbackList:
    """Callbacks in run order, with per-hook lists of those that override the hook.

    ``callbacks.has("on_train_batch_end")`` lets the training loop skip building logs
    when nobody listens.
    """

    def __init__(self, callbacks: Iterable[Callback]) -> None:
        callbacks = list(callbacks)
        for i, cb in enumerate(callbacks):
            if not isinstance(cb, Callback):
                raise ConfigError(
                    f"callbacks[{i}] is a {type(cb).__name__}, not a jaxfit.Callback. "
                    "Subclass jaxfit.Callback and override the hooks you need."
                )
        # sorted() is stable: ties keep the order the user gave.
        self.callbacks: list[Callback] = sorted(callbacks, key=lambda cb: cb.order)
        keys = [cb.state_key for cb in self.callbacks]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            raise ConfigError(
                f"two callbacks share the state_key {dupes}: their checkpointed states would "
                "collide. Give each instance a distinct `state_key` (override the property)."
            )
        self._by_hook = {h: [cb for cb in self.callbacks if _overrides(cb, h)] for h in HOOKS}
        self._overriding = {h: self._by_hook[h] for h in BATCH_HOOKS}

    def __iter__(self):
        return iter(self.callbacks)

    def __len__(self) -> int:
        return len(self.callbacks)

    def has(self, hook: str) -> bool:
        return bool(self._by_hook[hook])

    def select_batch_hooks(self, trainer: Trainer) -> None:
        """Asks each callback that overrides a batch hook whether it runs this epoch
        (:meth:`Callback.wants_batch_hooks`); ``call`` and ``has`` follow the answers."""
        wanted: dict[int, bool] = {}
        for cb in {id(cb): cb for h in BATCH_HOOKS for cb in self._overriding[h]}.values():
            try:
                wanted[id(cb)] = bool(cb.wants_batch_hooks(trainer))
            except (KeyboardInterrupt, SystemExit, JaxfitError):
                raise
            except Exception as e:
                raise CallbackError(cb, "wants_batch_hooks", e) from e
        for h in BATCH_HOOKS:
            self._by_hook[h] = [cb for cb in self._overriding[h] if wanted[id(cb)]]

    def find(self, cls: type) -> list[Callback]:
        """The callbacks that are instances of ``cls``, in run order."""
        return [cb for cb in self.callbacks if isinstance(cb, cls)]

    def call(self, hook: str, *args: Any) -> None:
        for cb in self._by_hook[hook]:
            try:
                getattr(cb, hook)(*args)
            except (KeyboardInterrupt, SystemExit, JaxfitError):
                # jaxfit's own errors already say what is wrong and who asked.
                raise
            except Exception as e:
                raise CallbackError(cb, hook, e) from e

    def state_dict(self) -> dict[str, Any]:
        return self.states_of(self.callbacks)

    @staticmethod
    def states_of(callbacks: Iterable[Callback]) -> dict[str, Any]:
        """``CallbackList(callbacks).state_dict()`` without building the per-hook lists: every
        checkpoint save asks, on the training thread."""
        ordered = sorted(callbacks, key=lambda cb: cb.order)
        states = {cb.state_key: cb.state_dict() for cb in ordered}
        if len(states) != len(ordered):
            CallbackList(ordered)  # two share a state_key: raises the list's own error
        return states

    def load_state_dict(self, states: dict[str, Any]) -> None:
        for cb in self.callbacks:
            if cb.state_key in states:
                cb.load_state_dict(states[cb.state_key])
