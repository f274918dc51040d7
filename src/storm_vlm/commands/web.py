"""`storm-vlm web MODEL_DIR`: a gradio web page (upload a video or pick an example, talk about it;
answers stream in). Listens on 127.0.0.1 unless --host says otherwise; never makes a public
share link and sends no analytics. See `storm_vlm.serve.web`.

gradio keeps uploads and its cache in a private temporary folder of this run (unless
GRADIO_TEMP_DIR names one), removed when the page stops (Ctrl+C or SIGTERM): not in the
/tmp/gradio that every gradio app of the machine shares, which another user's run may own
(uploads then fail).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import tempfile
import threading

from storm_vlm.commands.serve import add_engine_arguments, check_engine_arguments, load_engine
from storm_vlm.errors import StormError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"address to listen on (default: {DEFAULT_HOST}, this host only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM stops the page as Ctrl+C does: gradio closes, the folder is removed


def run(args: argparse.Namespace) -> int:
    check_engine_arguments(args)
    from storm_vlm.serve.network import check_listen, warn_if_public

    check_listen(args.host, args.port)
    private = None if os.environ.get("GRADIO_TEMP_DIR") else tempfile.mkdtemp(prefix="storm-web-")  # mode 0700
    if private:
        os.environ["GRADIO_TEMP_DIR"] = private  # before gradio is imported
    previous = (signal.signal(signal.SIGTERM, _interrupt)
                if threading.current_thread() is threading.main_thread() else None)
    try:
        try:
            from storm_vlm.serve.web import build_demo, launch_demo
        except ModuleNotFoundError as exc:
            raise StormError(f"storm-vlm web needs gradio ({exc}); install it with: "
                             "pip install 'storm-vlm[web]'") from None
        demo = build_demo(load_engine(args))
        warn_if_public(args.host, "storm-vlm web")
        launch_demo(demo, args.host, args.port, max_upload_mb=args.max_upload_mb, concurrency=args.max_batch_size,
                    max_queue=args.max_queue)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if private:
            shutil.rmtree(private, ignore_errors=True)
            del os.environ["GRADIO_TEMP_DIR"]
    return 0
