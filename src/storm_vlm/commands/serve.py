"""`storm-vlm serve MODEL_DIR`: an HTTP API (FastAPI + uvicorn) answering questions about videos.

Listens on 127.0.0.1 unless --host says otherwise. Endpoints: GET /health, the OpenAI-compatible
GET /v1/models and POST /v1/chat/completions (streaming too), POST /v1/answer (multipart video
upload); OpenAPI docs at /docs. See `storm_vlm.serve.api`; uvicorn's limits (connections, request
heads, timeouts) are in `storm_vlm.serve.network.uvicorn_config`.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from storm_vlm.commands import add_precision_argument
from storm_vlm.errors import StormError
from storm_vlm.utils import check_int, check_model_dir

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
API_KEY_ENV = "STORM_VLM_API_KEY"


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The model arguments `serve` and `web` share."""
    parser.add_argument("model", metavar="MODEL_DIR", help="a STORM model folder (from `storm-vlm build` or training)")
    parser.add_argument("--frames", type=int, default=32, metavar="N",
                        help="frames sampled uniformly when a request names none (default: 32)")
    parser.add_argument("--max-frames", type=int, default=256, metavar="N",
                        help="the most frames a request may ask for (default: 256)")
    parser.add_argument("--max-upload-mb", type=float, default=200, metavar="MB",
                        help="largest accepted video upload in MB (default: 200)")
    parser.add_argument("--max-new-tokens", type=int, default=1024, metavar="M",
                        help="the longest answer a request may ask for (default: 1024)")
    parser.add_argument("--max-batch-size", type=int, default=8, metavar="B",
                        help="waiting requests answered by one generate call at most (default: 8; 1: one at a time)")
    parser.add_argument("--max-batch-frames", type=int, default=None, metavar="F",
                        help="video frames in one generate call at most (bounds memory; default: --max-batch-size "
                             "requests of --frames frames, at least --max-frames)")
    parser.add_argument("--max-concurrent-decodes", type=int, default=None, metavar="N",
                        help="videos decoded at once at most (bounds memory; default: min(4, CPU cores))")
    parser.add_argument("--decode-timeout", type=float, default=60.0, metavar="SECONDS",
                        help="the longest one video may take to decode (default: 60)")
    parser.add_argument("--max-queue", type=int, default=64, metavar="Q",
                        help="requests waiting at most; beyond, 503 with Retry-After (default: 64)")
    parser.add_argument("--max-queue-frames", type=int, default=None, metavar="F",
                        help="video frames waiting at most (each held decoded in memory); beyond, 503 with Retry-After "
                             "(default: --max-queue x --frames)")
    parser.add_argument("--video-cache-mb", type=float, default=512, metavar="MB",
                        help="memory on the model's device for the visual tokens of recent videos, so a video asked "
                             "about again (the next turn of a conversation) is not encoded again (default: 512; 0: off)")
    parser.add_argument("--prefix-cache-mb", type=float, default=1024, metavar="MB",
                        help="memory on the model's device for the LLM's KV caches of recent requests, so a request "
                             "that starts with an earlier one's conversation and video prefills only what is new "
                             "(default: 1024; 0: off)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    add_precision_argument(parser)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"address to listen on (default: {DEFAULT_HOST}, this host only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    parser.add_argument("--allow-local-paths", action="store_true",
                        help="also accept requests naming a video file on the server (file:// URLs, video_path; "
                             "off by default: any client could then read any video this process can read; "
                             "--allowed-local-media-path confines them to one folder)")
    parser.add_argument("--allowed-local-media-path", default=None, metavar="DIR",
                        help="accept requests naming files on the server inside DIR only (symbolic links and '..' "
                             "resolved first), as vLLM's flag of that name")
    parser.add_argument("--body-timeout", type=float, default=60.0, metavar="SECONDS",
                        help="the longest wait for the next part of a request body (default: 60); then 408")
    parser.add_argument("--max-sessions", type=int, default=4, metavar="N",
                        help="live-video sessions (/v1/sessions) open at once at most (default: 4)")
    parser.add_argument("--session-idle", type=float, default=600.0, metavar="SECONDS",
                        help="a live-video session idle this long is closed (default: 600)")
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV), metavar="KEY",
                        help=f"requests under /v1 must send 'Authorization: Bearer KEY' (401 otherwise), as vLLM's "
                             f"flag of that name; default: ${API_KEY_ENV} (the environment keeps the key out of "
                             "the process list)")
    parser.add_argument("--served-model-name", default=None, metavar="NAME",
                        help="the model id of /v1/models and chat completions (default: the model folder's name)")
    parser.add_argument("--max-concurrent-bodies", type=int, default=4, metavar="N",
                        help="chat-completion and /v1/answer request bodies read and parsed at once at most (each "
                             "costs several times its size in memory); beyond, 503 with Retry-After (default: 4)")
    parser.add_argument("--limit-concurrency", type=int, default=256, metavar="N",
                        help="connections and requests at once at most; beyond, uvicorn answers 503 (default: 256)")
    parser.add_argument("--header-timeout", type=float, default=30.0, metavar="SECONDS",
                        help="the longest a request's line and headers may take to arrive; then the connection is "
                             "closed (default: 30)")


def check_engine_arguments(args: argparse.Namespace) -> None:
    """StormError for flags that cannot work, before anything heavy is imported or loaded."""
    if args.max_frames < 1:
        raise StormError(f"--max-frames must be >= 1, got {args.max_frames}")
    if not 1 <= args.frames <= args.max_frames:
        raise StormError(f"--frames must be between 1 and --max-frames ({args.max_frames}), got {args.frames}")
    if not 0 < args.max_upload_mb < math.inf:
        raise StormError(f"--max-upload-mb must be a finite number > 0, got {args.max_upload_mb}")
    for flag in ("video_cache_mb", "prefix_cache_mb"):
        if not 0 <= getattr(args, flag) <= 2**30:
            raise StormError(f"--{flag.replace('_', '-')} must be between 0 and {2**30}, got {getattr(args, flag)}")
    if not 0 < args.decode_timeout <= 86400:
        raise StormError(f"--decode-timeout must be between 0 and 86400 seconds, got {args.decode_timeout}")
    for flag in ("max_new_tokens", "max_batch_size", "max_queue", "max_queue_frames", "max_batch_frames",
                 "max_concurrent_decodes"):
        if getattr(args, flag) is not None:
            check_int("--" + flag.replace("_", "-"), getattr(args, flag), error=StormError)
    check_model_dir(args.model)


def load_engine(args: argparse.Namespace):
    from storm_vlm.serve import StormEngine
    from storm_vlm.video import set_max_concurrent_decodes

    if args.max_concurrent_decodes is not None:
        set_max_concurrent_decodes(args.max_concurrent_decodes)
    return StormEngine(args.model, device=args.device, precision=args.precision, default_frames=args.frames,
                       max_frames=args.max_frames, max_new_tokens_limit=args.max_new_tokens,
                       max_batch_size=args.max_batch_size, max_batch_frames=args.max_batch_frames,
                       max_queue=args.max_queue, max_queue_frames=args.max_queue_frames,
                       decode_timeout_s=args.decode_timeout,
                       video_cache_mb=args.video_cache_mb, prefix_cache_mb=args.prefix_cache_mb, verbose=True)


def start_server(app, host: str, port: int, header_timeout_s: float = 30.0,
                 limit_concurrency: int | None = 256) -> None:
    """Serve `app` with uvicorn until interrupted (the one place the API server is started), with
    the limits of `storm_vlm.serve.network.uvicorn_config`."""
    import uvicorn

    from storm_vlm.serve.network import uvicorn_config

    uvicorn.Server(uvicorn_config(app, host, port, header_timeout_s=header_timeout_s,
                                  limit_concurrency=limit_concurrency)).run()


def _require_multipart() -> None:
    try:
        import python_multipart  # noqa: F401
    except ModuleNotFoundError:
        import multipart  # noqa: F401  (older python-multipart releases)


def run(args: argparse.Namespace) -> int:
    check_engine_arguments(args)
    if not 0 < args.header_timeout <= 3600:
        raise StormError(f"--header-timeout must be between 0 and 3600 seconds, got {args.header_timeout}")
    for flag in ("max_sessions", "max_concurrent_bodies", "limit_concurrency"):
        check_int("--" + flag.replace("_", "-"), getattr(args, flag), error=StormError)
    from storm_vlm.serve.network import check_listen, warn_if_public

    check_listen(args.host, args.port)
    try:
        import uvicorn  # noqa: F401
        from storm_vlm.serve.api import create_app

        _require_multipart()
    except ModuleNotFoundError as exc:
        raise StormError(f"storm-vlm serve needs fastapi, uvicorn and python-multipart ({exc}); "
                         "install them with: pip install 'storm-vlm[web]'") from None
    if args.allowed_local_media_path is not None and not Path(args.allowed_local_media_path).is_dir():
        raise StormError(f"--allowed-local-media-path {args.allowed_local_media_path}: not a folder")
    if not 0 < args.session_idle <= 86400:
        raise StormError(f"--session-idle must be between 0 and 86400 seconds, got {args.session_idle}")
    if args.api_key is not None and not args.api_key.strip():
        raise StormError(f"--api-key (or ${API_KEY_ENV}) must not be empty")
    if not 0 < args.body_timeout <= 3600:
        raise StormError(f"--body-timeout must be between 0 and 3600 seconds, got {args.body_timeout}")
    engine = load_engine(args)
    app = create_app(engine, max_upload_mb=args.max_upload_mb, allow_local_paths=args.allow_local_paths,
                     allowed_local_media_path=args.allowed_local_media_path, model_name=args.served_model_name,
                     body_timeout_s=args.body_timeout,
                     max_sessions=args.max_sessions, session_idle_s=args.session_idle,
                     max_concurrent_bodies=args.max_concurrent_bodies, api_key=args.api_key)
    warn_if_public(args.host, "storm-vlm serve", keyed=args.api_key is not None)
    start_server(app, args.host, args.port, header_timeout_s=args.header_timeout,
                 limit_concurrency=args.limit_concurrency)
    return 0
