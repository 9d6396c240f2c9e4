"""How long a ModelCheckpoint save blocks training: background writer against inline writes.

For each state size, trains an MLP with Adam and saves every ``--every`` steps, once with the
background writer (training waits only for the host copy) and once writing inline (training
waits for serialize + sha256 + fsync + rename), interleaved and repeated. Prints the median
time the training thread was blocked per save, the median write time, and their ratio.

    python benchmarks/checkpoint_save.py --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flax.linen as nn  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from jaxfit import Callback, Trainer  # noqa: E402
from jaxfit.callbacks import ModelCheckpoint  # noqa: E402


class MLP(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(self.width)(x))
        x = nn.relu(nn.Dense(self.width)(x))
        return nn.Dense(10)(x)


class EpochClock(Callback):
    """Times the second epoch (after compilation), ending when every save is on disk."""

    order = 300

    def on_epoch_end(self, trainer, logs):
        if trainer.epoch == 1:
            self.start = time.perf_counter()

    def on_fit_end(self, trainer, logs):
        self.seconds = time.perf_counter() - self.start


def one_run(width: int, background: bool | str | None, steps: int, every: int) -> dict:
    """Two epochs of ``steps`` steps; ``background`` None trains without ModelCheckpoint."""
    rng = np.random.default_rng(0)
    x = rng.random((steps * 32, 784), np.float32)
    y = rng.integers(0, 10, steps * 32)
    clock = EpochClock()
    with tempfile.TemporaryDirectory() as tmp:
        cb = ModelCheckpoint(Path(tmp) / "run", every_n_epochs=None, every_n_steps=every,
                             keep_last=2, keep_best=0,
                             background=True if background is None else background,
                             max_data_bytes=0)
        callbacks = [clock] if background is None else [cb, clock]
        trainer = Trainer(optimizer=optax.inject_hyperparams(optax.adam)(learning_rate=1e-3))
        trainer.fit(MLP(width), (x, y), epochs=2, batch_size=32, shuffle=False,
                    callbacks=callbacks, verbose=0)
    n = steps // every  # saves of the second epoch (and the fit-end wait) only
    return {"epoch2": clock.seconds, "blocked": cb.stats.blocking[-n:],
            "write": cb.stats.write[-n:], "device": cb.stats.device_wait[-n:],
            "copy": cb.stats.copy[-n:],
            "nbytes": cb.stats.nbytes[-1] if cb.stats.nbytes else 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    med = statistics.median
    print(f"{'state':>8} {'mode':>10} {'blocked/save':>13} {'of it copy':>11} {'write/save':>11} "
          f"{'device wait':>12} {'epoch time vs none':>19}")
    for width in args.widths:
        runs: dict = {None: [], True: [], "process": [], False: []}
        for _ in range(args.repeats):
            for mode in runs:  # interleaved: the machine's noise hits them all
                runs[mode].append(one_run(width, mode, args.steps, args.every))
        base = [r["epoch2"] for r in runs[None]]
        nbytes = runs[True][0]["nbytes"]
        for mode, label in ((True, "background"), ("process", "process"), (False, "inline")):
            rs = runs[mode]
            blocked = med([b for r in rs for b in r["blocked"]])
            write = med([w for r in rs for w in r["write"]])
            device = med([d for r in rs for d in r["device"]])
            copy = med([c for r in rs for c in r["copy"]])
            ratio = med([r["epoch2"] / b for r, b in zip(rs, base)])
            print(f"{nbytes / 2**20:6.1f}MB {label:>10} {blocked * 1e3:10.1f} ms {copy * 1e3:8.1f} ms "
                  f"{write * 1e3:8.1f} ms {device * 1e3:9.1f} ms {ratio:18.3f}x")


if __name__ == "__main__":
    main()
