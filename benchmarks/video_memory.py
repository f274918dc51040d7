"""Peak memory of `load_video` on hostile files, each measurement in a fresh process.

The files are generated here (cached in the temp folder) like the reported memory bombs: black
videos whose frames compress to almost nothing but decode to huge pictures.

  8k.mp4     7680 x 4320, 40 frames, H.264      (about 100 KiB)
  16k.mp4    16000 x 16000, 10 frames, H.264     (about 730 KiB)
  16k.ts     16000 x 16000, 2 frames, MPEG-TS    (streams only known after probing)
  4k.mp4     3840 x 2160, 40 frames, H.264

Each row is one process: import, then one call (or --concurrent calls in threads); the
figures are the process's peak resident set (VmHWM) and its rise over the peak after the
imports. Methods:

  full-size   what load_video did before the pixel cap: every wanted frame converted to
              full-size RGB, kept, then stacked (PyAV directly)
  before      load_video from another checkout (--compare-src, e.g. the main branch)
  capped      load_video with its defaults (max_pixels=DEFAULT_MAX_PIXELS)
  min_side    load_video(min_side=448), what a server for a 448-pixel model passes

A full-size row that would need more than half the machine's available memory is skipped
(the estimate is printed). The host (CPU, cores, load average at start and end) is printed.

    .venv/bin/python benchmarks/video_memory.py
    .venv/bin/python benchmarks/video_memory.py --compare-src ../main/src --concurrent 6
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

from storm_vlm.commands import positive_int

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))  # helpers.py

FILES = {  # name: (width, height, frames, container format)
    "8k.mp4": (7680, 4320, 40, "mp4"),
    "16k.mp4": (16000, 16000, 10, "mp4"),
    "16k.ts": (16000, 16000, 2, "mpegts"),
    "4k.mp4": (3840, 2160, 40, "mp4"),
}


def make_black(path: str, width: int, height: int, frames: int, fmt: str) -> None:
    from helpers import write_solid  # imported here: it imports torch, and the children never write

    tmp = path + ".tmp"
    write_solid(tmp, width, height, frames, "libx264", fmt=fmt, luma=16)
    os.replace(tmp, path)


def full_size_decode(path: str, num_frames: int) -> np.ndarray:
    """The loader before the pixel cap: wanted frames as full-size RGB in a dict, then stacked."""
    import av

    from storm_vlm.video import uniform_indices

    with av.open(path) as container:
        stream = container.streams.video[0]
        n = stream.frames
        indices, _ = uniform_indices(n, num_frames)
        wanted, kept = set(indices.tolist()), {}
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                kept[i] = frame.to_ndarray(format="rgb24")
    return np.stack([kept[int(i)] for i in indices])


# ---------------------------------------------------------------- one measurement (child process)


def child(spec: dict) -> dict:
    import threading

    if spec.get("src"):
        sys.path.insert(0, spec["src"])
    import av  # noqa: F401  (imported before the baseline, like every caller)

    from storm_vlm import video

    def peak() -> int:
        # VmHWM: this process image's own high-water mark (ru_maxrss would also count the
        # parent's pages at fork time, which exec carries over).
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

    base = peak()
    if spec["method"] == "full-size":
        def call():
            return full_size_decode(spec["path"], spec["frames"])
    else:
        kwargs = {"min_side": 448} if spec["method"] == "min_side" else {}

        def call():
            return video.load_video(spec["path"], num_frames=spec["frames"], **kwargs).frames

    results = [None] * spec["concurrent"]

    def run(k):
        try:
            frames = call()
            results[k] = f"{frames.shape[0]} x {frames.shape[2]}x{frames.shape[1]}"
        except Exception as exc:  # a refusal is a result here
            results[k] = f"{type(exc).__name__}: {str(exc).split(': ', 1)[-1][:90]}"

    start = time.perf_counter()
    threads = [threading.Thread(target=run, args=(k,)) for k in range(spec["concurrent"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"base": base, "peak": peak(), "seconds": time.perf_counter() - start,
            "result": results[0] if len(set(results)) == 1 else " / ".join(sorted(set(results)))}


# ---------------------------------------------------------------- driver


def host() -> str:
    import av

    from storm_vlm.perf.host import cpu_model

    return (f"{cpu_model()}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, PyAV {av.__version__}")


def available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "storm_video_memory"))
    parser.add_argument("--compare-src", default=None, help="a checkout's src folder to measure as 'before'")
    parser.add_argument("--concurrent", type=positive_int, default=6,
                        help="threads in the concurrency rows (default 6)")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0

    os.makedirs(args.cache, exist_ok=True)
    load_start = os.getloadavg()
    print(f"host: {host()}; load average at start {load_start[0]:.2f}")
    for name, (w, h, n, fmt) in FILES.items():
        path = os.path.join(args.cache, name)
        if not os.path.exists(path):
            t = time.perf_counter()
            make_black(path, w, h, n, fmt)
            print(f"generated {name} ({os.path.getsize(path) / 1024:.0f} KiB) in {time.perf_counter() - t:.0f} s")

    before = ["before"] if args.compare_src else []
    rows = [("8k.mp4", 32, 1, m) for m in ["full-size", *before, "capped", "min_side"]]
    rows += [("16k.mp4", 2, 1, m) for m in ["full-size", *before]]
    rows += [("16k.mp4", 8, 1, m) for m in ["full-size", *before, "capped"]]
    rows += [("16k.ts", 8, 1, "capped")]
    rows += [("4k.mp4", 32, 1, m) for m in ["full-size", "capped", "min_side"]]
    rows += [("8k.mp4", 32, args.concurrent, m) for m in ["full-size", *before, "capped", "min_side"]]

    header = (f"| file | frames | calls at once | method | peak RSS MiB | rise MiB | seconds | result |\n"
              f"|---|---:|---:|---|---:|---:|---:|---|")
    lines = []
    for name, frames, concurrent, method in rows:
        w, h, n, _ = FILES[name]
        path = os.path.join(args.cache, name)
        label = f"{name} ({w}x{h}, {os.path.getsize(path) / 1024:.0f} KiB)"
        if method in ("full-size", "before"):
            need = concurrent * (min(frames, n) + frames) * w * h * 3  # distinct frames kept + the stack
            free = available_bytes()
            if free is not None and need > free / 2:
                lines.append(f"| {label} | {frames} | {concurrent} | {method} | - | - | - | skipped: needs about "
                             f"{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB available |")
                print(lines[-1], flush=True)
                continue
        spec = {"path": path, "frames": frames, "concurrent": concurrent, "method": method,
                "src": args.compare_src if method == "before" else None}
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["?"])[-1][:100]
            lines.append(f"| {label} | {frames} | {concurrent} | {method} | - | - | - | failed: {tail} |")
        else:
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            lines.append(f"| {label} | {frames} | {concurrent} | {method} | {r['peak'] / 2**20:.0f} | "
                         f"{(r['peak'] - r['base']) / 2**20:.0f} | {r['seconds']:.1f} | {r['result']} |")
        print(lines[-1], flush=True)

    from storm_vlm.video import DEFAULT_MAX_PIXELS, MAX_SOURCE_PIXELS, max_concurrent_decodes

    load_end = os.getloadavg()
    print()
    print(f"host: {host()}; load average {load_start[0]:.2f} at start, {load_end[0]:.2f} at end")
    print(f"DEFAULT_MAX_PIXELS {DEFAULT_MAX_PIXELS:,}, MAX_SOURCE_PIXELS {MAX_SOURCE_PIXELS:,}, "
          f"concurrent decodes per process {max_concurrent_decodes()}")
    print(header)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
