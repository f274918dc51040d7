"""Streaming ingestion: a video that keeps arriving (an hour-long file, a live stream), encoded chunk
by chunk through a causal projector, with questions answered while it comes in.

- `StormStream` (`storm_vlm.streaming.stream`): feed frames, ask questions; bounded memory.
- `storm_vlm.streaming.memory`: what the stream keeps of its past past the token budget.
- `storm_vlm.streaming.sources`: frames read incrementally with PyAV (a file at real-time pace or
  as fast as possible, a folder of growing segments, a pipe), for `storm-vlm watch` and the server.

`import storm_vlm.streaming` is cheap: the torch parts load on first use of their names.
"""

from __future__ import annotations

import importlib

__all__ = ["StormStream", "ChunkStats", "check_streamable", "MEMORY_POLICIES", "MAX_CHUNK_FRAMES"]

# Frames a source's chunk may hold: a chunk is decoded, queued and encoded at once, so this bounds
# memory (here, not in `sources`, so that `storm-vlm watch --help` can name it without numpy).
MAX_CHUNK_FRAMES = 128

_LAZY = {"StormStream": "stream", "ChunkStats": "stream", "check_streamable": "stream", "MEMORY_POLICIES": "memory"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"storm_vlm.streaming.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'storm_vlm.streaming' has no attribute {name!r}")
