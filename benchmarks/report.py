"""Summaries of a harness run: the markdown table and the PNG chart of ratios to A."""

from __future__ import annotations

import statistics
from collections import defaultdict


def summarize(results: list[dict]) -> dict:
    """Groups per-run figures by (contender, workload): medians and ranges across repetitions.

    Each run's ratio to A is taken against A's run on the same workload in the same
    repetition, so that the machine's load at that moment cancels out.
    """
    base = {
        (r["workload"], r["rep"]): r for r in results if r["contender"] == "A" and "error" not in r
    }
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in results:
        if "error" in r:
            continue
        a = base.get((r["workload"], r["rep"]))
        r = dict(r)
        if a is not None:
            r["ratio"] = r["steps_per_s"] / a["steps_per_s"]
            r["rss_ratio"] = r["peak_rss_mb"] / a["peak_rss_mb"]
        groups[(r["contender"], r["workload"])].append(r)
    summary = {}
    for key, runs in groups.items():
        stats = {}
        for field in ("ratio", "steps_per_s", "examples_per_s", "compile_s", "ttfs_s",
                      "peak_rss_mb", "rss_ratio"):
            values = [r[field] for r in runs if field in r]
            if values:
                stats[field] = (statistics.median(values), min(values), max(values))
        stats["n"] = len(runs)
        summary[key] = stats
    return summary


# Same-run comparisons the issue asks for: (numerator, denominator, what the row says).
PAIRS = (
    ("jaxfit-fullform", "jaxfit-callbacks",
     "full-form loss / built-in loss, both with the everyday callbacks (target >= 0.98)"),
    ("jaxfit-plain", "C", "jaxfit fit / Keras fit, no callbacks (ahead: > 1)"),
    ("jaxfit-callbacks", "C-callbacks", "jaxfit + everyday callbacks / Keras + 3 callbacks (ahead: > 1)"),
    ("jaxfit-spe", "B-rolled", "jaxfit steps_per_execution=16 / hand scan B rolled (target >= 1)"),
    ("jaxfit-spe-rolled", "B-rolled",
     "jaxfit steps_per_execution=16, scan_unroll=1 / hand scan B rolled (target >= 1)"),
)


def pair_ratios(results: list[dict], num: str, den: str) -> dict[str, tuple[float, float, float]]:
    """Per workload: median, min and max over repetitions of `num`'s steady steps/s over
    `den`'s in the same repetition (repetitions missing either are left out)."""
    by = {(r["contender"], r["workload"], r["rep"]): r["steps_per_s"]
          for r in results if "error" not in r}
    ratios: dict[str, list[float]] = defaultdict(list)
    for (c, w, rep), v in by.items():
        if c == num and (den, w, rep) in by:
            ratios[w].append(v / by[(den, w, rep)])
    return {w: (statistics.median(v), min(v), max(v)) for w, v in ratios.items()}


def comparisons(results: list[dict], pairs=PAIRS) -> list[tuple[str, dict]]:
    """`(label, {workload: (median, min, max)})` of every pair of `pairs` that ran."""
    out = []
    for num, den, label in pairs:
        stats = pair_ratios(results, num, den)
        if stats:
            out.append((label, stats))
    return out


def _rng(stat: tuple[float, float, float] | None, fmt: str) -> str:
    if stat is None:
        return "–"
    med, lo, hi = stat
    if lo == hi:
        return format(med, fmt)
    return f"{med:{fmt}} ({lo:{fmt}}–{hi:{fmt}})"


def markdown(
    summary: dict, contenders: list[tuple[str, str]], workloads: list[str], skipped: dict,
    errors: list[dict], compared: list[tuple[str, dict]] = (),
) -> str:
    """The ratio overview (contenders x workloads), the same-run comparisons of `compared`
    (from `comparisons`), then one detailed table per workload."""
    lines = ["### Steady-state steps/s, ratio to A (median (min–max) over repetitions)", ""]
    lines.append("| contender | " + " | ".join(workloads) + " |")
    lines.append("|---|" + "---|" * len(workloads))
    for name, label in contenders:
        cells = []
        for w in workloads:
            if (name, w) in summary:
                cells.append(_rng(summary[(name, w)].get("ratio"), ".2f"))
            else:
                cells.append("skipped" if (name, w) in skipped else "–")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if compared:
        lines += ["", "### Same-run comparisons: steps/s of one contender over another's in the "
                  "same repetition, median (min–max)", ""]
        lines.append("| comparison | " + " | ".join(workloads) + " |")
        lines.append("|---|" + "---|" * len(workloads))
        for label, stats in compared:
            cells = [_rng(stats.get(w), ".2f") for w in workloads]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for w in workloads:
        lines += ["", f"### {w}", ""]
        lines.append(
            "| contender | ratio to A | steps/s | examples/s | compile s | time to first step s "
            "| peak RSS MiB | RSS / A | runs |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for name, label in contenders:
            s = summary.get((name, w))
            if s is None:
                continue
            lines.append(
                f"| {label} | {_rng(s.get('ratio'), '.2f')} | {_rng(s['steps_per_s'], '.1f')} "
                f"| {_rng(s['examples_per_s'], '.0f')} | {_rng(s['compile_s'], '.2f')} "
                f"| {_rng(s['ttfs_s'], '.2f')} | {_rng(s['peak_rss_mb'], '.0f')} "
                f"| {_rng(s.get('rss_ratio'), '.2f')} | {s['n']} |"
            )
    if skipped:
        lines += ["", "Skipped: " + "; ".join(f"{c} on {w}: {why}" for (c, w), why in
                                               sorted(skipped.items()))]
    if errors:
        lines += ["", "Failed runs:"]
        lines += [f"- {e['contender']} on {e['workload']} (rep {e['rep']}): {e['error']}"
                  for e in errors]
    return "\n".join(lines) + "\n"


def chart(summary: dict, contenders: list[tuple[str, str]], workloads: list[str], path: str,
          title: str) -> None:
    """A grouped bar chart of the median ratio to A, with the min–max range as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [(n, lbl) for n, lbl in contenders if any((n, w) in summary for w in workloads)]
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(shown) + 2), 5))
    width = 0.8 / max(1, len(workloads))
    for i, w in enumerate(workloads):
        xs, meds, errs = [], [], [[], []]
        for j, (name, _) in enumerate(shown):
            stat = summary.get((name, w), {}).get("ratio")
            if stat is None:
                continue
            med, lo, hi = stat
            xs.append(j + (i - (len(workloads) - 1) / 2) * width)
            meds.append(med)
            errs[0].append(med - lo)
            errs[1].append(hi - med)
        ax.bar(xs, meds, width, yerr=errs, capsize=3, label=w)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(shown)))
    ax.set_xticklabels([lbl for _, lbl in shown], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("steady steps/s, ratio to hand loop A")
    ax.set_title(title, fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
