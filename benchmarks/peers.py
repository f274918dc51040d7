"""STORM against transformers' LLaVA-OneVision and LLaVA-NeXT-Video built at the same widths: prefill
per module and decode, 4 -> 256 frames, in one process; a table, a PNG and a JSON.

    python benchmarks/peers.py                               # bench-cpu widths, 4..256 frames
    python benchmarks/peers.py --frames 32,128 --repeats 3
    python benchmarks/peers.py --tiny --frames 2,4           # the tests' tiny widths (seconds)

Models (random weights, one seed; widths and depths from configs/bench-cpu.yaml, or the tests'
tiny config with `--tiny`):

* `storm`, `storm pool4`, `storm pool4+sample2`: StormForConditionalGeneration without compression,
  with temporal pooling 4 (a second model: pooling is trained), and the latter with test-time
  temporal sampling 2;
* `llava-onevision`: LlavaOnevisionForConditionalGeneration — the same SigLIP tower cut after the
  same number of layers STORM uses (`vision_feature_layer=-1` on a tower one layer shorter), its
  2-layer MLP projector on every patch, bilinear 2x2 pooling, one newline token per video;
* `llava-next-video`: LlavaNextVideoForConditionalGeneration — the same tower, 2x2 average
  pooling, then its 2-layer MLP projector.

All share the LLM (Qwen2 at the bench widths) and get the same CPU kernels
(`storm_vlm.model.fast_paths.enable_fast_paths`: matmul backend per shape, SigLIP layers, the LLM's
attention; STORM's own tower loop hands its SigLIP layers to the kernel as one stack,
`fast_paths.siglip_stack`, where transformers' encoders call the same layers one by one, so the
vision column also shows what that loop gains) and the same set-up for `--precision`
(`storm_vlm.inference.prepare_for_inference`, as the loaders do: weights on huge pages; under bf16
autocast the LLM's linear layers in bf16; default float32), and run under that precision's autocast. Each (frames, model) runs the model's own video
path on random pixels:
vision tower (until the first projector / pooling module starts), projector + pooling (until
the visual tokens are returned), LLM prefill on [text | visual tokens | text] with
`logits_to_keep=1`, then `--decode-tokens` greedy steps through the model's forward. STORM's
decode steps take its CPU decode step (`DecodeStep`); the LLaVA models' their own forward, so the
decode column also gives STORM's step with the decode step off ("storm (forward)"). Within a
frame count the models alternate round by round (`--repeats` rounds, at least `--guard-repeats` at the
guards' frame count; medians kept), each round starting one model further on, so no model always
follows the same one.

Guards (exit status 1 when one fails, unless --no-guards), on time to first token at 128 frames
(or the largest frame count given below it), each the median over rounds of the ratio of two models'
times within one round: STORM without compression costs at most 5 % more than
LLaVA-OneVision; STORM with temporal pooling 4 is at least 2.5x faster than LLaVA-OneVision.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import _profile_common as common
import torch
from transformers import (
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
)

from storm_vlm.commands import int_list, non_negative_int, positive_int
from storm_vlm.inference import prepare_for_inference
from storm_vlm.model.configuration import StormConfig
from storm_vlm.model.fast_paths import enable_fast_paths
from storm_vlm.perf.costmodel import pipeline_cost
from storm_vlm.perf.profiler import Clock, build_random_model, load_model_config
from storm_vlm.perf.report import save_figure
from storm_vlm.precision import Precision, resolve_precision
from storm_vlm.utils import atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

MODELS = ("storm", "storm pool4", "storm pool4+sample2", "llava-onevision", "llava-next-video")
FIELDS = ("vision_ms", "projector_ms", "llm_prefill_ms", "ttft_ms", "decode_ms_per_token")
GUARD_COST = 1.05
GUARD_SPEEDUP = 2.5


def storm_config(tiny: bool, config_path: str | None) -> tuple[dict, int]:
    """(StormConfig fields, text tokens) of the bench model (or the tests' tiny one)."""
    if tiny:
        from helpers import TINY_CONFIG

        return dict(TINY_CONFIG), 4
    config, defaults = load_model_config(config_path or common.DEFAULT_CONFIG)
    fields = config.to_dict()
    for key in ("model_type", "transformers_version", "architectures", "dtype", "torch_dtype"):
        fields.pop(key, None)
    return fields, defaults.get("text_tokens", 64)


def build_models(fields: dict, seed: int = 0, precision: Precision | None = None) -> dict:
    """The five models of MODELS (two STORM instances; sampling is a call argument), set up for
    `precision` (default float32) as the loaders set a model up."""
    storm = build_random_model(StormConfig(**{**fields, "temporal_pool_size": 1}), seed)
    pooled = build_random_model(StormConfig(**{**fields, "temporal_pool_size": 4}), seed)
    vision = StormConfig(**fields).vision_config.to_dict()
    text = StormConfig(**fields).text_config.to_dict()
    layer = fields.get("vision_feature_layer", -2)
    # hidden_states[-1] of a tower with the layers STORM runs = STORM's hidden_states[layer]
    vision["num_hidden_layers"] = layer if layer >= 0 else vision["num_hidden_layers"] + 1 + layer
    ids = dict(video_token_id=fields["video_token_id"], image_token_id=fields["image_token_id"])
    torch.manual_seed(seed)
    onevision = LlavaOnevisionForConditionalGeneration(LlavaOnevisionConfig(
        vision_config=vision, text_config=text, vision_feature_layer=-1, vision_feature_select_strategy="full",
        **ids)).eval()
    torch.manual_seed(seed)
    nextvideo = LlavaNextVideoForConditionalGeneration(LlavaNextVideoConfig(
        vision_config=vision, text_config=text, vision_feature_layer=-1, vision_feature_select_strategy="full",
        spatial_pool_stride=2, spatial_pool_mode="average", **ids)).eval()
    for model in (onevision, nextvideo):
        enable_fast_paths(model)  # the same CPU kernels as STORM's
    models = {"storm": storm, "storm pool4": pooled, "llava-onevision": onevision, "llava-next-video": nextvideo}
    precision = precision or resolve_precision("float32")
    return {name: prepare_for_inference(model, "cpu", precision) for name, model in models.items()}


def _video_path(models: dict, name: str):
    """(model, features(pixels) -> (1, tokens, D), the module that starts after the vision tower)."""
    if name.startswith("storm"):
        model = models["storm pool4" if "pool4" in name else "storm"]
        stride = 2 if "sample2" in name else 1

        def features(px):
            feats, _ = model.get_video_features(px, temporal_sample_stride=stride)
            return feats.reshape(1, -1, feats.shape[-1])

        return model, features, model.projector
    model = models[name]
    inner = model.model
    after = inner.multi_modal_projector if name == "llava-onevision" else inner.vision_resampler

    def features(px):
        out = model.get_video_features(px, vision_feature_layer=-1, vision_feature_select_strategy="full")
        return out.pooler_output

    return model, features, after


def measure(models: dict, name: str, pixels, text, decode_tokens: int, clock: Clock, decode: bool = True,
            precision: Precision | None = None) -> dict:
    """One run of `name` on one video (under `precision`'s autocast, if any): module times (ms), visual
    tokens, decode ms per token."""
    model, features, after = _video_path(models, name)
    marks = {}

    def vision_done(module, args):  # the first module after the vision tower starts
        if "vision_end" not in marks:
            marks["vision_end"] = clock.mark()

    handle = after.register_forward_pre_hook(vision_done)
    if name.startswith("storm"):
        enable_fast_paths(model, decode=decode)
    try:
        with torch.inference_mode(), (precision or resolve_precision("float32")).context():
            clock.sync()
            t0 = clock.mark()
            feats = features(pixels)
            t1 = clock.mark()
            emb = model.get_input_embeddings()(text)
            half = text.shape[1] // 2
            inputs = torch.cat([emb[:, :half], feats.to(emb.dtype), emb[:, half:]], dim=1)
            t2 = clock.mark()
            out = model(inputs_embeds=inputs, use_cache=True, logits_to_keep=1)
            t3 = clock.mark()
            cache, token = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
            steps = []
            for _ in range(decode_tokens):
                s0 = clock.mark()
                out = model(input_ids=token, cache=cache, use_cache=True)
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                steps.append(clock.ms(s0, clock.mark()))
    finally:
        handle.remove()
        if name.startswith("storm"):
            enable_fast_paths(model)
    vision = clock.ms(t0, marks["vision_end"])
    projector = clock.ms(marks["vision_end"], t1)
    prefill = clock.ms(t2, t3)
    return {"vision_ms": vision, "projector_ms": projector, "llm_prefill_ms": prefill,
            "ttft_ms": vision + projector + prefill, "visual_tokens": feats.shape[1],
            "decode_ms_per_token": statistics.median(steps) if steps else 0.0}


def tower_allowance(rows: list[dict], frames: int) -> float:
    """The vision-tower time (ms) under which the pool-4 guard holds, the projector and both LLM
    prefills as timed (median rows at `frames`): both models run the same tower layers on the same
    kernels, so a tower time t gives (t + OneVision's rest) / (t + STORM pool 4's rest), which
    falls towards 1 as t grows. Negative where no tower speed is enough."""
    by = {r["model"]: r for r in rows if r["frames"] == frames}
    rest = {name: by[name]["projector_ms"] + by[name]["llm_prefill_ms"] for name in ("llava-onevision", "storm pool4")}
    return (rest["llava-onevision"] - GUARD_SPEEDUP * rest["storm pool4"]) / (GUARD_SPEEDUP - 1)


def _guard_frames(frames: list[int]) -> int:
    below = [f for f in frames if f <= 128]
    return max(below) if below else min(frames)


def plot(result: dict, path: Path) -> Path:
    from storm_vlm.perf.report import _pyplot

    plt = _pyplot()
    rows = result["rows"]
    fig, (ax, bx, cx) = plt.subplots(1, 3, figsize=(17, 4.8))
    for name in result["models"]:
        rs = sorted((r for r in rows if r["model"] == name), key=lambda r: r["frames"])
        if name in MODELS:
            ax.plot([r["frames"] for r in rs], [r["ttft_ms"] for r in rs], marker="o", label=name)
        cx.plot([r["frames"] for r in rs], [r["decode_ms_per_token"] for r in rs], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("frames")
    ax.set_ylabel("time to first token (ms)")
    ax.set_title("prefill: vision + projector + LLM")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    frames = result["guard_frames"]
    sel = [next(r for r in rows if r["model"] == n and r["frames"] == frames) for n in MODELS]
    bottom = [0.0] * len(sel)
    for key, label in (("vision_ms", "vision tower"), ("projector_ms", "projector + pooling"),
                       ("llm_prefill_ms", "LLM prefill")):
        vals = [r[key] for r in sel]
        bx.bar(range(len(sel)), vals, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, vals)]
    bx.set_xticks(range(len(sel)), [n.replace(" ", "\n") for n in MODELS], fontsize=7)
    bx.set_ylabel("ms")
    bx.set_title(f"modules at {frames} frames")
    bx.legend(fontsize=8)
    cx.set_xscale("log", base=2)
    cx.set_xlabel("frames")
    cx.set_ylabel("ms per generated token")
    cx.set_title("decode step")
    cx.grid(True, which="both", alpha=0.3)
    cx.legend(fontsize=8)
    fig.suptitle(f"STORM vs LLaVA-OneVision vs LLaVA-NeXT-Video ({result['widths']}, CPU, 1 video)")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


def format_rows(result: dict) -> str:
    head = (f"{'frames':>6} {'model':>20} {'tokens':>6} | {'vision':>8} {'projector':>9} {'LLM pre':>8} "
            f"{'TTFT':>8} | {'decode/tok':>10} | {'vs OneVision':>12}")
    lines = [head, "-" * len(head)]
    by = {(r["frames"], r["model"]): r for r in result["rows"]}
    for r in result["rows"]:
        ov = by[(r["frames"], "llava-onevision")]["ttft_ms"]
        lines.append(f"{r['frames']:>6} {r['model']:>20} {r['visual_tokens']:>6} | {r['vision_ms']:8.1f} "
                     f"{r['projector_ms']:9.1f} {r['llm_prefill_ms']:8.1f} {r['ttft_ms']:8.1f} | "
                     f"{r['decode_ms_per_token']:10.2f} | {ov / r['ttft_ms']:11.2f}x")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int_list, default=[4, 8, 16, 32, 64, 128, 256])
    p.add_argument("--repeats", type=positive_int, default=2, help="timed rounds per frame count (default 2)")
    p.add_argument("--guard-repeats", type=positive_int, default=5,
                   help="timed rounds at the guards' frame count, at least (default 5: the guards sit within a "
                        "few percent of 1 and 2.5, closer than one round's noise on a shared machine)")
    p.add_argument("--decode-tokens", type=non_negative_int, default=8)
    p.add_argument("--tiny", action="store_true", help="the tests' tiny widths instead of bench-cpu")
    p.add_argument("--config", default=None, help="a profile YAML (default configs/bench-cpu.yaml)")
    p.add_argument("--threads", type=positive_int, default=1)
    p.add_argument("--clock", choices=["wall", "cpu"], default="cpu")
    p.add_argument("--precision", "--dtype", dest="precision", type=common.precision_name, default="float32",
                   help=f"{common.PRECISION_HELP} (default: float32)")
    p.add_argument("--output", default="runs/peers", help="folder for peers.json, peers.txt, peers.png")
    p.add_argument("--no-guards", action="store_true", help="report the guards but always exit 0")
    args = p.parse_args(argv)
    frames = args.frames
    with common.one_line_errors():
        fields, text_tokens = storm_config(args.tiny, args.config)
    torch.set_num_threads(args.threads)
    common.tune_cpu_allocator()
    precision = resolve_precision(args.precision, "cpu")
    models = build_models(fields, precision=precision)
    widths = "tiny widths" if args.tiny else "bench-cpu widths"
    print("== peers ==")
    print(f"models: {', '.join(MODELS)} at {widths}; text tokens {text_tokens}; decode {args.decode_tokens} tokens; "
          f"clock {'CPU time of this process' if args.clock == 'cpu' else 'wall'}; {precision.describe()}")
    host = common.describe_host()
    print(common.host_summary(host))
    clock = Clock("cpu", args.clock)
    vc = models["storm"].config.vision_config
    gen = torch.Generator().manual_seed(0)
    text = torch.randint(0, fields["video_token_id"] - 2, (1, text_tokens), generator=gen)
    runs = [(name, True) for name in MODELS] + [("storm", False)]
    rows, per_round, gf = [], {}, _guard_frames(frames)
    for i, f in enumerate(frames):
        pixels = torch.randn(1, f, vc.num_channels, vc.image_size, vc.image_size, generator=gen)
        samples = {run: [] for run in runs}
        repeats = max(args.repeats, args.guard_repeats) if f == gf else args.repeats
        for rnd in range((1 if i == 0 else 0) + repeats):
            for name, decode in runs[rnd % len(runs):] + runs[:rnd % len(runs)]:  # each model starts a round in turn
                r = measure(models, name, pixels, text, args.decode_tokens, clock, decode, precision)
                if rnd >= (1 if i == 0 else 0):
                    samples[(name, decode)].append(r)
        for (name, decode), rs in samples.items():
            row = {"frames": f, "model": name if decode else "storm (forward)", "visual_tokens": rs[0]["visual_tokens"]}
            row.update({k: round(statistics.median(x[k] for x in rs), 3) for k in FIELDS})
            if not decode:  # only its decode differs from "storm"; kept for the decode comparison
                row = {**next(r for r in rows[::-1] if r["frames"] == f and r["model"] == "storm"),
                       "model": "storm (forward)", "decode_ms_per_token": row["decode_ms_per_token"]}
            rows.append(row)
        per_round[f] = {name: [r["ttft_ms"] for r in rs] for (name, decode), rs in samples.items() if decode}
        print(f"  {f:>4} frames: " + ", ".join(f"{r['model']} {r['ttft_ms']:.0f} ms" for r in rows if r["frames"] == f),
              flush=True)
    ttft = per_round[gf]  # each guard: the median over rounds of the ratio within a round (load drift cancels)
    cost = statistics.median(a / b for a, b in zip(ttft["storm"], ttft["llava-onevision"]))
    speedup = statistics.median(a / b for a, b in zip(ttft["llava-onevision"], ttft["storm pool4"]))
    guards = {"storm_none_vs_onevision": {"ratio": round(cost, 3), "limit": GUARD_COST, "ok": cost <= GUARD_COST},
              "onevision_vs_storm_pool4": {"ratio": round(speedup, 3), "limit": GUARD_SPEEDUP,
                                           "ok": speedup >= GUARD_SPEEDUP}}
    result = {"benchmark": "peers", "widths": widths, "models": list(MODELS) + ["storm (forward)"], "frames": frames,
              "text_tokens": text_tokens, "decode_tokens": args.decode_tokens, "clock": args.clock,
              "precision": precision.describe(),
              "guard_frames": gf, "guards": guards, "guard_rounds_ttft_ms": ttft, "host": host, "rows": rows}
    out = Path(args.output)
    table = format_rows(result)
    print()
    print(table)
    print()
    print(f"guard at {gf} frames (time to first token): STORM without compression / LLaVA-OneVision = {cost:.3f} "
          f"(<= {GUARD_COST}: {'OK' if cost <= GUARD_COST else 'FAILED'}); LLaVA-OneVision / STORM pool 4 = "
          f"{speedup:.2f}x (>= {GUARD_SPEEDUP}x: {'OK' if speedup >= GUARD_SPEEDUP else 'FAILED'})")
    allowed = tower_allowance(rows, gf)
    guards["onevision_vs_storm_pool4"]["vision_ms_allowed"] = round(allowed, 3)
    tower = {n: next(r["vision_ms"] for r in rows if r["frames"] == gf and r["model"] == n)
             for n in ("storm pool4", "llava-onevision")}
    if allowed > 0:
        flops = pipeline_cost(StormConfig(**fields), gf, text_tokens=text_tokens).vision_tower.flops
        print(f"  the pool-4 guard holds with both vision towers at most {allowed:.0f} ms ({flops / allowed / 1e6:.1f} "
              f"GFLOP/s), the projector and LLMs as timed; they took {tower['storm pool4']:.0f} / "
              f"{tower['llava-onevision']:.0f} ms ({flops / tower['storm pool4'] / 1e6:.1f} GFLOP/s, STORM's)")
    else:
        print("  the pool-4 guard is out of reach however fast the vision towers run, the projector and LLMs as timed")
    result["load_average_end"] = common.load_average()
    atomic_write_json(out / "peers.json", result, indent=2)
    atomic_write_text(out / "peers.txt", table + "\n")
    print(f"wrote {out / 'peers.json'}, {out / 'peers.txt'}, {plot(result, out / 'peers.png')}")
    common.footer()
    ok = all(g["ok"] for g in guards.values())
    return 0 if ok or args.no_guards else 1


if __name__ == "__main__":
    raise SystemExit(main())
