"""storm-vlm: STORM (Spatiotemporal TOken Reduction for Multimodal LLMs)."""

__version__ = "0.1.0"

from storm_vlm.video import VideoDecodeError, load_video  # noqa: E402  (PyAV is imported on first use)
