"""Register STORM with the transformers Auto classes (AutoConfig, AutoModelForImageTextToText, AutoProcessor).

Runs on `import storm_vlm`; calling `register()` again is harmless.
"""

from __future__ import annotations

_done = False


def register() -> None:
    global _done
    if _done:
        return
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from storm_vlm.config import StormConfig
    from storm_vlm.modeling import StormForConditionalGeneration
    from storm_vlm.processing import StormProcessor

    AutoConfig.register(StormConfig.model_type, StormConfig, exist_ok=True)
    AutoModelForImageTextToText.register(StormConfig, StormForConditionalGeneration, exist_ok=True)
    AutoProcessor.register(StormConfig, StormProcessor, exist_ok=True)
    _done = True
