"""Peak memory of a 512-frame inference with 4x compression (temporal pool 4).

    python benchmarks/memory.py                     # bench-cpu model (configs/bench-cpu.yaml)
    python benchmarks/memory.py runs/my-model --compression 1

One inference = vision tower on all frames (in chunks of vision_batch_size) + projector +
compression + LLM prefill + `--tokens` decoded tokens. On CPU the figure is the process's
resident-set high-water mark during that row (weights and the Python runtime included; the
baseline before the row is printed too); on CUDA it is max_memory_allocated. The cost model's
estimate for the same model and for the real size are printed beside it.
"""

from __future__ import annotations

import _profile_common as common

from storm_vlm.commands import non_negative_int, positive_int
from storm_vlm.perf.costmodel import DEFAULT_COMPRESSIONS, param_counts, pipeline_cost, real_config
from storm_vlm.perf.profiler import profile_row


def main(argv=None) -> int:
    p = common.parser(__doc__.splitlines()[0], repeats=1, warmup=0)
    p.add_argument("--frames", type=positive_int, default=512)
    p.add_argument("--compression", type=positive_int, default=4, choices=[1, 4, 8])
    p.add_argument("--tokens", type=non_negative_int, default=4, help="tokens decoded (default: 4)")
    args = p.parse_args(argv)
    model, source, defaults = common.load(args)
    comp = DEFAULT_COMPRESSIONS[args.compression]
    s = common.settings(args, defaults, [args.frames], [comp], decode_tokens=args.tokens)
    model = common.prepare_model(model, s)
    host = common.header("memory", source, s)
    row = profile_row(model, args.frames, comp, s)
    if row.get("skipped"):
        print(row["note"])
        return 1
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20

    def estimate(cfg, bytes_per_el):
        c = pipeline_cost(cfg, args.frames, comp, s.text_tokens, args.tokens, bytes_per_el)
        act = max(c.vision_tower.activation_bytes, c.projector.activation_bytes,
                  c.llm_prefill.activation_bytes + c.decode_per_token.activation_bytes)
        return c, act / 2**20, param_counts(cfg)["total"] * bytes_per_el / 2**20

    c, act_mb, w_mb = estimate(model.config, s.resolved.weights.itemsize)
    real_c, real_act, real_w = estimate(real_config(), 2)
    print()
    print(f"peak memory, {args.frames} frames, {args.compression}x ({row['visual_tokens']} visual tokens): "
          f"{row['peak_memory_mb']:.0f} MB ({row.get('memory_baseline_mb', 0):.0f} MB resident before the row; "
          f"weights {weights_mb:.0f} MB)")
    print(f"  latency of that inference: vision {row['vision_tower_ms']:.0f} ms, projector {row['projector_ms']:.0f} ms, "
          f"LLM prefill {row['llm_prefill_ms']:.0f} ms, decode {row['decode_ms_per_token']:.1f} ms/token")
    print(f"cost model, this model: weights {w_mb:.0f} MB + largest activation set {act_mb:.0f} MB")
    print(f"cost model, real size in bf16: weights {real_w / 1024:.1f} GB + largest activation set "
          f"{real_act / 1024:.1f} GB (KV cache {real_c.decode_per_token.activation_bytes / 2**30:.2f} GB)")
    common.footer()
    common.write_json(args.json, {"benchmark": "memory", "source": source, "frames": args.frames,
                                  "compression": args.compression, "row": row,
                                  "estimate_mb": {"weights": round(w_mb, 1), "activations": round(act_mb, 1)},
                                  "real_size_estimate_gb": {"weights": round(real_w / 1024, 2),
                                                            "activations": round(real_act / 1024, 2)}}, host)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
