"""Prefill speedups of token compression and the projector's share of prefill, in one run.

    python benchmarks/prefill.py                    # bench-cpu model (configs/bench-cpu.yaml)
    python benchmarks/prefill.py runs/my-model      # a saved STORM model

Prefill = time to the first token: vision tower + projector (with compression) + LLM prefill.
The settings are measured round-robin (`--warmup` untimed rounds, then `--repeats` timed
rounds; each ratio is taken within a round, then the median over rounds), so load drift on a
shared machine hits them alike. Prints:
  * 128 frames: 4x compression (temporal pool 4) vs none, 8x (pool 4 + sample 2) vs none
    (targets >= 3x and >= 5x), and the same for the LLM prefill alone;
  * 32 frames: the projector's share of prefill (target <= 5%), without and with 4x compression;
  * beside each, the bound from storm_vlm.perf.costmodel: the FLOP ratio (FLOP share), attention counted
    causal as SDPA's flash kernels (CPU and CUDA) compute it, and dense;
  * each module's achieved GFLOP/s (attention counted dense).
"""

from __future__ import annotations

import statistics

import _profile_common as common


def main(argv=None) -> int:
    args = common.parser(__doc__.splitlines()[0], repeats=3, warmup=1).parse_args(argv)
    from storm_vlm.perf.costmodel import DEFAULT_COMPRESSIONS, pipeline_cost
    from storm_vlm.perf.profiling import format_table

    model, source, defaults = common.load(args)
    comps = [DEFAULT_COMPRESSIONS[c] for c in (1, 4, 8)]
    s = common.settings(args, defaults, [32, 128], comps, decode_tokens=0)
    model = common.prepare(model, s)
    common.header("prefill", source, s)

    combos = [(32, comps[0]), (32, comps[1]), (128, comps[0]), (128, comps[1]), (128, comps[2])]
    rows = common.interleaved(model, combos, s)
    for (frames, factor), row in rows.items():
        if row.get("skipped"):
            print(f"{frames} frames {factor}x: {row['note']}")
            return 1
    print()
    print(format_table({"settings": {**s.__dict__, "compute_dtype": s.dtype}, "peak_memory_kind": "rss (max)",
                        "rows": list(rows.values())}))
    print()

    def ttft(r):
        return r["vision_tower_ms"] + r["projector_ms"] + r["llm_prefill_ms"]

    out = {}
    for factor, target in ((4, 3.0), (8, 5.0)):
        base, comp = rows[(128, 1)], rows[(128, factor)]
        speed = common.round_ratio(base, comp, ttft)
        llm = common.round_ratio(base, comp, lambda r: r["llm_prefill_ms"])
        flops, causal = (
            pipeline_cost(model.config, 128, DEFAULT_COMPRESSIONS[1], s.text_tokens, causal=c).prefill_flops
            / pipeline_cost(model.config, 128, DEFAULT_COMPRESSIONS[factor], s.text_tokens, causal=c).prefill_flops
            for c in (False, True))
        out[f"prefill_speedup_128f_{factor}x"] = round(speed, 3)
        out[f"llm_prefill_speedup_128f_{factor}x"] = round(llm, 2)
        out[f"predicted_flops_ratio_128f_{factor}x"] = round(flops, 2)
        out[f"predicted_flops_ratio_causal_128f_{factor}x"] = round(causal, 2)
        print(f"prefill speedup at 128 frames, {factor}x vs none: {speed:5.3f}x (target >= {target:.0f}x: "
              f"{common.verdict(speed, target)}); LLM prefill alone {llm:5.2f}x; FLOP-bound ratio {causal:5.2f}x "
              f"(causal attention, as SDPA's flash kernels compute it; {flops:4.2f}x counting attention dense)")
    for factor in (1, 4):
        r = rows[(32, factor)]
        share = statistics.median(x["projector_ms"] / ttft(x) for x in r["per_round"])
        est = pipeline_cost(model.config, 32, DEFAULT_COMPRESSIONS[factor], s.text_tokens, causal=True)
        flop_share = est.projector.flops / est.prefill_flops
        out[f"projector_share_32f_{factor}x"] = round(share, 4)
        out[f"projector_flop_share_32f_{factor}x"] = round(flop_share, 4)
        print(f"projector share of prefill at 32 frames, {factor}x: {100 * share:5.2f}% "
              f"(target <= 5%: {common.verdict(share, 0.05, higher_is_better=False)}); its FLOP share "
              f"{100 * flop_share:4.2f}%")
    print("(ratios and shares: median over the timed rounds of the figure within each round)")
    print("achieved rate per module (FLOPs from storm_vlm.perf.costmodel, attention counted dense / median ms):")
    for (frames, factor), r in rows.items():
        rates = {k: r["gflop"][k] / r[f"{k}_ms"] * 1e3 for k in ("vision_tower", "projector", "llm_prefill")}
        out[f"gflop_per_s_{frames}f_{factor}x"] = {k: round(v, 2) for k, v in rates.items()}
        print(f"  {frames:>4} frames {factor}x: vision tower {rates['vision_tower']:5.1f}, projector "
              f"{rates['projector']:5.1f}, LLM prefill {rates['llm_prefill']:5.1f} GFLOP/s")
    vision_share = rows[(128, 4)]["vision_tower_ms"] / ttft(rows[(128, 4)])
    print(f"(vision tower share of prefill at 128 frames, 4x: {100 * vision_share:.1f}% — compression "
          f"does not reduce it)")
    common.write_json(args.json, {"benchmark": "prefill", "source": source, "settings": s.__dict__ | {
        "compressions": [c.__dict__ for c in s.compressions]}, "ratios": out,
        "rows": [r for r in rows.values()]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
