"""W4: flax's lm1b example in small — its decoder-only TransformerLM, loss and train step.

Adapted from github.com/google/flax ``examples/lm1b`` (``models.py`` and ``train.py``,
Apache 2.0), kept to what W4 uses: no packed sequences (positions, segmentation), no
decoding cache, no logical partitioning, no label smoothing. One change of interface: the
dropout switch is a ``deterministic`` argument of ``__call__`` instead of a config field, so
that one module serves training and evaluation (jaxfit fills the flag in). The layers,
initialisers, masks and the sinusoidal position table are lm1b's.

- ``compute_weighted_cross_entropy`` / ``compute_weighted_accuracy``: lm1b's, the token
  weights being ``inputs > 0`` (0 is padding), returning ``(sum, weight sum)``.
- ``make_train_step``: lm1b's ``train_step`` (without its pmap collectives): the mean loss
  ``sum / weight sum`` differentiated, the dropout key ``fold_in(dropout_rng, state.step)``,
  the metrics sums returned for the host to divide at the epoch's end.
- ``lm1b_loss``: the same loss in jaxfit's full form, ``Average(sum, weight sum)``.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Config:
    """lm1b's TransformerConfig at W4's size (lm1b's: 30k vocabulary, width 512, 8 heads,
    6 layers, MLP 2048): ~0.09 s a step of 16 x 64 tokens on one CPU core, 182k params."""

    vocab_size: int = 256
    emb_dim: int = 64
    num_heads: int = 4
    num_layers: int = 3
    qkv_dim: int = 64
    mlp_dim: int = 256
    max_len: int = 64
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.1


def shift_right(x: jax.Array) -> jax.Array:
    """lm1b's shift_right on axis 1: the model predicts token t from tokens < t."""
    return jnp.pad(x, ((0, 0), (1, 0)))[:, :-1]


def sinusoidal_table(max_len: int, d_feature: int) -> np.ndarray:
    """lm1b's fixed sinusoidal position embedding, ``(1, max_len, d_feature)``."""
    pe = np.zeros((max_len, d_feature), dtype=np.float32)
    position = np.arange(0, max_len)[:, np.newaxis]
    scale_factor = -np.log(10000.0) / (d_feature // 2 - 1)
    div_term = np.exp(np.arange(0, d_feature // 2) * scale_factor)
    pe[:, : d_feature // 2] = np.sin(position * div_term)
    pe[:, d_feature // 2 : 2 * (d_feature // 2)] = np.cos(position * div_term)
    return pe[np.newaxis, :, :]


_KERNEL = nn.initializers.xavier_uniform()
_BIAS = nn.initializers.normal(stddev=1e-6)


class DecoderBlock(nn.Module):
    """lm1b's EncoderDecoder1DBlock (decoder only): pre-LN attention, then a pre-LN MLP."""

    config: Config

    @nn.compact
    def __call__(self, inputs, decoder_mask, deterministic: bool):
        c = self.config
        x = nn.LayerNorm()(inputs)
        x = nn.MultiHeadDotProductAttention(
            num_heads=c.num_heads, qkv_features=c.qkv_dim, kernel_init=_KERNEL, bias_init=_BIAS,
            use_bias=False, broadcast_dropout=False, dropout_rate=c.attention_dropout_rate,
            deterministic=deterministic,
        )(x, mask=decoder_mask)
        x = nn.Dropout(rate=c.dropout_rate)(x, deterministic=deterministic) + inputs
        z = nn.LayerNorm()(x)
        z = nn.relu(nn.Dense(c.mlp_dim, kernel_init=_KERNEL, bias_init=_BIAS)(z))
        z = nn.Dropout(rate=c.dropout_rate)(z, deterministic=deterministic)
        z = nn.Dense(x.shape[-1], kernel_init=_KERNEL, bias_init=_BIAS)(z)
        return x + nn.Dropout(rate=c.dropout_rate)(z, deterministic=deterministic)


class TransformerLM(nn.Module):
    """lm1b's TransformerLM: logits for ``inputs`` from ``inputs`` shifted right."""

    config: Config = Config()

    @nn.compact
    def __call__(self, inputs, deterministic: bool):
        c = self.config
        # lm1b's decoder_mask: real tokens attend to real tokens at or before them.
        decoder_mask = nn.combine_masks(
            nn.make_attention_mask(inputs > 0, inputs > 0), nn.make_causal_mask(inputs)
        )
        embed = nn.Embed(c.vocab_size, c.emb_dim, embedding_init=nn.initializers.normal(1.0))
        y = embed(shift_right(inputs.astype("int32")))
        y = y + sinusoidal_table(c.max_len, c.emb_dim)[:, : inputs.shape[1], :]
        y = nn.Dropout(rate=c.dropout_rate)(y, deterministic=deterministic)
        for _ in range(c.num_layers):
            y = DecoderBlock(c)(y, decoder_mask, deterministic)
        y = nn.LayerNorm()(y)
        return nn.Dense(c.vocab_size, kernel_init=_KERNEL, bias_init=_BIAS)(y)


def compute_weighted_cross_entropy(logits, targets, weights):
    """lm1b's, without label smoothing: ``(sum of weighted token losses, sum of weights)``."""
    onehot = jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype)
    loss = -jnp.sum(onehot * nn.log_softmax(logits), axis=-1)
    return jnp.sum(loss * weights), jnp.sum(weights)


def compute_weighted_accuracy(logits, targets, weights):
    """lm1b's: ``(weighted count of correct argmax tokens, sum of weights)``."""
    correct = jnp.equal(jnp.argmax(logits, axis=-1), targets)
    return jnp.sum(correct * weights), jnp.sum(weights)


def token_weights(inputs):
    """lm1b's weights: 1 for a real token, 0 for padding (token 0)."""
    return jnp.where(inputs > 0, 1, 0).astype(jnp.float32)


def make_train_step(model: TransformerLM, learning_rate_fn, dropout_rng):
    """lm1b's ``train_step(state, batch)`` for a flax ``TrainState``; metrics are sums."""

    def train_step(state, inputs):
        weights = token_weights(inputs)
        rng = jax.random.fold_in(dropout_rng, state.step)

        def loss_fn(params):
            logits = model.apply({"params": params}, inputs, deterministic=False,
                                 rngs={"dropout": rng})
            loss, weight_sum = compute_weighted_cross_entropy(logits, inputs, weights)
            return loss / weight_sum, logits

        lr = learning_rate_fn(state.step)
        (_, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        new_state = state.apply_gradients(grads=grads)
        loss, weight_sum = compute_weighted_cross_entropy(logits, inputs, weights)
        acc, _ = compute_weighted_accuracy(logits, inputs, weights)
        metrics = {"loss": loss, "accuracy": acc, "denominator": weight_sum, "learning_rate": lr}
        return new_state, metrics

    return train_step


def lm1b_loss(model, batch, ctx):
    """lm1b's loss in jaxfit's full form: ``Average`` of the token sums, accuracy alike."""
    import jaxfit

    inputs = batch["inputs"]
    weights = token_weights(inputs)
    logits = model(inputs)  # deterministic=False in training, dropout keyed by the step
    loss, weight_sum = compute_weighted_cross_entropy(logits, inputs, weights)
    acc, _ = compute_weighted_accuracy(logits, inputs, weights)
    return jaxfit.Average(loss, weight_sum), {"accuracy": jaxfit.Average(acc, weight_sum)}


def rsqrt_schedule(peak: float, warmup: int):
    """lm1b's ``create_learning_rate_schedule`` shape: linear warmup, then rsqrt decay."""

    def learning_rate_fn(step):
        step = jnp.asarray(step, jnp.float32) + 1.0
        return peak * jnp.minimum(1.0, step / warmup) * jnp.sqrt(warmup / jnp.maximum(step, warmup))

    return learning_rate_fn


def synthetic_tokens(rows: int, config: Config, seed: int = 0) -> np.ndarray:
    """``(rows, max_len)`` int32 token ids in 1..vocab-1, each row a sentence of 8..max_len
    tokens padded with 0 on the right; the same for the same arguments."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, config.vocab_size, size=(rows, config.max_len), dtype=np.int32)
    lengths = rng.integers(8, config.max_len + 1, size=rows)
    tokens[np.arange(config.max_len)[None, :] >= lengths[:, None]] = 0
    return tokens
