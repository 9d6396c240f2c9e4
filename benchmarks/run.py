"""Benchmark harness: jaxfit against the hand loop, the hand scan and Keras 3, side by side.

Runs every contender on every workload, interleaved (one repetition covers everything, and
the order of contenders turns from one repetition to the next), each run in its own
subprocess. Prints and writes a markdown table of steady-state speed as a ratio to the hand
loop A of the same repetition, with steps/s, examples/s, compile time, time to first step and
peak RSS, plus a PNG bar chart of the ratios.

Usage, from the repository root (`pip install -e .[bench]` for Keras):

    python -m benchmarks.run --quick           # one repetition, short epochs, a few minutes
    python -m benchmarks.run                   # the full run: 3 repetitions
    python -m benchmarks.run --workloads W1 --contenders A,C --reps 5
    python -m benchmarks.run --workloads W4 --contenders A,B-rolled,jaxfit-callbacks,jaxfit-spe
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Epochs per run, the first one (compile) being left out of the steady figures.
EPOCHS = {
    "full": {"W1": 1 + 60, "W2": 1 + 2, "W3": 1 + 8, "W4": 1 + 8},
    "quick": {"W1": 1 + 10, "W2": 1 + 1, "W3": 1 + 2, "W4": 1 + 1},
}
QUICK_CONTENDERS = ("A", "C-callbacks", "jaxfit-callbacks", "jaxfit-spe")


def _run_one(name: str, workload: str, epochs: int, rep: int, timeout: float,
             extra_args: tuple[str, ...] = ()) -> dict:
    from benchmarks.contenders import CONTENDERS

    env = dict(os.environ)
    env.update(CONTENDERS[name].env)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory(prefix="jaxfit-bench-") as workdir:
        cmd = [sys.executable, "-m", "benchmarks.worker", "--contender", name,
               "--workload", workload, "--epochs", str(epochs), "--workdir", workdir,
               *extra_args]
        base = {"contender": name, "workload": workload, "rep": rep}
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            return {**base, "error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return {**json.loads(line[len("RESULT "):]), "rep": rep}
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {**base, "error": f"exit {proc.returncode}: {tail}"}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 repetition, short runs")
    p.add_argument("--reps", type=int, help="repetitions (default: 3, or 1 with --quick)")
    p.add_argument("--workloads", default="W1,W2,W3,W4", help="comma-separated (W1,W2,W3,W4)")
    p.add_argument("--contenders", help="comma-separated names (default: all available)")
    p.add_argument("--epochs", type=int, help="override epochs per run (1 warm-up + measured)")
    p.add_argument("--include-slow", action="store_true",
                   help="also run the pairs skipped by default (B-rolled on W2 takes minutes; "
                        "A-jemalloc on W1 and W3)")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"),
                   help="directory for results.json, table.md and ratios.png")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    return p.parse_args(argv)


def _select(args: argparse.Namespace) -> tuple[list[str], list[str], dict]:
    from benchmarks.contenders import CONTENDERS

    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    bad = [w for w in workloads if w not in EPOCHS["full"]]
    if bad:
        raise SystemExit(f"unknown workload(s) {bad}; choose from {sorted(EPOCHS['full'])}")
    if args.contenders:
        names = [c.strip() for c in args.contenders.split(",") if c.strip()]
        bad = [c for c in names if c not in CONTENDERS]
        if bad:
            raise SystemExit(f"unknown contender(s) {bad}; choose from {list(CONTENDERS)}")
    else:
        names = [c for c, spec in CONTENDERS.items()
                 if (c in QUICK_CONTENDERS if args.quick else spec.default)]
    if "A" not in names:
        names.insert(0, "A")  # every ratio is to A in the same repetition
    skipped = {}
    for name in list(names):
        missing = [m for m in CONTENDERS[name].needs if not _importable(m)]
        for w in workloads:
            if missing:
                skipped[(name, w)] = f"{', '.join(missing)} not installed (pip install .[bench])"
            elif w in CONTENDERS[name].skip and not args.include_slow:
                skipped[(name, w)] = CONTENDERS[name].skip[w]
    return workloads, names, skipped


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a dotted name whose parent package is missing
        return False


def main(argv: list[str] | None = None) -> list[dict]:
    args = _parse(argv)
    from benchmarks.contenders import CONTENDERS
    from benchmarks.report import chart, comparisons, markdown, summarize

    workloads, names, skipped = _select(args)
    mode = "quick" if args.quick else "full"
    reps = args.reps or (1 if args.quick else 3)
    results: list[dict] = []
    started = time.time()
    for rep in range(reps):
        for w in workloads:
            # Turn the order each repetition so no contender always runs first (or after the
            # same neighbour); A stays in every repetition for the ratios.
            order = names[rep % len(names):] + names[: rep % len(names)]
            for name in order:
                if (name, w) in skipped:
                    continue
                epochs = args.epochs or EPOCHS[mode][w]
                r = _run_one(name, w, epochs, rep, args.timeout)
                results.append(r)
                shown = r.get("error") or f"{r['steps_per_s']:.1f} steps/s"
                print(f"[{time.time() - started:6.0f}s] rep {rep + 1}/{reps} {w} {name}: {shown}",
                      file=sys.stderr, flush=True)
    command = "python -m benchmarks.run " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    header = _header(command, mode, reps, time.time() - started)
    summary = summarize(results)
    labels = [(n, CONTENDERS[n].label) for n in names]
    errors = [r for r in results if "error" in r]
    table = header + "\n" + markdown(summary, labels, workloads, skipped, errors,
                                     comparisons(results))
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"command": command, "mode": mode, "reps": reps, "results": results}, f,
                  indent=1)
    chart(summary, labels, workloads, os.path.join(args.out, "ratios.png"),
          f"steady steps/s ratio to A, median and range over {reps} repetition(s)")
    return results


def _header(command: str, mode: str, reps: int, seconds: float) -> str:
    import jax

    versions = f"jax {jax.__version__}"
    if importlib.util.find_spec("keras"):
        from importlib.metadata import version

        versions += f", keras {version('keras')}"
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"Command: `{command}` ({mode} mode, {reps} repetition(s), {seconds:.0f} s)\n\n"
        f"Run {now} on {platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, {versions}.\n"
    )


if __name__ == "__main__":
    main()
