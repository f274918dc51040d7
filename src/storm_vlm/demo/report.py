"""The demo's report: rows with confidence intervals, the paper's claims with verdicts, a PNG.

Every number comes from the per-question correctness of each (row, seed) -- results.json keeps
those tables, so anyone can recompute the intervals. A row's accuracy is the mean over seeds
and questions with a 95 % t interval that covers both (`storm_vlm.demo.stats.accuracy_ci`); a
claim is the paired gap between two rows (`paired_gap`) with its verdict: *reproduced* when
the CI lies above 0, *contradicted* when below, *inconclusive* otherwise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from storm_vlm.demo.settings import CLAIMS, ROWS, VARIANT_BY_NAME, WITHIN_WINDOW, DemoSettings
from storm_vlm.demo.stats import accuracy_ci, paired_gap
from storm_vlm.utils import atomic_path

CHANCE = 0.25


def scope_tasks(scope: str, tasks: list[str]) -> list[str]:
    """The tasks a scope averages over: all of them, the within-window ones, or one task."""
    if scope == "average":
        return list(tasks)
    if scope == "within-window":
        return [t for t in tasks if t in WITHIN_WINDOW]
    return [scope] if scope in tasks else []


def _restrict(table: dict, tasks_of: dict, tasks: list[str]) -> tuple[dict, dict]:
    keep = {q: t for q, t in tasks_of.items() if t in tasks}
    return {s: {q: c for q, c in per.items() if q in keep} for s, per in table.items()}, keep


def _scopes(tasks: list[str]) -> list[str]:
    return list(tasks) + (["within-window"] if len(scope_tasks("within-window", tasks)) > 1 else []) + ["average"]


def build_rows(settings: DemoSettings, correctness: dict, tasks_of: dict, tokens: dict, latency: dict,
               tasks: list[str]) -> list[dict]:
    """One dict per table row: accuracy per task, within-window and average, each with its CI.

    correctness: {row: {seed: {question_id: bool}}}; tasks_of: {question_id: task};
    tokens: {row: visual tokens}; latency: {row: measure_prefill()'s dict}.
    """
    out = []
    for row in ROWS:
        if row.name not in correctness:
            continue
        variant = VARIANT_BY_NAME[row.variant]
        table = correctness[row.name]
        stats = {}
        for scope in _scopes(tasks):
            sub, sub_tasks = _restrict(table, tasks_of, scope_tasks(scope, tasks))
            stats[scope] = accuracy_ci(sub, sub_tasks)
        lat = latency.get(row.name)
        out.append({
            "row": row.name,
            "label": row.label,
            "variant": row.variant,
            "projector": variant.projector,
            "bidirectional": variant.bidirectional,
            "temporal_pool": variant.temporal_pool,
            "trained_frames": settings.trained_frames(variant),
            "input_frames": settings.input_frames(row),
            "temporal_sample_stride": row.sample,
            "visual_tokens": tokens[row.name],
            "note": row.note,
            "accuracy": stats,
            "prefill_ms": None if lat is None else round(lat["prefill_ms"], 3),
            "prefill_sequence_length": None if lat is None else lat["sequence_length"],
        })
    return out


def build_claims(correctness: dict, tasks_of: dict, tasks: list[str]) -> list[dict]:
    """Each paper claim as paired gaps (row_a - row_b) per scope, with CI and verdict."""
    out = []
    for claim in CLAIMS:
        if claim.row_a not in correctness or claim.row_b not in correctness:
            continue
        scopes = []
        for scope in claim.scopes:
            names = scope_tasks(scope, tasks)
            if not names:
                continue
            a, keep = _restrict(correctness[claim.row_a], tasks_of, names)
            b, _ = _restrict(correctness[claim.row_b], tasks_of, names)
            gap = paired_gap(a, b, keep)
            scopes.append({"scope": scope, "tasks": names, **gap})
        out.append({"claim": claim.name, "statement": claim.statement, "row_a": claim.row_a,
                    "row_b": claim.row_b, "paper": claim.paper, "scopes": scopes})
    return out


# ------------------------------------------------------------------------------------------ text


def _pct(stat: dict) -> str:
    return f"{100 * stat['mean']:.1f} [{100 * stat['low']:.1f}, {100 * stat['high']:.1f}]"


def _gap(scope: dict) -> str:
    return f"{100 * scope['gap']:+.1f} [{100 * scope['low']:+.1f}, {100 * scope['high']:+.1f}]"


def claims_markdown(claims: list[dict]) -> str:
    """The claims table: one line per (claim, scope), gap in points with its 95 % CI."""
    lines = ["| claim | scope | ours: gap (points) [95 % CI] | verdict | paper |", "|---|---|---:|---|---|"]
    for c in claims:
        for i, s in enumerate(c["scopes"]):
            head = f"**{c['claim']}** {c['statement']}" if i == 0 else ""
            lines.append(f"| {head} | {s['scope']} | {_gap(s)} | {s['verdict']} | {c['paper'] if i == 0 else ''} |")
    return "\n".join(lines) + "\n"


def rows_markdown(rows: list[dict], tasks: list[str]) -> str:
    """The rows table: accuracy % with 95 % CI per task, within-window and average."""
    scopes = _scopes(tasks)
    head = ["row", "input frames", "visual tokens", *scopes, "seed std (avg)", "prefill (ms)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in rows:
        acc = r["accuracy"]
        cells = [r["label"], str(r["input_frames"]), str(r["visual_tokens"])]
        cells += [("**" + _pct(acc[s]) + "**") if s == "average" else _pct(acc[s]) for s in scopes]
        cells.append(f"{100 * acc['average']['std_over_seeds']:.1f}")
        cells.append("—" if r["prefill_ms"] is None else f"{r['prefill_ms']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def format_console(rows: list[dict], claims: list[dict], tasks: list[str]) -> str:
    """Fixed-width claims and rows for the terminal."""
    def table(head, body):
        widths = [max(len(x) for x in col) for col in zip(head, *body)]
        fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        return "\n".join([fmt(head), "  ".join("-" * w for w in widths), *[fmt(b) for b in body]])

    claim_body = [[f"{c['claim']} {c['row_a']} - {c['row_b']}", s["scope"], _gap(s), s["verdict"]]
                  for c in claims for s in c["scopes"]]
    scopes = _scopes(tasks)
    row_body = [[r["label"], str(r["input_frames"]), str(r["visual_tokens"]),
                 *[f"{100 * r['accuracy'][s]['mean']:.1f}" for s in scopes],
                 _pct(r["accuracy"]["average"]), f"{100 * r['accuracy']['average']['std_over_seeds']:.1f}"]
                for r in rows]
    return (table(["claim (gap in points, 95 % CI)", "scope", "gap", "verdict"], claim_body) + "\n\n"
            + table(["row", "frames", "tokens", *scopes, "average [95 % CI]", "seed std"], row_body) + "\n")


def plot(rows: list[dict], tasks: list[str], path: Path, title: str) -> None:
    """Accuracy per row with 95 % CI error bars: the average, and each task."""
    scopes = _scopes(tasks)
    y = np.arange(len(rows))
    fig = Figure(figsize=(12, 0.9 * len(rows) + 2))  # no pyplot: no GUI backend, no global state
    ax = fig.subplots()
    height = 0.8 / len(scopes)
    for i, scope in enumerate(scopes):
        stats = [r["accuracy"][scope] for r in rows]
        mean = np.array([100 * s["mean"] for s in stats])
        err = np.array([[100 * (s["mean"] - s["low"]) for s in stats], [100 * (s["high"] - s["mean"]) for s in stats]])
        colour = "black" if scope == "average" else colormaps["Dark2"](i % 8)
        ax.barh(y + (i - (len(scopes) - 1) / 2) * height, mean, height=height, xerr=err, capsize=2,
                label=scope, color=colour, alpha=0.85)
    ax.axvline(100 * CHANCE, color="k", ls="--", lw=1)
    ax.set_yticks(y, [f"{r['label']}\n{r['input_frames']} fr → {r['visual_tokens']} tok" for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("accuracy (%), error bars: 95 % CI over seeds and questions; dashed: chance")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: bars reach 100 %
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
