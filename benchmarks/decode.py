"""Decode latency per generated token at 256 frames: 4x compression vs none, in one run.

    python benchmarks/decode.py                     # bench-cpu model (configs/bench-cpu.yaml)
    python benchmarks/decode.py runs/my-model

Each setting's video is prefilled once (vision tower + projector + LLM prefill) and its KV cache
kept; then rounds of `--tokens` greedy decode steps alternate between the caches (`--warmup`
untimed rounds, `--repeats` timed; each round's cache is cropped back), so load drift on a shared
machine hits both alike; the median step is kept. A near-empty cache (a one-frame video, 8x
compression) is measured the same way: it shows the fixed cost of a step (the weights, the
per-layer overhead), which compression cannot reduce. Target: >= 2.5x lower per-token latency.
"""

from __future__ import annotations

import statistics

import _profile_common as common


def main(argv=None) -> int:
    p = common.parser(__doc__.splitlines()[0], repeats=6, warmup=1)
    p.add_argument("--frames", type=int, default=256)
    p.add_argument("--tokens", type=int, default=16, help="decode steps per round (default: 16)")
    args = p.parse_args(argv)
    from storm_vlm.costmodel import A100_80GB, DEFAULT_COMPRESSIONS, decode_cost, pipeline_cost, real_config
    from storm_vlm.profiling import decode_latency, prefill_video

    model, source, defaults = common.load(args)
    settings = {
        "none": (args.frames, DEFAULT_COMPRESSIONS[1]),
        "4x": (args.frames, DEFAULT_COMPRESSIONS[4]),
        "empty": (1, DEFAULT_COMPRESSIONS[8]),
    }
    s = common.settings(args, defaults, [args.frames], [DEFAULT_COMPRESSIONS[1], DEFAULT_COMPRESSIONS[4]],
                        decode_tokens=args.tokens)
    model = common.prepare(model, s)
    common.header("decode", source, s)

    caches = {}
    for name, (frames, comp) in settings.items():
        caches[name] = prefill_video(model, frames, comp, s)
        print(f"  prefilled {name:>5}: {frames} frames, {comp.label}: KV cache {caches[name][0].get_seq_length()} tokens",
              flush=True)
    steps = {name: [] for name in settings}
    for rnd in range(s.warmup + s.repeats):
        for name, (cache, token) in caches.items():
            times = decode_latency(model, cache, token, args.tokens, s)
            if rnd >= s.warmup:
                steps[name].extend(times)
        print(f"  round {rnd + 1}{' (warm-up)' if rnd < s.warmup else ''}: " + ", ".join(
            f"{n} {statistics.median(steps[n]):.1f}" for n in steps if steps[n]) + " ms/token (running medians)",
            flush=True)
    med = {name: statistics.median(v) for name, v in steps.items()}
    ctx = {name: caches[name][0].get_seq_length() for name in caches}
    ratio = med["none"] / med["4x"]
    cfg = model.config
    flops = {name: decode_cost(cfg, ctx[name]).flops for name in ctx}
    real = real_config()
    real_costs = [pipeline_cost(real, args.frames, DEFAULT_COMPRESSIONS[c]).decode_per_token for c in (1, 4)]
    print()
    print(f"decode latency per token at {args.frames} frames, none vs 4x: {med['none']:.2f} vs {med['4x']:.2f} ms "
          f"= {ratio:.2f}x lower with 4x (target >= 2.5x: {common.verdict(ratio, 2.5)})")
    print(f"  near-empty cache ({ctx['empty']} tokens): {med['empty']:.2f} ms/token — the fixed part of a step; "
          f"the cache-dependent part is {med['none'] - med['empty']:.2f} (none) vs {med['4x'] - med['empty']:.2f} (4x) ms")
    print(f"cost model, this model: decode FLOPs per token {flops['none'] / flops['4x']:.2f}x lower with 4x; "
          f"a near-empty step already has {100 * flops['empty'] / flops['none']:.0f}% of the none step's FLOPs "
          f"(the weights' FLOPs are the same for every cache length)")
    print(f"cost model, real size (SigLIP-so400m + Qwen2-7B): FLOPs {real_costs[0].flops / real_costs[1].flops:.2f}x, "
          f"A100 roofline (weights + KV bytes) {A100_80GB.seconds(real_costs[0]) / A100_80GB.seconds(real_costs[1]):.2f}x lower")
    common.write_json(args.json, {"benchmark": "decode", "source": source, "frames": args.frames,
                                  "tokens_per_round": args.tokens, "rounds": s.repeats,
                                  "kv_cache_tokens": ctx, "decode_ms_per_token": {k: round(v, 3) for k, v in med.items()},
                                  "ratios": {"decode_ratio_4x": round(ratio, 3),
                                             "predicted_flops_ratio": round(flops["none"] / flops["4x"], 3)}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
