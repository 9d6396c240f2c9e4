"""Context switches and CPU time per call of the compiled train step alone, no loop around it.

XLA:CPU runs a program's thunks concurrently when several are ready at once, handing some to
another thread; on a dispatch-bound step (W1, ~200 us) each hand-off costs more than the work
it moves. This counts the process's context switches per step (``getrusage``: a measure that
stays readable on a loaded machine, unlike wall time) for the hand-written step and for
jaxfit's engine step, each with a constant learning rate and with a schedule:

- ``hand``: benchmarks.hand's W1-W3 step on ``inject_hyperparams(adam)(learning_rate=1e-3)``;
- ``hand+schedule``: the same with ``learning_rate=cosine_decay_schedule(...)`` (optax computes
  the rate inside the step);
- ``jaxfit``: the engine's train step of ``Trainer(...).fit`` (what ``fit`` calls per batch);
- ``jaxfit+schedule``: the same with the schedule attached as LRScheduler attaches it.

    python -m benchmarks.step_threads              # W1, 2 rounds of 2000 steps each
    python -m benchmarks.step_threads --workload W3 --steps 500
"""

from __future__ import annotations

import argparse
import resource
import time

import jax
import optax

from benchmarks.workloads import WORKLOADS


def _hand(w, x, schedule):
    """benchmarks.hand's W1-W3 step, on an optimizer with the learning rate injected."""
    tx = optax.inject_hyperparams(optax.adam)(learning_rate=schedule or w.learning_rate)
    model = w.make_model()
    params = model.init(jax.random.key(0), x[:1])
    state = [params, tx.init(params)]

    def loss_fn(params, xb, yb):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply(params, xb), yb).mean()

    def raw(params, opt_state, xb, yb):
        loss, grads = jax.value_and_grad(loss_fn)(params, xb, yb)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    step = jax.jit(raw, donate_argnums=(0, 1))

    def run(xb, yb):
        state[0], state[1], _ = step(state[0], state[1], xb, yb)
        return state

    return run


def _jaxfit(w, x, y, schedule):
    from jaxfit import Trainer
    from jaxfit.data import Execution

    trainer = Trainer(optimizer=w.make_optimizer(inject=True), loss="softmax_cross_entropy", seed=0)
    trainer.fit(w.make_model(), (x, y), epochs=1, batch_size=w.batch_size, verbose=0)
    fn = trainer._engine.train_fn(1, {"learning_rate": schedule} if schedule else {}, trainer.scan_unroll)
    b = w.batch_size
    mask = trainer._mask(Execution((x[:b], y[:b]), (b,), b))
    state = [trainer.engine_state]

    def run(xb, yb):
        state[0], _ = fn(state[0], (xb, yb), mask)
        return state

    return run


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", default="W1")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    w = WORKLOADS[args.workload]
    x, y = w.data()
    schedule = optax.cosine_decay_schedule(w.learning_rate, 10_000)
    runs = {"hand": _hand(w, x, None), "hand+schedule": _hand(w, x, schedule),
            "jaxfit": _jaxfit(w, x, y, None), "jaxfit+schedule": _jaxfit(w, x, y, schedule)}
    b = w.batch_size
    xb, yb = x[:b], y[:b]
    for run in runs.values():  # compiled and warm before anything is counted
        jax.block_until_ready(run(xb, yb))
    print(f"{args.workload}: per step, {args.steps} steps per round")
    for r in range(args.rounds):
        for name, run in runs.items():
            r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            for _ in range(args.steps):
                out = run(xb, yb)
            jax.block_until_ready(out)
            r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            cs = (r1.ru_nvcsw + r1.ru_nivcsw - r0.ru_nvcsw - r0.ru_nivcsw) / args.steps
            cpu = (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) / args.steps
            print(f"  round {r + 1} {name:16s} context switches {cs:5.2f}  CPU {cpu * 1e6:6.0f} us"
                  f"  wall {(t1 - t0) / args.steps * 1e6:6.0f} us")


if __name__ == "__main__":
    main()
