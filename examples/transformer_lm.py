"""A small Transformer language model with lm1b's padding mask and token-weighted loss.

A decoder-only Transformer in the shape of flax's ``examples/lm1b`` (inputs shifted right
inside the model, a causal mask combined with a padding mask, learned positions, dropout
switched by a ``deterministic`` flag), trained character by character on a corpus of
sentences of varying length made from a small grammar (no download), padded with 0.

The loss is lm1b's: cross-entropy weighted by ``inputs > 0``, summed and divided by the
summed weights. As a full-form loss it returns ``jaxfit.Average(sum, weights.sum())``, so
every epoch's loss and accuracy are ratios of sums over the epoch's tokens: a batch with
more real tokens counts more, padding counts for nothing. ``LRScheduler`` warms the rate
up and decays it; ``ModelCheckpoint`` keeps the best ``val_loss`` in a new
``runs/transformer_lm/version_N`` (or ``--run-dir``).

    python examples/transformer_lm.py          # 8 epochs on 2,048 sentences, ~2.5 min on 2 CPU
                                               # cores; val accuracy ~0.89 per character
    python examples/transformer_lm.py --smoke  # 2 epochs on 128 sentences
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _helpers.run_dirs import run_dir
from jaxfit.callbacks import LRScheduler, ModelCheckpoint

import jaxfit
from jaxfit import Trainer

MAX_LEN = 56  # the longest sentence has 53 characters
SUBJECTS = ["the cat", "a dog", "my old friend", "the small bird", "our teacher", "she", "he"]
VERBS = ["sees", "likes", "follows", "paints", "finds", "sings to"]
OBJECTS = ["the moon", "a red ball", "the river", "his sister", "a quiet song", "the garden"]
ENDINGS = ["", " today", " at night", " in the rain", " again and again"]
CHARS = sorted(set("".join(SUBJECTS + VERBS + OBJECTS + ENDINGS) + "."))
VOCAB = len(CHARS) + 1  # 0 is padding


def corpus(n: int, seed: int) -> np.ndarray:
    """``n`` sentences as (n, MAX_LEN) int32 character ids, 0-padded on the right."""
    rng = np.random.default_rng(seed)
    ids = {c: i + 1 for i, c in enumerate(CHARS)}
    out = np.zeros((n, MAX_LEN), np.int32)
    for row in range(n):
        s = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}{rng.choice(ENDINGS)}."
        out[row, : len(s)] = [ids[c] for c in s]
    return out


def decode(ids: np.ndarray) -> str:
    return "".join(CHARS[i - 1] for i in ids if i > 0)


class Block(nn.Module):
    dim: int
    heads: int
    dropout: float

    @nn.compact
    def __call__(self, x, mask, deterministic: bool):
        h = nn.SelfAttention(self.heads, dropout_rate=self.dropout, deterministic=deterministic)(
            nn.LayerNorm()(x), mask=mask)
        x = x + nn.Dropout(self.dropout, deterministic=deterministic)(h)
        h = nn.Dense(self.dim)(nn.gelu(nn.Dense(4 * self.dim)(nn.LayerNorm()(x))))
        return x + nn.Dropout(self.dropout, deterministic=deterministic)(h)


class TransformerLM(nn.Module):
    """lm1b's decoder in small: predicts ``inputs`` from ``inputs`` shifted right."""

    dim: int = 64
    heads: int = 4
    layers: int = 2
    dropout: float = 0.1

    @nn.compact
    def __call__(self, inputs, *, deterministic: bool):
        shifted = jnp.pad(inputs, ((0, 0), (1, 0)))[:, :-1]  # lm1b's shift_right
        # Query i attends to keys j <= i, and real tokens only to real tokens (lm1b's
        # decoder_mask: a causal mask combined with the padding mask of inputs > 0).
        mask = nn.combine_masks(nn.make_attention_mask(inputs > 0, inputs > 0),
                                nn.make_causal_mask(inputs))  # fmt: skip
        x = nn.Embed(VOCAB, self.dim)(shifted)
        x = x + self.param("positions", nn.initializers.normal(0.02), (1, inputs.shape[1], self.dim))
        x = nn.Dropout(self.dropout, deterministic=deterministic)(x)
        for _ in range(self.layers):
            x = Block(self.dim, self.heads, self.dropout)(x, mask, deterministic)
        return nn.Dense(VOCAB)(nn.LayerNorm()(x))


def lm1b_loss(model, batch, ctx):
    """lm1b's compute_weighted_cross_entropy and compute_weighted_accuracy, as sums."""
    inputs = batch["inputs"]
    weights = jnp.where(inputs > 0, 1.0, 0.0)
    logits = model(inputs)  # deterministic=False in training: dropout on, keyed by the step
    xent = optax.softmax_cross_entropy_with_integer_labels(logits, inputs)
    correct = (jnp.argmax(logits, -1) == inputs) * weights
    return jaxfit.Average(jnp.sum(xent * weights), jnp.sum(weights)), {
        "accuracy": jaxfit.Average(jnp.sum(correct), jnp.sum(weights))}


def complete(model: TransformerLM, params, prompt: str, length: int = 24) -> str:
    """Greedy decoding from ``prompt``: the whole (padded) sequence per character."""
    ids = {c: i + 1 for i, c in enumerate(CHARS)}
    seq = np.zeros((1, MAX_LEN), np.int32)
    seq[0, : len(prompt)] = [ids[c] for c in prompt]
    step = jax.jit(lambda p, s: model.apply({"params": p}, s, deterministic=True))
    pos = len(prompt)
    for _ in range(min(length, MAX_LEN - pos)):
        # The model predicts token `pos` at position `pos` (inputs are shifted inside),
        # from tokens < pos; a placeholder there makes it count as real for the mask.
        seq[0, pos] = 1
        seq[0, pos] = int(np.argmax(step(params, seq)[0, pos]))
        if CHARS[seq[0, pos] - 1] == ".":
            break
        pos += 1
    return decode(seq[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=None, help="default 8; --smoke: 2")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--run-dir", default=None, help="default: a new runs/transformer_lm/version_N")
    p.add_argument("--smoke", action="store_true", help="2 epochs on 128 sentences")
    args = p.parse_args()
    epochs = args.epochs or (2 if args.smoke else 8)
    out = run_dir("transformer_lm", args.run_dir)

    train = {"inputs": corpus(128 if args.smoke else 2048, seed=0)}
    val = {"inputs": corpus(64 if args.smoke else 256, seed=1)}
    steps = epochs * -(-len(train["inputs"]) // args.batch_size)
    # One block in smoke mode: half the compilation, and the loss still falls.
    model = TransformerLM(layers=1) if args.smoke else TransformerLM()
    trainer = Trainer(optax.inject_hyperparams(optax.adamw)(learning_rate=3e-3, weight_decay=0.01),
                      loss=lm1b_loss, seed=0)  # fmt: skip
    history = trainer.fit(
        model, train, validation_data=val, epochs=epochs, batch_size=args.batch_size,
        verbose=2,
        callbacks=[LRScheduler(optax.warmup_cosine_decay_schedule(0.0, 3e-3, max(steps // 10, 1), steps)),
                   ModelCheckpoint(out, monitor="val_loss")],
    )  # fmt: skip
    h = history.history
    tokens = int((val["inputs"] > 0).sum())
    print(f"val_loss {h['val_loss'][0]:.4f} -> {h['val_loss'][-1]:.4f} per token over {tokens} "
          f"tokens (uniform: {np.log(VOCAB - 1):.4f}); val_accuracy {h['val_accuracy'][-1]:.4f}")
    print(f"the model completes 'the cat s' as {complete(model, trainer.params, 'the cat s')!r}")
    print(f"checkpoints in {out}")


if __name__ == "__main__":
    main()
