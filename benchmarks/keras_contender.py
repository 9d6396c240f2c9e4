"""Contender C: Keras 3 on the JAX backend (`jit_compile=True`), the same models and data.

Variants: plain `fit`; `fit` with ReduceLROnPlateau + ModelCheckpoint (every epoch, the whole
model with its optimizer state) + LearningRateScheduler; `steps_per_execution=16`.
The worker's environment sets `KERAS_BACKEND=jax` before Keras is imported.
"""

from __future__ import annotations

import os

import jax

from benchmarks.measure import Clock
from benchmarks.workloads import Workload


def _model(w: Workload):
    import keras

    if w.name == "W2":
        layers = [
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(10),
        ]
    else:
        widths = (128, 128) if w.name == "W1" else (512, 512)
        layers = [keras.layers.Dense(n, activation="relu") for n in widths]
        layers.append(keras.layers.Dense(10))
    return keras.Sequential([keras.Input(w.input_shape), *layers])


def run_keras(
    w: Workload, epochs: int, clock: Clock, workdir: str, callbacks: bool = False,
    steps_per_execution: int = 1,
) -> dict:
    """Trains `w` with `keras.Model.fit`, timing epochs through an epoch-level callback."""
    import keras

    if keras.backend.backend() != "jax":
        raise RuntimeError(f"Keras runs on {keras.backend.backend()!r}; set KERAS_BACKEND=jax")
    x, y = w.data()
    clock.start()
    keras.utils.set_random_seed(0)
    model = _model(w)
    opt_cls = {"adam": keras.optimizers.Adam, "sgd": keras.optimizers.SGD}[w.optimizer]
    model.compile(
        optimizer=opt_cls(learning_rate=w.learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=True,
        steps_per_execution=steps_per_execution,
    )

    class Timing(keras.callbacks.Callback):
        # async_safe keeps Keras's asynchronous batch-end dispatch on: this callback only
        # blocks, in Keras's worker thread, on the very first batch's logs.
        async_safe = True

        def on_train_batch_end(self, batch, logs=None):
            if clock.t_first is None:
                jax.block_until_ready(logs)
                clock.first_step()

        def on_epoch_end(self, epoch, logs=None):
            clock.epoch_end()

    cbs = [Timing()]
    if callbacks:
        cbs += [
            keras.callbacks.ReduceLROnPlateau(monitor="loss", factor=0.5, patience=2),
            keras.callbacks.ModelCheckpoint(os.path.join(workdir, "model.keras")),
            keras.callbacks.LearningRateScheduler(lambda epoch, lr: lr),
        ]
    hist = model.fit(
        x, y, batch_size=w.batch_size, epochs=epochs, shuffle=True, verbose=0, callbacks=cbs
    )
    return {"final_loss": float(hist.history["loss"][-1])}
