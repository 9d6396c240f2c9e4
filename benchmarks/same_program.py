"""Whether the full-form loss and the built-in one give XLA the same train step, W1-W3.

The harness's `jaxfit-fullform` / `jaxfit-callbacks` ratio is a timing, and on W1 (a
checkpoint every ~10 ms epoch) its spread is wide. This compares the programs themselves:
for each workload it trains two steps with `loss="softmax_cross_entropy"` and with
`jaxfit_contender.xent_full_form` (the same loss written as `(model, batch, ctx) -> Average`),
compiles each engine's train step as `fit` runs it (the injected learning rate scheduled,
as LRScheduler attaches it) and compares the optimized modules without their source
names (`canonical`), and their flop counts.

    python -m benchmarks.same_program                  # W1, W2, W3
    python -m benchmarks.same_program --workloads W1
"""

from __future__ import annotations

import argparse
import re

import optax

from benchmarks.jaxfit_contender import xent_full_form
from benchmarks.workloads import WORKLOADS


def canonical(hlo: str) -> str:
    """An optimized HLO module's text without what names the Python source: the file,
    function and stack-frame tables after the module line, and each instruction's
    metadata (source lines, op names). Two programs that compute alike compare equal."""
    lines = hlo.splitlines()
    body = next(i for i, line in enumerate(lines) if line.startswith(("%", "ENTRY")))
    return re.sub(r", metadata=\{[^}]*\}", "", "\n".join(lines[:1] + lines[body:]))


def compiled_step(workload: str, loss) -> tuple[str, float]:
    """The canonical text and flop count of `workload`'s single train step with `loss`."""
    from jaxfit import Trainer
    from jaxfit.data import Execution

    w = WORKLOADS[workload]
    x, y = (a[:4 * w.batch_size] for a in w.data())
    trainer = Trainer(optimizer=w.make_optimizer(inject=True), loss=loss, seed=0)
    trainer.fit(w.make_model(), (x, y), epochs=1, batch_size=w.batch_size, max_steps=2,
                verbose=0)
    fn = trainer._engine.train_fn(1, {"learning_rate": optax.cosine_decay_schedule(1e-3, 100)},
                                  trainer.scan_unroll)
    batch = (x[:w.batch_size], y[:w.batch_size])
    program = fn.lower(trainer.engine_state, batch,
                       trainer._mask(Execution(batch, (w.batch_size,), w.batch_size))).compile()
    return canonical(program.as_text()), float(program.cost_analysis().get("flops", -1.0))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", default="W1,W2,W3")
    args = p.parse_args(argv)
    print("| workload | built-in vs full-form program | flops, built-in | flops, full-form |")
    print("|---|---|---|---|")
    for name in args.workloads.split(","):
        built_in, f_built_in = compiled_step(name, "softmax_cross_entropy")
        full_form, f_full_form = compiled_step(name, xent_full_form)
        same = "identical" if built_in == full_form else "different"
        print(f"| {name} | {same} ({len(built_in)} characters) | {f_built_in:.4g} | "
              f"{f_full_form:.4g} |", flush=True)


if __name__ == "__main__":
    main()
