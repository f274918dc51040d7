"""generate with several beams or returned sequences: the LLM prefill once per prompt (this model's
`_prefill`) against once per copy (transformers' own `GenerationMixin._prefill`), and against one
beam, in one run.

    python benchmarks/beams.py                      # bench-cpu model, 32 frames, 1 / 2 / 4 beams
    python benchmarks/beams.py --frames 128 --beams 1,4,8

transformers' generate repeats each prompt's row once per beam (or per returned sequence) before
the prefill, so by itself it prefills every copy. Both runs below encode the video once (the
visual tokens go to generate pre-encoded, `mm_encoder_outputs`); they differ only in the prefill.
Rounds alternate the two, `--warmup` untimed, then `--repeats` timed; medians are printed with
each time's multiple of one beam's, and whether the two give the same sequences (greedy beam
search: they should, token for token).
"""

from __future__ import annotations

import statistics

import torch
from transformers import GenerationMixin

import _profile_common as common

from storm_vlm.commands import int_list, positive_int
from storm_vlm.perf.costmodel import DEFAULT_COMPRESSIONS
from storm_vlm.perf.profiler import Clock


def main(argv=None) -> int:
    p = common.parser(__doc__.splitlines()[0], repeats=3, warmup=1)
    p.add_argument("--frames", type=positive_int, default=32, help="frames of the video (default: 32)")
    p.add_argument("--beams", type=int_list, default=[1, 2, 4], help="numbers of beams (default: 1,2,4)")
    p.add_argument("--tokens", type=positive_int, default=2, help="new tokens per answer (default: 2)")
    args = p.parse_args(argv)
    model, source, defaults = common.load(args)
    s = common.settings(args, defaults, [args.frames], [DEFAULT_COMPRESSIONS[1]], decode_tokens=args.tokens)
    model = common.prepare_model(model, s).eval()
    host = common.header("beams", source, s)
    clock = Clock(s.device, s.clock)

    cfg, gen = model.config, torch.Generator().manual_seed(s.seed)
    vc = cfg.vision_config
    pixels = torch.randn(1, args.frames, vc.num_channels, vc.image_size, vc.image_size, generator=gen).to(s.device)
    text = torch.randint(0, cfg.video_token_id, (1, s.text_tokens), generator=gen)
    half = s.text_tokens // 2
    ids = torch.cat([text[:, :half], torch.full((1, cfg.num_visual_tokens(args.frames)), cfg.video_token_id),
                     text[:, half:]], dim=1).to(s.device)
    prefills = {"once": type(model)._prefill, "every copy": GenerationMixin._prefill}

    def run(beams: int, prefill) -> tuple[float, list]:
        type(model)._prefill = prefill
        try:
            clock.sync()
            t0 = clock.mark()
            with torch.inference_mode(), s.resolved.context():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values_videos=pixels,
                                     num_beams=beams, do_sample=False, max_new_tokens=args.tokens,
                                     min_new_tokens=args.tokens, repetition_penalty=1.0)
            clock.sync()
            return clock.ms(t0, clock.mark()), out[:, ids.shape[1]:].tolist()
        finally:
            type(model)._prefill = prefills["once"]

    times = {(b, name): [] for b in args.beams for name in prefills}
    tokens = {}
    for rnd in range(s.warmup + s.repeats):
        for beams in args.beams:
            for name, prefill in prefills.items():
                ms, toks = run(beams, prefill)
                tokens.setdefault((beams, name), toks)
                if rnd >= s.warmup:
                    times[(beams, name)].append(ms)
        print(f"  round {rnd + 1}{' (warm-up)' if rnd < s.warmup else ''} done", flush=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    one = med[(min(args.beams), "once")]
    print(f"\n{args.frames} frames, {cfg.num_visual_tokens(args.frames)} visual tokens, {args.tokens} new tokens; "
          f"x: the time over {min(args.beams)} beam(s)")
    print("| beams | prefill once: ms | x | prefill every copy: ms | x | every copy / once | same sequences |")
    print("|---:|---:|---:|---:|---:|---:|---|")
    for beams in args.beams:
        a, b = med[(beams, "once")], med[(beams, "every copy")]
        same = tokens[(beams, "once")] == tokens[(beams, "every copy")]
        print(f"| {beams} | {a:.0f} | {a / one:.2f} | {b:.0f} | {b / one:.2f} | {b / a:.2f}x | {'yes' if same else 'NO'} |")
    common.footer()
    common.write_json(args.json, {"frames": args.frames, "tokens": args.tokens,
                                  "ms": {f"{b} {name}": v for (b, name), v in med.items()}}, host)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
