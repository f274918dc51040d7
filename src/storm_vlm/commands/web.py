"""`storm-vlm web MODEL_DIR`: a gradio web page (upload a video or pick an example, talk about it;
answers stream in). Listens on 127.0.0.1 unless --host says otherwise; never makes a public
share link and sends no analytics. See `storm_vlm.serve.web`.
"""

from __future__ import annotations

import argparse

from storm_vlm.commands.serve import add_engine_arguments, check_engine_arguments, load_engine
from storm_vlm.errors import StormError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"address to listen on (default: {DEFAULT_HOST}, this host only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")


def run(args: argparse.Namespace) -> int:
    check_engine_arguments(args)
    from storm_vlm.serve.network import check_listen, warn_if_public

    check_listen(args.host, args.port)
    try:
        from storm_vlm.serve.web import build_demo, launch_demo
    except ModuleNotFoundError as exc:
        raise StormError(f"storm-vlm web needs gradio ({exc}); install it with: pip install 'storm-vlm[web]'") from None
    demo = build_demo(load_engine(args))
    warn_if_public(args.host, "storm-vlm web")
    launch_demo(demo, args.host, args.port, max_upload_mb=args.max_upload_mb, concurrency=args.max_batch_size,
                max_queue=args.max_queue)
    return 0
