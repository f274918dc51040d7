"""`storm-vlm chat MODEL_DIR VIDEO -q QUESTION`: ask a STORM model about a video."""

from __future__ import annotations

import argparse

from storm_vlm.commands import add_precision_argument
from storm_vlm.errors import StormError
from storm_vlm.utils import check_model_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL_DIR", help="a STORM model folder (from `storm-vlm build` or training)")
    parser.add_argument("video", metavar="VIDEO", help="video file (or a still image)")
    parser.add_argument("-q", "--question", required=True, help="the question to ask")
    parser.add_argument("--frames", type=int, default=32, metavar="N", help="frames sampled uniformly (default: 32)")
    parser.add_argument("--temporal-sample", type=int, default=None, metavar="S",
                        help="test-time temporal sampling: keep every S-th frame's tokens (default: the model's)")
    parser.add_argument("--max-new-tokens", type=int, default=128, metavar="M", help="answer length limit (default: 128)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    add_precision_argument(parser)


def run(args: argparse.Namespace) -> int:
    if args.frames < 1:
        raise StormError(f"--frames must be >= 1, got {args.frames}")
    from storm_vlm.serve.engine import StormEngine
    from storm_vlm.video import load_video

    check_model_dir(args.model)
    load_video(args.video, num_frames=1)  # a bad video fails before the model loads
    engine = StormEngine(args.model, device=args.device, precision=args.precision, default_frames=args.frames,
                         max_frames=args.frames, verbose=True)
    result = engine.answer(args.video, args.question, num_frames=args.frames,
                           temporal_sample_stride=args.temporal_sample, max_new_tokens=args.max_new_tokens)
    print(result["answer"])
    return 0
