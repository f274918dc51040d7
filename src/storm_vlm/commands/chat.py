"""`storm-vlm chat MODEL_DIR VIDEO -q QUESTION`: ask a STORM model about a video."""

from __future__ import annotations

import argparse
from pathlib import Path

from storm_vlm.errors import StormError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL_DIR", help="a STORM model folder (from `storm-vlm build` or training)")
    parser.add_argument("video", metavar="VIDEO", help="video file (or a still image)")
    parser.add_argument("-q", "--question", required=True, help="the question to ask")
    parser.add_argument("--frames", type=int, default=32, metavar="N", help="frames sampled uniformly (default: 32)")
    parser.add_argument("--temporal-sample", type=int, default=None, metavar="S",
                        help="test-time temporal sampling: keep every S-th frame's tokens (default: the model's)")
    parser.add_argument("--max-new-tokens", type=int, default=128, metavar="M", help="answer length limit (default: 128)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="auto: bfloat16 on CUDA, float32 weights with bfloat16 autocast on CPU")


def answer(model, processor, video, question: str, temporal_sample_stride=None, max_new_tokens: int = 128,
           autocast_dtype=None) -> str:
    """Generate a greedy answer about `video` (frames or a load_video clip)."""
    import torch

    conversation = [{"role": "user", "content": [{"type": "video", "video": video}, {"type": "text", "text": question}]}]
    inputs = processor.apply_chat_template(
        conversation,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        temporal_sample_stride=temporal_sample_stride,
    )
    device = next(model.parameters()).device
    inputs = inputs.to(device)
    with torch.inference_mode(), torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                                enabled=autocast_dtype is not None):
        out = model.generate(**inputs, temporal_sample_stride=temporal_sample_stride,
                             max_new_tokens=max_new_tokens, do_sample=False)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def run(args: argparse.Namespace) -> int:
    if args.frames < 1:
        raise StormError(f"--frames must be >= 1, got {args.frames}")
    if args.temporal_sample is not None and args.temporal_sample < 1:
        raise StormError(f"--temporal-sample must be >= 1, got {args.temporal_sample}")
    if args.max_new_tokens < 1:
        raise StormError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise StormError(f"model folder {model_dir} has no config.json (expected a STORM model folder)")

    from storm_vlm.video import load_video

    clip = load_video(args.video, num_frames=args.frames)  # fails fast, before the model loads

    import torch

    import storm_vlm  # noqa: F401  (registers the Auto classes)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.dtype == "auto":
        weight_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        autocast = torch.bfloat16 if device.type == "cpu" else None
    else:
        weight_dtype, autocast = getattr(torch, args.dtype), None
    try:
        model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=weight_dtype)
        processor = AutoProcessor.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise StormError(f"cannot load a STORM model from {model_dir}: {exc}") from exc
    model.to(device).eval()
    print(answer(model, processor, clip, args.question, args.temporal_sample, args.max_new_tokens, autocast))
    return 0
