"""Decode latency per generated token against the byte bound, with and without the decode step of
storm_vlm.model.fast_paths, at several cache lengths, in one run.

    python benchmarks/decode.py                     # bench-cpu model (configs/bench-cpu.yaml)
    python benchmarks/decode.py runs/my-model --frames 32,256 --compile

Each video (32, 64, 128, 256 frames, no compression; 256 frames with 4x compression; a one-frame
video) is prefilled once and its KV cache kept. Then rounds of `--tokens` greedy steps alternate
between the caches and between the decode paths — "step": `DecodeStep` (the default on CPU; for one
row, one C call per token runs every layer, printed as "step ran as"; pinned to the C step with
STORM_VLM_DECODE_KERNEL=1 unless set, where with several threads it would time itself against the
tensor step first), "tensor step": the same step
as tensor operations (`enable_fast_paths(model, decode_kernel=False)`, what it was before the C step),
"forward": the model's own forward (`enable_fast_paths(model, decode=False)`, what every step ran
before the decode step existed) — each round's cache cropped back; `--warmup` untimed rounds, then
`--repeats` timed; the median step is kept. `--compile` adds "compiled" (`compile_decode=True`)
and prints what its compilation cost.

Beside each: the byte bound — the bytes a step must read (every LLM weight but the embedding
table, plus the KV cache: storm_vlm.perf.costmodel.decode_cost) over this host's streaming
bandwidth, timed in the same run (best of a start and an end measurement) — and the step's
multiple of it (target: <= 2x). The greedy tokens of every path are compared (identical in float32; under
`--dtype bfloat16` on CPU the C step computes in float32 while the others' products are bf16, so
they may differ). Also: 4x vs no compression at 256 frames against its FLOP and byte ratios, here and at
the real size; and a table of left-padded batches (`--rows`, a server's or an evaluation's batch: the
step takes every row in one pass over the weights) against their rows decoded one after the other.
"""

from __future__ import annotations

import os
import statistics
import time

import torch

import _profile_common as common

from storm_vlm.commands import int_list, positive_int
from storm_vlm.model.decode import decode_step_path
from storm_vlm.model.fast_paths import enable_fast_paths
from storm_vlm.perf.costmodel import A100_80GB, DEFAULT_COMPRESSIONS, decode_bounds, decode_cost, pipeline_cost, real_config
from storm_vlm.perf.host import measure_cpu_roofline
from storm_vlm.perf.profiler import Clock, decode_steps, prefill_video


def main(argv=None) -> int:
    p = common.parser(__doc__.splitlines()[0], repeats=4, warmup=1)
    p.add_argument("--frames", type=int_list, default=[32, 64, 128, 256],
                   help="frame counts of the uncompressed caches (default: 32,64,128,256)")
    p.add_argument("--tokens", type=positive_int, default=16, help="decode steps per round (default: 16)")
    p.add_argument("--compile", action="store_true", help="also time the torch.compile'd decode step")
    p.add_argument("--rows", type=int_list, default=[4, 8],
                   help="batch sizes of the left-padded batch table (default: 4,8)")
    args = p.parse_args(argv)
    frames = args.frames
    model, source, defaults = common.load(args)
    s = common.settings(args, defaults, frames, [DEFAULT_COMPRESSIONS[1]], decode_tokens=args.tokens)
    model = common.prepare_model(model, s)
    host = common.header("decode", source, s)
    clock = Clock(s.device, s.clock)
    roof = [measure_cpu_roofline()] if s.device == "cpu" else []

    settings = {f"{f}f": (f, DEFAULT_COMPRESSIONS[1]) for f in frames}
    settings[f"{max(frames)}f 4x"] = (max(frames), DEFAULT_COMPRESSIONS[4])
    settings["1f 8x"] = (1, DEFAULT_COMPRESSIONS[8])
    caches = {}
    for name, (f, comp) in settings.items():
        caches[name] = prefill_video(model, f, comp, s)
        print(f"  prefilled {name:>9}: KV cache {caches[name][0].get_seq_length()} tokens", flush=True)

    paths = {"step": dict(decode=True), "tensor step": dict(decode=True, decode_kernel=False),
             "forward": dict(decode=False)}
    compile_s = None
    if args.compile:
        enable_fast_paths(model, compile_decode=True)
        cache, token = caches[next(iter(caches))]
        t = time.perf_counter()
        with s.resolved.context():  # the precision's autocast, as the prefill ran
            decode_steps(model, cache, token, 2, clock)
        compile_s = time.perf_counter() - t
        print(f"  compiled decode step: first two steps took {compile_s:.1f} s (compilation)", flush=True)
        paths["compiled"] = dict(decode=True, compile_decode=True)
    # With several threads a DecodeStep times the C step against the tensor step at its first steps,
    # and every switch below builds a new one: pin the C step so that "step" is the C step throughout
    os.environ.setdefault("STORM_VLM_DECODE_KERNEL", "1")
    times = {(n, path): [] for n in caches for path in paths}
    tokens, step_path = {}, "not taken"
    for rnd in range(s.warmup + s.repeats):
        for name, (cache, token) in caches.items():
            for path, switches in paths.items():
                enable_fast_paths(model, **switches)
                with s.resolved.context():
                    ts, toks = decode_steps(model, cache, token, args.tokens, clock)
                tokens.setdefault((name, path), toks)
                if path == "step":
                    step_path = decode_step_path(model) or step_path
                if rnd >= s.warmup:
                    times[(name, path)].extend(ts)
        print(f"  round {rnd + 1}{' (warm-up)' if rnd < s.warmup else ''} done", flush=True)
    enable_fast_paths(model)
    if s.device == "cpu":
        roof.append(measure_cpu_roofline())
    med = {k: statistics.median(v) for k, v in times.items()}
    cfg = model.config
    el = (s.resolved.llm_linears or s.resolved.weights).itemsize  # of the LLM linear layers a step streams
    bandwidth = max(h.bandwidth for h in roof) if roof else None

    print()
    if bandwidth:
        print(f"streaming bandwidth of this host (best of start / end): {bandwidth / 1e9:.1f} GB/s "
              f"({' / '.join(f'{h.bandwidth / 1e9:.1f}' for h in roof)}); fp32 matmul {max(h.peak_flops for h in roof) / 1e9:.0f} GFLOP/s")
    head = f"{'cache':>10} {'tokens':>7} {'MB/step':>8} {'bound ms':>9} | " + " | ".join(
        f"{path + ' ms':>12} {'x bound':>7}" for path in paths) + " | greedy tokens"
    print(f'"step" ran as: {step_path}; "tensor step": the same step as tensor operations (decode_kernel=False)')
    print(head)
    print("-" * len(head))
    result, met = {}, True
    for name, (cache, _) in caches.items():
        ctx = cache.get_seq_length()
        cost = decode_cost(cfg, ctx, el)
        bound_ms = cost.bytes / bandwidth * 1e3 if bandwidth else float("nan")
        same = all(tokens[(name, path)] == tokens[(name, "forward")] for path in paths)
        cells = []
        for path in paths:
            ms = med[(name, path)]
            cells.append(f"{ms:12.2f} {ms / bound_ms:7.2f}")
            result[f"{name} {path}"] = {"ms": round(ms, 3), "x_bound": round(ms / bound_ms, 3)}
        if name.endswith("f") and " " not in name:
            met = met and med[(name, "step")] / bound_ms <= 2.0
        print(f"{name:>10} {ctx:>7} {cost.bytes / 2**20:8.1f} {bound_ms:9.2f} | " + " | ".join(cells)
              + f" | {'identical' if same else 'DIFFERENT'}")
        result[f"{name} bound_ms"] = round(bound_ms, 3)
        result[f"{name} identical"] = same
    print(f"decode step within 2x of the byte bound at {frames[0]}-{frames[-1]} frames: "
          f"{'MET' if met else 'MISSED'}; speedup of the step over the model's forward: " + ", ".join(
              f"{n} {med[(n, 'forward')] / med[(n, 'step')]:.2f}x" for n in caches)
          + "; over the tensor step: " + ", ".join(f"{n} {med[(n, 'tensor step')] / med[(n, 'step')]:.2f}x"
                                                   for n in caches))

    big = f"{max(frames)}f"
    ctx_a, ctx_b = caches[big][0].get_seq_length(), caches[f"{big} 4x"][0].get_seq_length()
    b = decode_bounds(cfg, ctx_a, ctx_b, el)
    ratio = med[(big, "step")] / med[(f"{big} 4x", "step")]
    real = real_config()
    real_ctx = [pipeline_cost(real, max(frames), DEFAULT_COMPRESSIONS[c]).visual_tokens + 64 for c in (1, 4)]
    rb = decode_bounds(real, *real_ctx, hardware=A100_80GB)
    print(f"4x vs none at {max(frames)} frames: {ratio:.2f}x faster per token; FLOP ratio {b['flops_ratio']:.2f}x, "
          f"byte ratio {b['bytes_ratio']:.2f}x (a step reads every weight whatever the cache); real size (SigLIP-so400m "
          f"+ Qwen2-7B, bf16): FLOP ratio {rb['flops_ratio']:.2f}x, byte ratio {rb['bytes_ratio']:.2f}x")
    batched = batch_table(model, args.rows, caches[f"{frames[0]}f"][0].get_seq_length(), args.tokens, s, clock)
    common.footer()
    common.write_json(args.json, {"benchmark": "decode", "source": source, "settings": s.as_dict(),
                                  "tokens_per_round": args.tokens, "bandwidth_gb_s": bandwidth and bandwidth / 1e9,
                                  "compile_s": compile_s, "kv_cache_tokens": {n: c.get_seq_length() for n, (c, _) in caches.items()},
                                  "steps": result, "batched": batched, "target_met": met}, host)
    return 0


def batch_table(model, rows: list[int], length: int, steps: int, s, clock) -> dict:
    """A batched generation's decode steps (a server's or an evaluation's batch): `rows` prompts of
    random tokens, `length` down to `length` - 13 (rows - 1) long, left-padded, prefilled together; then
    rounds of `steps` greedy steps alternate between the decode step and the model's forward. Printed:
    ms per step and per row, and the batch's speed-up over its rows decoded one after the other (each
    at the one-row step's time on the longest prompt, timed here too)."""
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.get_text_config().vocab_size
    batches = {}
    for b in [1, *rows]:
        lengths = [length - 13 * i for i in range(b)]
        ids = torch.zeros(b, length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, n in enumerate(lengths):
            ids[i, length - n:] = torch.randint(0, vocab, (n,), generator=gen)
            mask[i, length - n:] = 1
        with torch.inference_mode(), s.resolved.context():
            out = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
        batches[b] = (out.cache, out.logits[:, -1:].argmax(-1), mask)
    paths = {"step": dict(decode=True), "forward": dict(decode=False)}
    times = {(b, path): [] for b in batches for path in paths}
    tokens = {}
    for rnd in range(s.warmup + s.repeats):
        for b, (cache, token, mask) in batches.items():
            for path, switches in paths.items():
                enable_fast_paths(model, **switches)
                with s.resolved.context():
                    ts, toks = decode_steps(model, cache, token, steps, clock, attention_mask=mask)
                tokens.setdefault((b, path), toks)
                if rnd >= s.warmup:
                    times[(b, path)].extend(ts)
    enable_fast_paths(model)
    med = {k: statistics.median(v) for k, v in times.items()}
    one = med[(1, "step")]
    print(f"\nleft-padded batches, prompts of {length} tokens down to {length - 13 * (max(rows) - 1)}:")
    head = f"{'rows':>5} | {'step ms':>8} {'ms/row':>7} {'x rows one by one':>18} | {'forward ms':>10} {'ms/row':>7} | greedy tokens"
    print(head)
    print("-" * len(head))
    out = {}
    for b in batches:
        step, fwd = med[(b, "step")], med[(b, "forward")]
        same = tokens[(b, "step")] == tokens[(b, "forward")]
        print(f"{b:>5} | {step:8.2f} {step / b:7.2f} {b * one / step:17.2f}x | {fwd:10.2f} {fwd / b:7.2f} | "
              f"{'identical' if same else 'DIFFERENT'}")
        out[str(b)] = {"step_ms": round(step, 3), "forward_ms": round(fwd, 3), "speedup_over_one_by_one": round(b * one / step, 3),
                       "identical": same}
    return out


if __name__ == "__main__":
    raise SystemExit(main())
