"""Train a flax.nnx model with jaxfit: BatchNorm, Dropout, a schedule, and the module back.

An nnx module is built (and initialised) by the user, from its own ``nnx.Rngs``. jaxfit splits
it into the trainable ``nnx.Param`` state, which the optimizer updates, and everything else
(batch statistics, the dropout RNG stream), which the train step carries and checkpoints. When
``fit`` returns, the module holds the trained state (a copy), ready to call.

    python examples/nnx_example.py            # 15 epochs on scikit-learn's digits
    python examples/nnx_example.py --smoke    # seconds
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxfit import Trainer
from jaxfit.callbacks import LearningRateMonitor, LRScheduler
from jaxfit.datasets import load_digits_images


class CNN(nnx.Module):
    """Conv-BatchNorm-ReLU twice, then Dropout and a linear classifier, for 8x8x1 images."""

    def __init__(self, num_classes: int = 10, *, rngs: nnx.Rngs) -> None:
        self.conv1 = nnx.Conv(1, 32, (3, 3), rngs=rngs)
        self.bn1 = nnx.BatchNorm(32, rngs=rngs)
        self.conv2 = nnx.Conv(32, 32, (3, 3), rngs=rngs)
        self.bn2 = nnx.BatchNorm(32, rngs=rngs)
        self.dropout = nnx.Dropout(0.3, rngs=rngs)
        self.head = nnx.Linear(8 * 8 * 32, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        # No `train` argument: jaxfit switches the module with .train() / .eval(), which
        # sets BatchNorm and Dropout to training or inference behaviour.
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = nnx.relu(self.bn2(self.conv2(x)))
        return self.head(self.dropout(x.reshape((x.shape[0], -1))))


def main(argv=None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="a slice of the data, 2 epochs")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--out", default="runs/nnx_example/history.png",
                   help="the PNG of the training curves")
    args = p.parse_args(argv)
    data = load_digits_images()
    if args.smoke:
        data, args.epochs = data.subset(256, 128), min(args.epochs, 2)
    print(f"data: {data.describe()}")

    model = CNN(rngs=nnx.Rngs(0))
    batch_size = 64
    total_steps = args.epochs * -(-len(data.x_train) // batch_size)
    trainer = Trainer(
        optimizer=optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3, weight_decay=1e-4),
        loss="softmax_cross_entropy",
        metrics=["accuracy"],
        seed=0,
    )
    history = trainer.fit(
        model,
        (data.x_train, data.y_train),
        validation_data=(data.x_val, data.y_val),
        epochs=args.epochs,
        batch_size=batch_size,
        callbacks=[
            LRScheduler(optax.cosine_decay_schedule(3e-3, total_steps, alpha=0.05)),
            LearningRateMonitor(),
        ],
    )
    for epoch, (loss, acc, lr) in enumerate(
        zip(history.history["val_loss"], history.history["val_accuracy"],
            history.history["learning_rate"]), 1
    ):  # fmt: skip
        print(f"epoch {epoch:2d}  val_loss {loss:.4f}  val_accuracy {acc:.4f}  lr {lr:.2e}")

    # What the train step carried besides the params: BatchNorm statistics and the RNG stream.
    others = nnx.state(model, nnx.Not(nnx.Param))
    leaves = jax.tree_util.tree_leaves(others, is_leaf=lambda v: isinstance(v, nnx.Variable))
    kinds = sorted({type(v).__name__ for v in leaves})
    print(f"model state trained alongside the params: {', '.join(kinds)}")

    # fit wrote the trained state back into the module (as copies the train step won't donate).
    model.eval()
    logits = model(jnp.asarray(data.x_val))
    accuracy = float(np.mean(np.argmax(np.asarray(logits), -1) == data.y_val))
    same = np.allclose(np.asarray(logits), trainer.predict(data.x_val), atol=1e-5)
    evaluated = trainer.evaluate((data.x_val, data.y_val))
    print(f"the trained nnx module: val accuracy {accuracy:.4f} (trainer.evaluate: "
          f"{evaluated['accuracy']:.4f}); its outputs match trainer.predict: {same}")  # fmt: skip
    path = history.plot(args.out, title="flax.nnx CNN on digits")
    print(f"wrote {path}")
    return {"accuracy": accuracy, "evaluate_accuracy": evaluated["accuracy"], "same": same}


if __name__ == "__main__":
    main()
