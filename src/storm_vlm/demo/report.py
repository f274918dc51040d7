"""Turning per-seed evaluation results into the demo's table: results.json, results.md and a PNG.

The table has the shape of the paper's Table 2: variant | input frames | visual tokens to the
LLM | accuracy per task | average | prefill latency (ms). With several seeds each number is
mean ± std (population std over seeds; n = number of seeds).
"""

from __future__ import annotations

import statistics
from pathlib import Path

from storm_vlm.demo.settings import ROWS, VARIANT_BY_NAME, DemoSettings
from storm_vlm.utils import atomic_path

CHANCE = 0.25


def _stats(values: list[float]) -> dict:
    values = [float(v) for v in values]
    return {
        "mean": statistics.fmean(values),
        "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
        "per_seed": values,
    }


def build_rows(settings: DemoSettings, evals: dict, latency: dict, tasks: list[str]) -> list[dict]:
    """One dict per table row.

    evals: {seed: {row name: evaluate_variant()'s row result}}; latency: {row name: {...}}.
    The row's average is the mean of its per-task accuracies (tasks have equal question counts).
    """
    out = []
    seeds = sorted(evals)
    for row in ROWS:
        per_seed = [evals[s][row.name] for s in seeds if row.name in evals[s]]
        if not per_seed:
            continue
        variant = VARIANT_BY_NAME[row.variant]
        tokens = {r["visual_tokens"] for r in per_seed}
        assert len(tokens) == 1, f"row {row.name}: token counts differ between seeds {tokens}"
        task_stats = {t: _stats([r["tasks"].get(t, 0.0) for r in per_seed]) for t in tasks}
        averages = [statistics.fmean(r["tasks"].get(t, 0.0) for t in tasks) for r in per_seed]
        lat = latency.get(row.name)
        out.append({
            "row": row.name,
            "label": row.label,
            "variant": row.variant,
            "projector": variant.projector,
            "temporal_pool": variant.temporal_pool,
            "trained_frames": settings.trained_frames(variant),
            "input_frames": per_seed[0]["input_frames"],
            "temporal_sample_stride": row.sample,
            "visual_tokens": tokens.pop(),
            "note": row.note,
            "tasks": task_stats,
            "average": _stats(averages),
            "accuracy_all_questions": _stats([r["accuracy"] for r in per_seed]),
            "questions": int(per_seed[0]["counts"]["total"]),
            "questions_per_task": per_seed[0]["task_counts"],
            "unparsed": [int(r["counts"].get("unparsed", 0)) for r in per_seed],
            "prefill_ms": None if lat is None else round(lat["prefill_ms"], 3),
            "prefill_sequence_length": None if lat is None else lat["sequence_length"],
        })
    return out


def _fmt(stat: dict, seeds: int, scale: float = 100.0, digits: int = 1) -> str:
    mean = stat["mean"] * scale
    if seeds > 1:
        return f"{mean:.{digits}f} ± {stat['std'] * scale:.{digits}f}"
    return f"{mean:.{digits}f}"


def format_markdown(rows: list[dict], tasks: list[str], seeds: int) -> str:
    """The results table as GitHub markdown (accuracies in %)."""
    head = ["variant", "input frames", "visual tokens", *tasks, "average", "prefill (ms)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in rows:
        cells = [r["label"], str(r["input_frames"]), str(r["visual_tokens"])]
        cells += [_fmt(r["tasks"][t], seeds) for t in tasks]
        cells.append("**" + _fmt(r["average"], seeds) + "**")
        cells.append("—" if r["prefill_ms"] is None else f"{r['prefill_ms']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def format_console(rows: list[dict], tasks: list[str], seeds: int) -> str:
    """A fixed-width version of the table for the terminal."""
    head = ["variant", "frames", "tokens", *tasks, "average", "prefill ms"]
    body = []
    for r in rows:
        body.append([r["label"], str(r["input_frames"]), str(r["visual_tokens"]),
                     *[_fmt(r["tasks"][t], seeds) for t in tasks], _fmt(r["average"], seeds),
                     "-" if r["prefill_ms"] is None else f"{r['prefill_ms']:.1f}"])
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(head), "  ".join("-" * w for w in widths), *[fmt(b) for b in body]]) + "\n"


def plot(rows: list[dict], tasks: list[str], path: Path, title: str) -> None:
    """Two panels: average accuracy per row (error bars = std over seeds), accuracy per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [f"{r['label']}\n{r['input_frames']} fr → {r['visual_tokens']} tok" for r in rows]
    colours = ["#4C72B0" if r["projector"] == "mlp" else "#DD8452" for r in rows]
    y = np.arange(len(rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 0.55 * len(rows) + 2.5),
                                   gridspec_kw={"width_ratios": [1, 1.6]})
    means = [100 * r["average"]["mean"] for r in rows]
    stds = [100 * r["average"]["std"] for r in rows]
    ax1.barh(y, means, xerr=stds, color=colours)
    ax1.axvline(100 * CHANCE, color="k", ls="--", lw=1, label="chance (25%)")
    ax1.set_yticks(y, labels, fontsize=8)
    ax1.invert_yaxis()
    ax1.set_xlabel("average accuracy (%)")
    ax1.set_xlim(0, 100)
    ax1.legend(loc="lower right", fontsize=8)
    ax1.set_title("average over tasks (blue: MLP/VILA, orange: Mamba/STORM)", fontsize=9)
    width = 0.8 / max(1, len(tasks))
    for i, t in enumerate(tasks):
        ax2.barh(y + (i - (len(tasks) - 1) / 2) * width, [100 * r["tasks"][t]["mean"] for r in rows],
                 height=width, label=t, color=plt.get_cmap("Dark2")(i % 8))
    ax2.axvline(100 * CHANCE, color="k", ls="--", lw=1)
    ax2.set_yticks(y, [r["label"] for r in rows], fontsize=8)
    ax2.invert_yaxis()
    ax2.set_xlim(0, 100)
    ax2.set_xlabel("accuracy per task (%)")
    ax2.legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
