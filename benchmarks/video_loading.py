"""Video loading: 128 frames sampled from a long generated video, three ways, in one run.

  load_video       storm_vlm.load_video (seeks: keyframe seek + short decode per wanted frame)
  decode all       PyAV decoding every frame in order, converting only the wanted ones
  decord get_batch decord.VideoReader(path).get_batch(indices) (when decord is installed)

The video (default 30 min, 10 fps, 256x144, H.264, keyframe every 50 frames = 5 s) is
generated once (moving noise texture + a bouncing square, so motion compensation has
work to do) and cached. All methods sample the same indices round(linspace(0, n-1, 128));
the frames are compared, each timing is the median of --repeats interleaved runs, and the
table gives each time and its ratio to load_video.

    python benchmarks/video_loading.py            # the defaults above
    python benchmarks/video_loading.py --minutes 60 --gop 250
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from helpers import encode_video  # noqa: E402  (the tests' video writer)
from storm_vlm.commands import positive_int  # noqa: E402
from storm_vlm import load_video  # noqa: E402
from storm_vlm.perf.host import host_summary, load_line  # noqa: E402


def make_video(path: str, minutes: float, fps: int, width: int, height: int, gop: int) -> None:
    from tqdm import tqdm

    n = int(round(minutes * 60 * fps))
    rng = np.random.default_rng(0)
    texture = rng.integers(0, 256, size=(height * 2, width * 2, 3), dtype=np.uint8)
    texture = ((texture.astype(np.uint16) + np.roll(texture, 1, axis=0) + np.roll(texture, 1, axis=1)) // 3).astype(np.uint8)
    side = height // 4

    def frame(t: int) -> np.ndarray:
        oy, ox = (t * 2) % height, (t * 3) % width
        out = texture[oy:oy + height, ox:ox + width].copy()
        y = int(abs((t * 4) % (2 * (height - side)) - (height - side)))
        x = int(abs((t * 5) % (2 * (width - side)) - (width - side)))
        out[y:y + side, x:x + side] = (255 * (t % 2), 200, 40)
        return out

    tmp = path + ".tmp"
    frames = (frame(t) for t in tqdm(range(n), desc="generating test video", unit="frame", mininterval=2))
    encode_video(tmp, frames, fps, "libx264", fmt="mp4", gop=gop,
                 options={"preset": "ultrafast", "crf": "23", "keyint_min": str(gop)})
    os.replace(tmp, path)


def decode_all(path: str, indices: np.ndarray) -> np.ndarray:
    import av
    from av.video.reformatter import VideoReformatter

    wanted = set(int(i) for i in indices)
    reformatter = VideoReformatter()
    out = {}
    with av.open(path) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                out[i] = reformatter.reformat(frame, format="rgb24").to_ndarray()
    return np.stack([out[int(i)] for i in indices])


def decord_batch(path: str, indices: np.ndarray) -> np.ndarray:
    import decord

    reader = decord.VideoReader(path, ctx=decord.cpu(0))
    return reader.get_batch(list(int(i) for i in indices)).asnumpy()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--fps", type=positive_int, default=10)
    parser.add_argument("--width", type=positive_int, default=256)
    parser.add_argument("--height", type=positive_int, default=144)
    parser.add_argument("--gop", type=positive_int, default=50, help="keyframe interval in frames (default 50 = 5 s)")
    parser.add_argument("--frames", type=positive_int, default=128)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--video", default=None, help="cache path of the generated video")
    args = parser.parse_args(argv)
    print(host_summary())

    video = args.video or os.path.join(
        tempfile.gettempdir(),
        f"storm_bench_{args.minutes:g}min_{args.fps}fps_{args.width}x{args.height}_g{args.gop}.mp4")
    if not os.path.exists(video):
        start = time.perf_counter()
        make_video(video, args.minutes, args.fps, args.width, args.height, args.gop)
        print(f"generated {video} in {time.perf_counter() - start:.1f} s")

    clip = load_video(video, num_frames=args.frames)
    indices = clip.indices
    methods = {"load_video (seek)": lambda: load_video(video, num_frames=args.frames).frames,
               "PyAV decode all": lambda: decode_all(video, indices)}
    try:
        import decord  # noqa: F401

        methods["decord get_batch"] = lambda: decord_batch(video, indices)
    except ImportError:
        print("decord is not installed: its row is skipped")

    times = {name: [] for name in methods}
    results = {}
    for _ in range(args.repeats):
        for name, fn in methods.items():
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)

    reference = results["load_video (seek)"]
    base = statistics.median(times["load_video (seek)"])
    n = clip.num_source_frames
    lines = [f"video: {args.minutes:g} min, {args.fps} fps, {args.width}x{args.height}, H.264 (x264 ultrafast, "
             f"keyframe every {args.gop} frames), {n} frames, {os.path.getsize(video) / 1e6:.1f} MB",
             f"sampled: {args.frames} frames, indices round(linspace(0, {n - 1}, {args.frames})); "
             f"median of {args.repeats} interleaved runs; CPU threads available: {os.cpu_count()}",
             f"load_video decoded {clip.extra['decoded']} frames with {clip.extra['seeks']} seeks "
             f"({clip.extra['decoded'] / args.frames:.1f} per sampled frame, vs {n} for a full decode)",
             "",
             f"{'method':<20} {'time (s)':>9} {'x load_video':>13} {'max |diff| vs load_video':>26}",
             "-" * 71]
    for name in methods:
        t = statistics.median(times[name])
        diff = np.abs(results[name].astype(np.int16) - reference.astype(np.int16))
        lines.append(f"{name:<20} {t:>9.3f} {t / base:>12.1f}x {int(diff.max()):>14d} (mean {diff.mean():.2f})")
    print("\n".join(lines))
    print(load_line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
