"""flax's VAE (examples/vae) on scikit-learn's digits, with a full-form loss.

The model and the loss are flax's ``examples/vae``: an encoder of 500 units to a mean and a
log-variance of 20 latents, the reparameterisation with a key passed to ``__call__``, a
decoder of 500 units, and loss = binary cross-entropy + KL divergence with the inputs as
targets. The images are the 1,797 8x8 digits that ship with scikit-learn, scaled to [0, 1]
and flattened (64 pixels instead of MNIST's 784).

The loss is jaxfit's full form, ``loss(model, batch, ctx)``: the batch is the images
alone, the sampling key is ``ctx.rng("z")`` (its own stream, derived from the seed and the
step), and ``model.method("generate", z)`` decodes samples. Each run writes checkpoints and
a PNG of generated digits to a new ``runs/vae/version_N`` (or ``--run-dir``).

    python examples/vae.py            # 30 epochs, ~45 s on 2 CPU cores, compilation included
    python examples/vae.py --smoke    # 2 epochs on 384 images
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _helpers.run_dirs import run_dir
from jaxfit.callbacks import ModelCheckpoint
from sklearn.datasets import load_digits

from jaxfit import Trainer

LATENTS = 20


class Encoder(nn.Module):
    latents: int

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(500, name="fc1")(x))
        return nn.Dense(self.latents, name="fc2_mean")(x), nn.Dense(self.latents, name="fc2_logvar")(x)


class Decoder(nn.Module):
    pixels: int

    @nn.compact
    def __call__(self, z):
        return nn.Dense(self.pixels, name="fc2")(nn.relu(nn.Dense(500, name="fc1")(z)))


class VAE(nn.Module):
    latents: int = LATENTS
    pixels: int = 64

    def setup(self):
        self.encoder = Encoder(self.latents)
        self.decoder = Decoder(self.pixels)

    def __call__(self, x, z_rng):
        mean, logvar = self.encoder(x)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(z_rng, logvar.shape)
        return self.decoder(z), mean, logvar

    def generate(self, z):
        return nn.sigmoid(self.decoder(z))


def kl_divergence(mean, logvar):
    return -0.5 * jnp.sum(1 + logvar - jnp.square(mean) - jnp.exp(logvar), axis=-1)


def binary_cross_entropy_with_logits(logits, labels):
    logits = nn.log_sigmoid(logits)
    return -jnp.sum(labels * logits + (1.0 - labels) * jnp.log(-jnp.expm1(logits)), axis=-1)


def vae_loss(model, images, ctx):
    """flax's loss_fn: bce.mean() + kld.mean(), the means over the real rows (ctx.mask)."""
    recon, mean, logvar = model(images, ctx.rng("z"))
    bce = jnp.sum(binary_cross_entropy_with_logits(recon, images) * ctx.mask) / ctx.weight
    kld = jnp.sum(kl_divergence(mean, logvar) * ctx.mask) / ctx.weight
    return bce + kld, {"bce": bce, "kld": kld}


def digits(seed: int = 0):
    """(train, val): flattened 8x8 images in [0, 1], float32, split 80/20."""
    x = (load_digits().images.reshape(-1, 64) / 16.0).astype(np.float32)
    x = x[np.random.default_rng(seed).permutation(len(x))]
    n_val = len(x) // 5
    return x[n_val:], x[:n_val]


def save_samples(params, path, n: int = 64) -> None:
    """An 8x8 grid of digits decoded from z ~ N(0, I), as flax's example saves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z = jax.random.normal(jax.random.key(1), (n, LATENTS))
    images = np.asarray(VAE().apply({"params": params}, z, method=VAE.generate)).reshape(n, 8, 8)
    # A 1-pixel white border: the digits fill their 8x8 frames and would touch.
    images = np.pad(images, ((0, 0), (1, 1), (1, 1)))
    grid = images.reshape(8, 8, 10, 10).transpose(0, 2, 1, 3).reshape(80, 80)
    fig, ax = plt.subplots(figsize=(3, 3))
    ax.imshow(grid, cmap="gray_r")
    ax.axis("off")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=None, help="default 30; --smoke: 2")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--run-dir", default=None, help="default: a new runs/vae/version_N")
    p.add_argument("--smoke", action="store_true", help="2 epochs on 384 images")
    args = p.parse_args()
    epochs = args.epochs or (2 if args.smoke else 30)
    out = run_dir("vae", args.run_dir)

    x_train, x_val = digits()
    if args.smoke:
        x_train, x_val = x_train[:256], x_val[:128]  # whole batches: one compile each
    trainer = Trainer(optax.adam(1e-3), loss=vae_loss, seed=0)
    history = trainer.fit(VAE(), x_train, validation_data=x_val, epochs=epochs,
                          batch_size=args.batch_size, verbose=2,
                          callbacks=[ModelCheckpoint(out, monitor="val_loss")])  # fmt: skip
    h = history.history
    print(f"val_loss {h['val_loss'][0]:.2f} -> {h['val_loss'][-1]:.2f} "
          f"(bce {h['val_bce'][-1]:.2f}, kld {h['val_kld'][-1]:.2f}) after {epochs} epochs")
    save_samples(trainer.params, out / "samples.png")
    print(f"checkpoints and samples.png in {out}")


if __name__ == "__main__":
    main()
