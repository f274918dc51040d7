"""The C attention and LayerNorm (src/storm_vlm/model/ssm/_attention_kernel.c) against PyTorch's, in one run.

    python benchmarks/attention.py                  # bench-cpu and real-size shapes, fp32 and bf16
    python benchmarks/attention.py --quick          # bench-cpu shapes only
    python benchmarks/attention.py --models         # + bench-cpu's vision tower and LLM prefill, kernels on / off

Attention: the vision tower's per-frame case (every key visible: frames x 64 patches x 1 head of 72
at bench-cpu's width, 1024 patches x 16 heads of 72 for SigLIP-so400m) and the LLM's causal
grouped-query prefill (7 query heads of 32 on 1 KV head for bench-cpu, 28 of 128 on 4 for
Qwen2-7B; also a prompt continuing a cache, where SDPA gets the mask transformers builds), each
against `scaled_dot_product_attention` on the same views (PyTorch's CPU flash kernel), in float32
and bfloat16 (what autocast hands over). LayerNorm against `nn.LayerNorm`.
Times are the best of `--repeats` alternating runs of each (CPU time of this process); GFLOP/s
count QK and PV (causal: half). `--models` also times the bench-cpu model's vision tower (128
frames) and LLM prefill (2052 tokens) with the kernels on and off (STORM_VLM_ATTENTION_KERNEL),
alternating, in float32 and under bf16 autocast, with the allocator tuned as every command tunes it
(medians: whole-model runs vary more than the kernels alone).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from storm_vlm.commands import positive_int  # noqa: E402
from storm_vlm.model.cpu_attention import ATTENTION_KERNEL_ENV, c_attention, c_layer_norm  # noqa: E402
from storm_vlm.model.ssm import cpu_kernel  # noqa: E402
from storm_vlm.perf.allocator import tune_cpu_allocator  # noqa: E402
from storm_vlm.perf.host import host_summary, load_line  # noqa: E402
from storm_vlm.perf.profiler import build_random_model, load_model_config  # noqa: E402

BENCH_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "bench-cpu.yaml"

# (label, batch, query heads, kv heads, queries, cached positions before them, head size, causal, bench-cpu size)
ATTENTION = [
    ("vision, 15 frames", 15, 1, 1, 64, 0, 72, False, True),
    ("vision, 32 frames", 32, 1, 1, 64, 0, 72, False, True),
    ("LLM prefill 512", 1, 7, 1, 512, 0, 32, True, True),
    ("LLM prefill 2048", 1, 7, 1, 2048, 0, 32, True, True),
    ("LLM 512 after 2048", 1, 7, 1, 512, 2048, 32, True, True),
    ("SigLIP-so400m frame", 1, 16, 16, 1024, 0, 72, False, False),
    ("Qwen2-7B prefill 2048", 1, 28, 4, 2048, 0, 128, True, False),
]
NORMS = [("vision 2048 x 72", 2048, 72, True), ("SigLIP 1024 x 1152", 1024, 1152, False)]


def best_ms(fns: dict, repeats: int) -> dict:
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.process_time()
            fn()
            best[name] = min(best[name], (time.process_time() - t) * 1e3)
    return best


def models(repeats: int) -> None:
    """The bench-cpu model's vision tower and LLM prefill with the attention kernels on and off."""
    model = build_random_model(load_model_config(BENCH_CONFIG)[0]).eval()
    gen = torch.Generator().manual_seed(1)
    frames = torch.randn(128, 3, 112, 112, generator=gen)
    prompt = torch.randn(1, 2052, model.config.text_config.hidden_size, generator=gen)
    parts = {"vision tower, 128 frames": lambda: model._vision_features(frames),
             "LLM prefill, 2052 tokens": lambda: model(inputs_embeds=prompt, use_cache=True, logits_to_keep=1)}
    saved = os.environ.get(ATTENTION_KERNEL_ENV)
    print(f"\n{'bench-cpu model':<26}{'':>9}{'on ms':>10}{'off ms':>10}{'off / on':>10}   (medians of {repeats})")
    for label, fn in parts.items():
        for autocast in (False, True):
            times = {"on": [], "off": []}
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                for i in range(repeats + 1):
                    for setting in times:
                        os.environ[ATTENTION_KERNEL_ENV] = "1" if setting == "on" else "0"
                        t = time.process_time()
                        fn()
                        if i:  # the first round warms up
                            times[setting].append((time.process_time() - t) * 1e3)
            on, off = statistics.median(times["on"]), statistics.median(times["off"])
            dtype = "bf16 ac" if autocast else "float32"
            print(f"{label:<26}{dtype:>9}{on:10.1f}{off:10.1f}{off / on:9.2f}x")
    if saved is None:
        os.environ.pop(ATTENTION_KERNEL_ENV)
    else:
        os.environ[ATTENTION_KERNEL_ENV] = saved


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=positive_int, default=5)
    p.add_argument("--threads", type=positive_int, default=1)
    p.add_argument("--quick", action="store_true", help="bench-cpu shapes only")
    p.add_argument("--models", action="store_true", help="also the bench-cpu model's tower and LLM prefill, on / off")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    lib = cpu_kernel.load_library()
    print(host_summary())
    if lib is None:
        print("no C kernels on this host (no compiler): nothing to compare")
        return 1
    print(f"kernel path {lib.storm_isa} x{lib.storm_lanes}; best of {args.repeats}, CPU time\n")
    print(f"{'attention':<24}{'dtype':>9}{'C ms':>10}{'SDPA ms':>10}{'SDPA / C':>10}{'C GFLOP/s':>11}")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for label, b, heads, kv, length, cached, hd, causal, bench in ATTENTION:
            if args.quick and not bench:
                continue
            keys = cached + length
            # a prompt after a cache: transformers hands SDPA the causal mask of that offset
            mask = torch.ones(length, keys, dtype=torch.bool).tril(cached) if cached else None
            for dtype in (torch.float32, torch.bfloat16):
                q = torch.randn(b, length, heads, hd, generator=gen).to(dtype).transpose(1, 2)
                k, v = (torch.randn(b, kv, keys, hd, generator=gen).to(dtype) for _ in range(2))
                out = torch.empty(b, length, heads, hd, dtype=dtype).transpose(1, 2)
                ms = best_ms({
                    "c": lambda: c_attention(lib, q, k, v, out, hd ** -0.5, causal),
                    "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                                   is_causal=causal and mask is None,
                                                                   enable_gqa=kv < heads),
                }, args.repeats)
                flops = 4 * b * heads * length * (cached + length / (2 if causal else 1)) * hd
                print(f"{label:<24}{str(dtype)[6:]:>9}{ms['c']:10.3f}{ms['sdpa']:10.3f}{ms['sdpa'] / ms['c']:9.2f}x"
                      f"{flops / ms['c'] / 1e6:11.1f}")
        print(f"\n{'LayerNorm':<24}{'':>9}{'C ms':>10}{'torch ms':>10}{'torch / C':>10}")
        for label, rows, width, bench in NORMS:
            if args.quick and not bench:
                continue
            norm = torch.nn.LayerNorm(width)
            x = torch.randn(rows, width, generator=gen)
            ms = best_ms({"c": lambda: c_layer_norm(lib, x, norm), "torch": lambda: norm(x)}, args.repeats * 4)
            print(f"{label:<24}{'float32':>9}{ms['c']:10.3f}{ms['torch']:10.3f}{ms['torch'] / ms['c']:9.2f}x")
    if args.models:
        tune_cpu_allocator()
        models(args.repeats)
    print(load_line())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
