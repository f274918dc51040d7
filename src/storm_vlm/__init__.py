"""storm-vlm: STORM (Spatiotemporal TOken Reduction for Multimodal LLMs)."""

__version__ = "0.1.0"
