"""Reporting a profile (`storm_vlm.perf.profiler.profile_model`'s result): the Table-13-shaped text
table, the two plots, and writing them with the JSON, each file atomically."""

from __future__ import annotations

from pathlib import Path

from storm_vlm.perf.costmodel import DEFAULT_COMPRESSIONS, Compression
from storm_vlm.utils import atomic_path, atomic_write_json, atomic_write_text

__all__ = ["format_table", "plot_profile", "write_profile"]


def _pct(part, whole) -> str:
    return f"{100.0 * part / whole:5.1f}%" if whole else f"{'-':>6}"


def _compression(row: dict) -> Compression:
    return Compression(row["compression"], row["temporal_pool"], row["temporal_sample"], row["spatial_pool"])


def _comp_label(comp: Compression) -> str:
    """How a compression is named: `1 (none)`, `4x` / `8x` for the default mapping, else the
    `--compression` spelling FACTOR=POOL:SAMPLE:SPATIAL, so two settings of one factor stay apart."""
    if comp.factor == 1:
        return "1 (none)"
    if DEFAULT_COMPRESSIONS.get(comp.factor) == comp:
        return f"{comp.factor}x"
    return f"{comp.factor}={comp.temporal_pool}:{comp.temporal_sample}:{comp.spatial_pool}"


def format_table(result: dict) -> str:
    """A table shaped like the paper's Table 13: ms and % share per module, per row."""
    s = result["settings"]
    k = s["decode_tokens"]
    head = (
        f"per-module latency ({s['device']}, {s['compute_dtype']}; median of {s['repeats']} after "
        f"{s['warmup']} warm-up; llm = prefill + {k} decoded tokens; peak memory: {result['peak_memory_kind']})"
    )
    # each module's cell is "ms (share%)": 11 + 9 characters for the vision tower and the LLM, 9 + 9 for the projector
    w = max([11] + [len(_comp_label(_compression(r))) for r in result["rows"]])
    cols = f"{'frames':>6} {'comp':>{w}} {'tokens':>7} | {'vision_tower ms':>20} | {'projector ms':>18} | " \
           f"{'llm ms':>20} | {'prefill ms':>10} {'decode ms/tok':>13} | {'total ms':>10} {'peak MB':>9}"
    lines = [head, cols, "-" * len(cols)]
    for r in result["rows"]:
        label = _comp_label(_compression(r))
        if r.get("skipped"):
            lines.append(f"{r['frames']:>6} {label:>{w}} {r['visual_tokens']:>7} | {r['note']}")
            continue
        llm = r["llm_prefill_ms"] + k * r["decode_ms_per_token"]
        tot = r["total_ms"]
        lines.append(
            f"{r['frames']:>6} {label:>{w}} {r['visual_tokens']:>7} | "
            f"{r['vision_tower_ms']:>11.1f} ({_pct(r['vision_tower_ms'], tot)}) | "
            f"{r['projector_ms']:>9.1f} ({_pct(r['projector_ms'], tot)}) | "
            f"{llm:>11.1f} ({_pct(llm, tot)}) | "
            f"{r['llm_prefill_ms']:>10.1f} {r['decode_ms_per_token']:>13.2f} | {tot:>10.1f} {r['peak_memory_mb']:>9.1f}"
        )
    return "\n".join(lines)


def _pyplot():
    # matplotlib is imported here, not at module top: it takes about a second to import and only
    # the plots need it (the profiler, the table and the JSON do not).
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path) -> Path:
    """Write a matplotlib figure as PNG, atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    return Path(path)


def plot_profile(result: dict, out_dir) -> list[Path]:
    """latency_vs_frames.png (total and prefill per compression) and breakdown.png (stacked modules
    at the largest frame count every compression has a row for). Returns the paths written."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    rows = [r for r in result["rows"] if not r.get("skipped")]
    comps = sorted({_compression(r) for r in result["rows"]},
                   key=lambda c: (c.factor, c.temporal_pool, c.temporal_sample, c.spatial_pool))
    k = result["settings"]["decode_tokens"]
    written = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for c in comps:
        rs = sorted((r for r in rows if _compression(r) == c), key=lambda r: r["frames"])
        if not rs:
            continue
        name = _comp_label(c)
        line, = ax.plot([r["frames"] for r in rs], [r["total_ms"] for r in rs], marker="o", label=f"{name} total")
        ax.plot([r["frames"] for r in rs], [r["vision_tower_ms"] + r["projector_ms"] + r["llm_prefill_ms"] for r in rs],
                linestyle="--", color=line.get_color(), alpha=0.7, label=f"{name} to first token")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("frames")
    ax.set_ylabel("latency (ms)")
    ax.set_title(f"STORM latency vs frames ({result['settings']['device']}, {k} decoded tokens)")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(save_figure(fig, out_dir / "latency_vs_frames.png"))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    present = [{r["frames"] for r in rows if _compression(r) == c} for c in comps]
    common = set.intersection(*present) if present and all(present) else set()
    frames = max(common) if common else (max(r["frames"] for r in rows) if rows else None)
    parts = [("vision_tower_ms", "vision tower"), ("projector_ms", "projector"), ("llm_prefill_ms", "LLM prefill")]
    if frames is not None:
        sel = [next((r for r in rows if _compression(r) == c and r["frames"] == frames), None) for c in comps]
        xs = [_comp_label(c) for c in comps]
        bottom = [0.0] * len(comps)
        for key, name in parts + [("decode", f"decode x{k}")]:
            vals = [0.0 if r is None else (k * r["decode_ms_per_token"] if key == "decode" else r[key]) for r in sel]
            ax.bar(xs, vals, bottom=bottom, label=name)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_title(f"module breakdown at {frames} frames")
    ax.set_xlabel("compression")
    ax.set_ylabel("latency (ms)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(save_figure(fig, out_dir / "breakdown.png"))
    plt.close(fig)
    return written


def write_profile(result: dict, out_dir) -> Path:
    """Write OUT/profile.json and OUT/profile.txt (the table), each atomically; returns the JSON path."""
    out_dir = Path(out_dir)
    path = out_dir / "profile.json"
    atomic_write_json(path, result, indent=2)
    atomic_write_text(out_dir / "profile.txt", format_table(result) + "\n")
    return path
