"""Contender C: Keras 3 on the JAX backend (`jit_compile=True`), the same models and data.

Variants: plain `fit`; `fit` with ReduceLROnPlateau + ModelCheckpoint (every epoch, the whole
model with its optimizer state) + LearningRateScheduler; `steps_per_execution=16`.
The worker's environment sets `KERAS_BACKEND=jax` before Keras is imported.

W4 in Keras (keras_nlp is not installed; built from `keras.layers`): lm1b's model, layer for
layer — shift right, embedding, lm1b's sinusoidal positions, pre-LN blocks of
`MultiHeadAttention` (no bias, attention dropout, lm1b's padding mask and a causal mask) and
a ReLU MLP, dropout 0.1 — trained on `x = y = tokens` with `sample_weight = tokens > 0` and
`reduction="mean_with_sample_weight"` (lm1b's sum over the summed weights), token accuracy
as a weighted metric, and AdamW with lm1b's settings. Plain `C` follows lm1b's warmup with a
`LearningRateSchedule`; with the callbacks the rate must be a settable number
(ReduceLROnPlateau and LearningRateScheduler set it), so `C-callbacks` runs at the peak rate.
"""

from __future__ import annotations

import os

import jax

from benchmarks.measure import Clock
from benchmarks.workloads import Workload


def _lm_model(w: Workload):
    import keras
    from keras import ops

    from benchmarks.lm1b import Config, sinusoidal_table

    c = Config()
    tokens = keras.Input((c.max_len,), dtype="int32")
    real = ops.greater(tokens, 0)
    mask = ops.logical_and(real[:, :, None], real[:, None, :])  # lm1b's padding mask
    shifted = ops.pad(tokens, ((0, 0), (1, 0)))[:, :-1]
    init = keras.initializers.RandomNormal(stddev=1.0)
    y = keras.layers.Embedding(c.vocab_size, c.emb_dim, embeddings_initializer=init)(shifted)
    y = y + ops.convert_to_tensor(sinusoidal_table(c.max_len, c.emb_dim))
    y = keras.layers.Dropout(c.dropout_rate)(y)
    for _ in range(c.num_layers):
        x = keras.layers.LayerNormalization(epsilon=1e-6)(y)
        x = keras.layers.MultiHeadAttention(
            c.num_heads, c.qkv_dim // c.num_heads, use_bias=False,
            dropout=c.attention_dropout_rate, kernel_initializer="glorot_uniform",
        )(x, x, attention_mask=mask, use_causal_mask=True)
        x = keras.layers.Dropout(c.dropout_rate)(x) + y
        z = keras.layers.LayerNormalization(epsilon=1e-6)(x)
        z = keras.layers.Dense(c.mlp_dim, activation="relu")(z)
        z = keras.layers.Dropout(c.dropout_rate)(z)
        z = keras.layers.Dense(c.emb_dim)(z)
        y = x + keras.layers.Dropout(c.dropout_rate)(z)
    y = keras.layers.LayerNormalization(epsilon=1e-6)(y)
    return keras.Model(tokens, keras.layers.Dense(c.vocab_size)(y))


def _lm_schedule(w: Workload):
    import keras

    class Lm1bSchedule(keras.optimizers.schedules.LearningRateSchedule):
        def __call__(self, step):
            return w.schedule()(step)

    return Lm1bSchedule()


def _model(w: Workload):
    import keras

    if w.family == "lm":
        return _lm_model(w)
    if w.name == "W2":
        layers = [
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(10),
        ]
    else:
        layers = [keras.layers.Dense(n, activation="relu") for n in w.hidden]
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
    arrays = w.data()
    clock.start()
    keras.utils.set_random_seed(0)
    model = _model(w)
    if w.family == "lm":
        (x,) = arrays
        y, weights = x, (x > 0).astype("float32")
        rate = w.learning_rate if callbacks else _lm_schedule(w)
        optimizer = keras.optimizers.AdamW(learning_rate=rate, beta_1=0.9, beta_2=0.98,
                                           epsilon=1e-9, weight_decay=0.1)
        loss = keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction="mean_with_sample_weight")
        metrics = {"weighted_metrics": [keras.metrics.SparseCategoricalAccuracy()]}
    else:
        (x, y), weights = arrays, None
        opt_cls = {"adam": keras.optimizers.Adam, "sgd": keras.optimizers.SGD}[w.optimizer]
        optimizer = opt_cls(learning_rate=w.learning_rate)
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        metrics = {}
    model.compile(
        optimizer=optimizer, loss=loss, jit_compile=True,
        steps_per_execution=steps_per_execution, **metrics,
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
        x, y, sample_weight=weights, batch_size=w.batch_size, epochs=epochs, shuffle=True,
        verbose=0, callbacks=cbs,
    )
    return {"final_loss": float(hist.history["loss"][-1])}
