"""Memory and per-chunk latency of a long video streamed through a causal STORM model.

    PYTHONPATH=src python benchmarks/stream_memory.py                       # 2 h at 1 fps, a tiny random model
    PYTHONPATH=src python benchmarks/stream_memory.py --model runs/stream-acc/storm_pool4_causal/final
    PYTHONPATH=src python benchmarks/stream_memory.py --hours 0.1 --json out.json

A synthetic video (grey background, a drifting grey dot, a coloured square flashing now and then;
generated procedurally, frame by frame, never written to disk) is fed to a `StormStream` in chunks
of --chunk-seconds. Every --every minutes of video it prints: frames so far, visual tokens kept of
the budget, memory-policy rebuilds so far, the process's resident memory, the bytes the stream
holds (KV cache buffers + kept features + pooling window + Mamba states), the median and maximum
per-chunk latency over the interval (vision tower + projector + pooling + LLM prefill of the new
tokens) of the chunks without a rebuild, the median of the memory-policy rebuilds in the interval
(the KV cache prefilled again over the kept tokens; the chunk that triggers one takes that much
longer) and the latency of one question asked then. Without --model it builds a tiny random causal model (64 px frames, 16 tokens per frame).
The host and its load are printed with the table; the figures are this host's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from storm_vlm.commands import positive_int


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def host() -> str:
    import torch

    from storm_vlm.perf.host import cpu_model

    return (f"{cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"load average {' / '.join(f'{x:.1f}' for x in os.getloadavg())}")


class SyntheticVideo:
    """Frames of a long synthetic video, made on demand: (T, S, S, 3) uint8 for any range of indices."""

    PALETTE = [(220, 40, 40), (40, 190, 60), (50, 80, 230), (235, 215, 40), (215, 60, 215), (50, 210, 220)]

    def __init__(self, size: int, seed: int = 0, flash_every: int = 37):
        self.size = size
        self.seed = seed
        self.flash_every = flash_every

    def frames(self, start: int, stop: int) -> np.ndarray:
        s = self.size
        out = np.full((stop - start, s, s, 3), 60, dtype=np.uint8)
        side = max(2, s // 8)
        for i, t in enumerate(range(start, stop)):
            y = (t * 3) % (2 * (s - side))
            x = (t * 5) % (2 * (s - side))
            y, x = min(y, 2 * (s - side) - y), min(x, 2 * (s - side) - x)
            out[i, y:y + side, x:x + side] = 170
            if t % self.flash_every == 0:
                rng = np.random.default_rng(self.seed * 1_000_003 + t)
                big = s // 2
                cy, cx = rng.integers(0, s - big, size=2)
                out[i, cy:cy + big, cx:cx + big] = self.PALETTE[int(rng.integers(len(self.PALETTE)))]
        return out


def tiny_causal_model(root: Path) -> Path:
    from storm_vlm.demo.tiny import build_tiny_model

    return build_tiny_model(root / "model", projector_bidirectional=False, projector_num_layers=2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a STORM model folder with a causal projector (default: a tiny random one)")
    p.add_argument("--hours", type=float, default=2.0, help="video length (default 2)")
    p.add_argument("--fps", type=float, default=1.0, help="frames per second of video (default 1)")
    p.add_argument("--chunk-seconds", type=float, default=10.0, help="seconds of video per chunk (default 10)")
    p.add_argument("--every", type=float, default=10.0, help="minutes of video between rows (default 10)")
    p.add_argument("--max-visual-tokens", type=positive_int, default=None, help="the budget (default: the stream's)")
    p.add_argument("--memory-policy", default="resample", choices=["resample", "uniform", "window"])
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads (default 1)")
    p.add_argument("--json", default=None, help="also write the rows as JSON")
    args = p.parse_args(argv)

    import torch

    from storm_vlm.inference import Predictor
    from storm_vlm.perf.allocator import tune_cpu_allocator
    from storm_vlm.streaming.stream import StormStream

    tune_cpu_allocator()
    torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory(prefix="stream-memory-")
    model_dir = Path(args.model) if args.model else tiny_causal_model(Path(tmp.name))
    predictor = Predictor.from_pretrained(model_dir, "cpu", "float32")
    stream = StormStream(predictor, max_visual_tokens=args.max_visual_tokens, memory_policy=args.memory_policy)
    size = predictor.model.config.vision_config.image_size
    video = SyntheticVideo(size)
    total = int(round(args.hours * 3600 * args.fps))
    per_chunk = max(1, int(round(args.chunk_seconds * args.fps)))
    per_row = max(per_chunk, int(round(args.every * 60 * args.fps)) // per_chunk * per_chunk)
    print(f"host: {host()}")
    print(f"model: {args.model or 'tiny random causal model'} ({stream.tokens_per_frame} visual tokens per pooled frame, "
          f"k={stream.k}, s={stream.s}); {total} frames = {args.hours:g} h at {args.fps:g} fps, chunks of "
          f"{per_chunk} frames; budget {stream.max_visual_tokens} visual tokens, policy {stream.memory_policy}")
    header = ("| video | frames | visual tokens | rebuilds | RSS MiB | stream MiB | chunk ms median | chunk ms max "
              "| rebuild ms median | ask ms |")
    print(header)
    print("|" + "---:|" * 10)
    rows, latencies, rebuilds = [], [], []
    start = time.perf_counter()
    for i in range(0, total, per_chunk):
        frames = video.frames(i, min(total, i + per_chunk))
        t0 = time.perf_counter()
        stats = stream.feed(frames)
        elapsed = time.perf_counter() - t0
        if stats.rebuild_s:
            rebuilds.append(stats.rebuild_s)
        else:
            latencies.append(elapsed)
        done = min(total, i + per_chunk)
        if done % per_row == 0 or done == total:
            t1 = time.perf_counter()
            stream.ask("What colour was the last flash?", max_new_tokens=4)
            ask_ms = (time.perf_counter() - t1) * 1000
            row = {"video_min": round(done / args.fps / 60, 1), "frames": done, "visual_tokens": stream.visual_tokens,
                   "rebuilds": stream.rebuilds, "rss_mib": round(rss_mb(), 1),
                   "stream_mib": round(stream.memory_bytes()["total"] / 2**20, 2),
                   "chunk_ms_median": round(statistics.median(latencies) * 1000, 1) if latencies else None,
                   "chunk_ms_max": round(max(latencies) * 1000, 1) if latencies else None,
                   "rebuild_ms_median": round(statistics.median(rebuilds) * 1000, 1) if rebuilds else None,
                   "ask_ms": round(ask_ms, 1)}
            rows.append(row)
            latencies, rebuilds = [], []
            h, m = divmod(int(row["video_min"]), 60)
            print(f"| {h}:{m:02d} | {done} | {row['visual_tokens']} | {row['rebuilds']} | {row['rss_mib']} | "
                  f"{row['stream_mib']} | {row['chunk_ms_median']} | {row['chunk_ms_max']} | "
                  f"{row['rebuild_ms_median'] or '-'} | "
                  f"{row['ask_ms']} |",
                  flush=True)
    wall = time.perf_counter() - start
    print(f"wall {wall:.0f} s for {args.hours:g} h of video ({total / wall:.0f} frames/s); host after: {host()}")
    if args.json:
        Path(args.json).write_text(json.dumps({"host": host(), "args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
