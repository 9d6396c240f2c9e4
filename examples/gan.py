"""A GAN as a custom ``jaxfit.Step``: two networks, two optimizers, on a 2-D toy distribution.

The real data are points from a ring of eight Gaussians (the toy of the GAN literature);
the generator maps 2-D noise to points, the discriminator scores points. One train step
updates the generator against the current discriminator, then the discriminator against
fakes from the **already-updated** generator: what one loss and one update cannot say, so
it is a ``jaxfit.Step`` over a state of both params and both optimizer states.

Both optimizers are ``optax.inject_hyperparams(adam)``: their hyperparameters are
``trainer.hyperparams["og.learning_rate"]`` and ``["od.learning_rate"]`` (qualified by the
state keys), each decayed by its own ``LRScheduler``. Validation scores the generator on
held-out real points: the share of its samples within 3 standard deviations of a mode
("quality") and how many of the 8 modes it reaches. Checkpoints and a scatter plot of
real and generated points go to a new ``runs/gan/version_N`` (or ``--run-dir``).

    python examples/gan.py            # 40 epochs, ~30 s on 2 CPU cores
    python examples/gan.py --smoke    # 2 epochs on 1,024 points
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

MODES = np.stack([np.cos(np.arange(8) * np.pi / 4), np.sin(np.arange(8) * np.pi / 4)], 1) * 2.0
STD = 0.05


def ring(n: int, seed: int) -> np.ndarray:
    """``n`` points from the ring of eight Gaussians, float32 (n, 2)."""
    rng = np.random.default_rng(seed)
    return (MODES[rng.integers(0, 8, n)] + rng.normal(0, STD, (n, 2))).astype(np.float32)


class MLP(nn.Module):
    out: int
    width: int = 64

    @nn.compact
    def __call__(self, x):
        for _ in range(2):
            x = nn.relu(nn.Dense(self.width)(x))
        return nn.Dense(self.out)(x)


def bce(logits, label):
    return optax.sigmoid_binary_cross_entropy(logits, jnp.full_like(logits, label)).mean()


class GANStep(jaxfit.Step):
    """G then D, each with its own Adam; D sees fakes from the G of this very step."""

    def __init__(self, lr_g: float = 1e-3, lr_d: float = 1e-3) -> None:
        self.G, self.D = MLP(2), MLP(1)
        self.tx_g = optax.inject_hyperparams(optax.adam)(learning_rate=lr_g, b1=0.5)
        self.tx_d = optax.inject_hyperparams(optax.adam)(learning_rate=lr_d, b1=0.5)

    def init(self, model, batch, key):
        kg, kd = jax.random.split(key)
        g = self.G.init(kg, jnp.zeros((1, 2)))["params"]
        d = self.D.init(kd, jnp.zeros((1, 2)))["params"]
        return {"g": g, "d": d, "og": self.tx_g.init(g), "od": self.tx_d.init(d)}

    def fake(self, g, key, n):
        return self.G.apply({"params": g}, jax.random.normal(key, (n, 2)))

    def d_loss(self, d, real, fake):
        return bce(self.D.apply({"params": d}, real), 1.0) + bce(self.D.apply({"params": d}, fake), 0.0)

    def g_loss(self, g, d, key, n):
        return bce(self.D.apply({"params": d}, self.fake(g, key, n)), 1.0)  # non-saturating

    def train_step(self, s, real, ctx):
        key, n = ctx.rng("z"), real.shape[0]
        g_loss, grads = jax.value_and_grad(self.g_loss)(s["g"], s["d"], key, n)
        updates, og = self.tx_g.update(grads, s["og"], s["g"])
        g = optax.apply_updates(s["g"], updates)
        # The discriminator learns against the generator just updated.
        fake = jax.lax.stop_gradient(self.fake(g, key, n))
        d_loss, grads = jax.value_and_grad(self.d_loss)(s["d"], real, fake)
        updates, od = self.tx_d.update(grads, s["od"], s["d"])
        d = optax.apply_updates(s["d"], updates)
        logs = {"loss": g_loss + d_loss, "g_loss": g_loss, "d_loss": d_loss}
        return {"g": g, "d": d, "og": og, "od": od}, logs

    def eval_step(self, s, real, ctx):
        fake = self.fake(s["g"], ctx.rng("z"), real.shape[0])
        dist = jnp.linalg.norm(fake[:, None, :] - jnp.asarray(MODES)[None], axis=-1)  # (n, 8)
        near = dist.min(1) < 3 * STD
        reached = jnp.zeros(8).at[dist.argmin(1)].max(near.astype(jnp.float32))
        return {"d_loss": self.d_loss(s["d"], real, fake), "quality": near.mean(),
                "modes": reached.sum()}

    def predict_step(self, s, batch, ctx):
        """Generated points for noise ``batch`` of shape (n, 2)."""
        return self.G.apply({"params": s["g"]}, batch)

    def params(self, s):
        return s["g"]


def save_scatter(real, fake, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4))
    ax.scatter(*real.T, s=2, alpha=0.3, label="real")
    ax.scatter(*fake.T, s=2, alpha=0.5, label="generated")
    ax.set_aspect("equal")
    ax.legend(loc="upper right")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=None, help="default 40; --smoke: 2")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--run-dir", default=None, help="default: a new runs/gan/version_N")
    p.add_argument("--smoke", action="store_true", help="2 epochs on 1,024 points")
    args = p.parse_args()
    epochs = args.epochs or (2 if args.smoke else 40)
    out = run_dir("gan", args.run_dir)

    real, val = ring(1024 if args.smoke else 8192, seed=0), ring(1024, seed=1)
    steps = epochs * -(-len(real) // args.batch_size)
    trainer = Trainer(step=GANStep(), seed=0)
    history = trainer.fit(
        data=real, validation_data=val, epochs=epochs, batch_size=args.batch_size, verbose=2,
        validation_batch_size=len(val),  # one batch: "modes" counts over the whole set
        callbacks=[LRScheduler(optax.cosine_decay_schedule(1e-3, steps, alpha=0.1), hyperparam="og.learning_rate"),
                   LRScheduler(optax.cosine_decay_schedule(1e-3, steps, alpha=0.1), hyperparam="od.learning_rate"),
                   ModelCheckpoint(out, monitor="val_quality", mode="max")],
    )  # fmt: skip
    h = history.history
    print(f"two optimizers: og.learning_rate {trainer.hyperparams['og.learning_rate']:.2e}, "
          f"od.learning_rate {trainer.hyperparams['od.learning_rate']:.2e}")
    print(f"generator: quality {h['val_quality'][0]:.3f} -> {h['val_quality'][-1]:.3f}, "
          f"modes reached {h['val_modes'][-1]:.1f} of 8")
    fake = np.asarray(trainer.predict(np.random.default_rng(2).normal(size=(1024, 2)).astype(np.float32)))
    save_scatter(val, fake, out / "samples.png")
    print(f"checkpoints and samples.png in {out}")


if __name__ == "__main__":
    main()
