"""storm-vlm: STORM (Spatiotemporal TOken Reduction for Multimodal LLMs)."""

__version__ = "0.1.0"

from storm_vlm.video import VideoDecodeError, load_video  # noqa: E402  (PyAV is imported on first use)
from storm_vlm.config import StormConfig  # noqa: E402
from storm_vlm.modeling import StormForConditionalGeneration  # noqa: E402
from storm_vlm.processing import StormProcessor  # noqa: E402
from storm_vlm.auto import register as _register_auto_classes  # noqa: E402

_register_auto_classes()
