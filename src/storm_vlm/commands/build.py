"""`storm-vlm build --vision DIR --llm DIR --out DIR`: assemble STORM from local pretrained parts."""

from __future__ import annotations

import argparse

from storm_vlm.commands import check_output_folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vision", required=True, metavar="DIR", help="SigLIP folder (e.g. siglip-so400m-patch14-448)")
    parser.add_argument("--llm", required=True, metavar="DIR",
                        help="causal-LM folder with its tokenizer, in ChatML or Llama-3 chat format "
                             "(e.g. Qwen2-7B-Instruct, Qwen2.5-*, Llama-3.x)")
    parser.add_argument("--out", required=True, metavar="DIR", help="where to write the model and processor")
    parser.add_argument("--projector", choices=["mamba", "mlp"], default="mamba",
                        help="mamba: STORM temporal projector; mlp: VILA baseline (default: mamba)")
    parser.add_argument("--layers", type=int, default=2, metavar="N", help="Mamba projector layers (default: 2)")
    parser.add_argument("--causal", action="store_true",
                        help="a unidirectional (causal) Mamba projector: what live video streaming needs "
                             "(default: bidirectional)")
    parser.add_argument("--temporal-pool", type=int, default=1, metavar="K",
                        help="average groups of K frames after the projector (default: 1)")
    parser.add_argument("--spatial-pool", type=int, default=1, metavar="P",
                        help="average PxP token windows per frame after the projector (default: 1)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                        help="weight dtype (auto: as the LLM is stored)")
    parser.add_argument("--vision-batch-size", type=int, default=32, metavar="F",
                        help="frames per vision-tower call (default: 32)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")


def run(args: argparse.Namespace) -> int:
    from storm_vlm.builder import build_storm, check_out_dir, save_storm

    check_output_folder(args.out, "--out", parent_only=True)  # fail before loading any weights
    check_out_dir(args.out, args.overwrite, sources=(args.vision, args.llm))
    model, processor = build_storm(
        args.vision,
        args.llm,
        projector_type=args.projector,
        projector_num_layers=args.layers,
        projector_bidirectional=not args.causal,
        temporal_pool_size=args.temporal_pool,
        spatial_pool_stride=args.spatial_pool,
        dtype=args.dtype,
        vision_batch_size=args.vision_batch_size,
    )
    out = save_storm(model, processor, args.out, overwrite=args.overwrite)
    counts = {
        name: sum(p.numel() for p in part.parameters())
        for name, part in (("vision_tower", model.vision_tower), ("projector", model.projector),
                           ("language_model", model.language_model))
    }
    cfg = model.config
    print(f"built STORM ({cfg.projector_type} projector) in {out}")
    for name, n in counts.items():
        print(f"  {name:15s} {n / 1e6:10.2f} M parameters")
    print(f"  visual tokens per frame: {cfg.tokens_per_frame}; 32 frames -> {cfg.num_visual_tokens(32)} tokens")
    return 0
