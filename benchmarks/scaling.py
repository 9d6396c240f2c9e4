"""Cost as work grows: W3 at 1x, 4x and 16x the params and with 10x the rows, in one table.

For the hand loop A and jaxfit with the everyday callbacks (`jaxfit-callbacks`: a
checkpoint every epoch), interleaved and repeated as in `benchmarks.run`: steady steps/s,
the ratio to A of the same repetition (it must hold as the work grows), peak RSS, and the
resident set size's growth from the end of epoch 2 to the end of the last epoch (memory must
grow with the model, not with the number of steps or checkpoints).

    python -m benchmarks.scaling             # 3 repetitions  -> results/scaling.md, .json
    python -m benchmarks.scaling --quick     # 1 repetition, 1 warm-up + 2 measured epochs
    python -m benchmarks.scaling --variants W3,W3-p4 --reps 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import sys
import time

from benchmarks.report import _rng, summarize
from benchmarks.run import REPO, _header, _run_one

CONTENDERS = ("A", "jaxfit-callbacks")
VARIANTS = ("W3", "W3-p4", "W3-p16", "W3-r10")
# Epochs per run (1 warm-up + measured): the wide models' epochs take seconds each.
EPOCHS = {
    "full": {"W3": 1 + 8, "W3-p4": 1 + 4, "W3-p16": 1 + 3, "W3-r10": 1 + 3},
    "quick": {v: 1 + 2 for v in VARIANTS},
}


def rss_growth(run: dict) -> float | None:
    """MiB the resident set grew from the end of epoch 2 to the end of the last epoch."""
    rss = run.get("epoch_rss_mb") or []
    return rss[-1] - rss[1] if len(rss) >= 3 else None


def _median(values: list[float]) -> tuple[float, float, float] | None:
    return (statistics.median(values), min(values), max(values)) if values else None


def scaling_rows(results: list[dict], variants: list[str]) -> list[dict]:
    """One row per variant: its size, A's and jaxfit's figures (median, min, max)."""
    from benchmarks.workloads import mlp_params, workload

    summary = summarize(results)
    base = mlp_params(workload(variants[0]).hidden, workload(variants[0]).input_shape[0])
    rows = []
    for v in variants:
        w = workload(v)
        params = mlp_params(w.hidden, w.input_shape[0])
        a, j = summary.get(("A", v), {}), summary.get(("jaxfit-callbacks", v), {})
        growth = {c: _median([g for r in results if r["contender"] == c and r["workload"] == v
                              and "error" not in r and (g := rss_growth(r)) is not None])
                  for c in CONTENDERS}
        rows.append({
            "variant": v, "hidden": w.hidden, "params": params, "params_x": params / base,
            # params and Adam's two moments, float32 each.
            "state_mb": 3 * params * 4 / 2**20, "rows": w.batches * w.batch_size,
            "data_mb": w.batches * w.batch_size * math.prod(w.input_shape) * 4 / 2**20,
            "steps_per_epoch": w.batches,
            "a_steps": a.get("steps_per_s"), "j_steps": j.get("steps_per_s"),
            "ratio": j.get("ratio"), "a_rss": a.get("peak_rss_mb"), "j_rss": j.get("peak_rss_mb"),
            "rss_ratio": j.get("rss_ratio"), "a_growth": growth["A"],
            "j_growth": growth["jaxfit-callbacks"],
        })
    return rows


def scaling_markdown(rows: list[dict], header: str = "", errors: list[dict] = ()) -> str:
    """The table of `scaling_rows`, then what it shows against the first (1x) row."""
    lines = [header] if header else []
    lines += ["### W3 as the work grows: A and jaxfit + everyday callbacks", ""]
    lines.append(
        "| variant | hidden | params | x | Adam state MiB | rows | steps/epoch | A steps/s "
        "| jaxfit steps/s | ratio to A | A peak RSS MiB | jaxfit peak RSS MiB | RSS / A "
        "| RSS growth epoch 2 → last, A / jaxfit MiB |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        hidden = "-".join(str(h) for h in r["hidden"])
        lines.append(
            f"| {r['variant']} | {hidden} | {r['params']:,} | {r['params_x']:.1f} "
            f"| {r['state_mb']:.0f} | {r['rows']:,} | {r['steps_per_epoch']} "
            f"| {_rng(r['a_steps'], '.1f')} | {_rng(r['j_steps'], '.1f')} "
            f"| {_rng(r['ratio'], '.2f')} | {_rng(r['a_rss'], '.0f')} | {_rng(r['j_rss'], '.0f')} "
            f"| {_rng(r['rss_ratio'], '.2f')} "
            f"| {_rng(r['a_growth'], '+.1f')} / {_rng(r['j_growth'], '+.1f')} |"
        )
    first = rows[0] if rows else None
    notes = []
    for r in rows[1:]:
        if first and r["ratio"] and first["ratio"]:
            notes.append(f"- {r['variant']}: ratio to A {r['ratio'][0]:.2f} against "
                         f"{first['ratio'][0]:.2f} at {first['variant']}")
        if first and r["j_rss"] and first["j_rss"]:
            notes.append(
                f"  - jaxfit peak RSS {r['j_rss'][0] - first['j_rss'][0]:+.0f} MiB over "
                f"{first['variant']}, for {r['state_mb'] - first['state_mb']:+.0f} MiB more "
                f"Adam state and {r['data_mb'] - first['data_mb']:+.0f} MiB more data"
            )
    if notes:
        lines += ["", "Against the first row (medians):", "", *notes]
    lines += ["", "RSS growth: the resident set at the end of the last epoch less that at the end "
              "of epoch 2; steps and checkpoints (one per epoch) go on in between, so memory "
              "that grew with them would show here."]
    if errors:
        lines += ["", "Failed runs:"]
        lines += [f"- {e['contender']} on {e['workload']} (rep {e['rep']}): {e['error']}"
                  for e in errors]
    return "\n".join(lines) + "\n"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 repetition, 2 measured epochs")
    p.add_argument("--reps", type=int, help="repetitions (default: 3, or 1 with --quick)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated, from {','.join(VARIANTS)}")
    p.add_argument("--epochs", type=int, help="override epochs per run (1 warm-up + measured)")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"),
                   help="directory for scaling.md and scaling.json")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = _parse(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise SystemExit(f"unknown variant(s) {bad}; choose from {list(VARIANTS)}")
    mode = "quick" if args.quick else "full"
    reps = args.reps or (1 if args.quick else 3)
    epochs = {v: args.epochs or EPOCHS[mode][v] for v in variants}
    if min(epochs.values()) < 3:
        raise SystemExit("--epochs must be >= 3: RSS growth is measured from epoch 2 to the last")
    results, started = [], time.time()
    for rep in range(reps):
        for v in variants:
            order = CONTENDERS[rep % 2:] + CONTENDERS[: rep % 2]
            for name in order:
                r = _run_one(name, v, epochs[v], rep, args.timeout, ("--track-rss",))
                results.append(r)
                shown = r.get("error") or f"{r['steps_per_s']:.1f} steps/s"
                print(f"[{time.time() - started:6.0f}s] rep {rep + 1}/{reps} {v} {name}: {shown}",
                      file=sys.stderr, flush=True)
    command = "python -m benchmarks.scaling " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    header = _header(command, mode, reps, time.time() - started)
    errors = [r for r in results if "error" in r]
    text = scaling_markdown(scaling_rows(results, variants), header, errors)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "scaling.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "scaling.json"), "w") as f:
        json.dump({"command": command, "mode": mode, "reps": reps, "epochs": epochs,
                   "results": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
