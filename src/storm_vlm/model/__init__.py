"""The STORM model: configuration, modeling, processing, and the parts they are built from.

Laid out like a transformers model folder: `configuration` (StormConfig), `modeling`
(StormForConditionalGeneration), `processing` (StormProcessor); `projector` (Mamba temporal
projector and the VILA MLP baseline), `compression` (the visual-token layout: pooling and
sampling), `ssm` (selective scan and Mamba mixers), `cpu_fast_paths` (CPU-only speed paths the
model turns on for itself). Importing the package registers the three classes with the
transformers Auto classes (AutoConfig, AutoModelForImageTextToText, AutoProcessor).
"""

from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from storm_vlm.model.configuration import StormConfig
from storm_vlm.model.modeling import StormForConditionalGeneration
from storm_vlm.model.processing import StormProcessor

__all__ = ["StormConfig", "StormForConditionalGeneration", "StormProcessor"]

AutoConfig.register(StormConfig.model_type, StormConfig, exist_ok=True)
AutoModelForImageTextToText.register(StormConfig, StormForConditionalGeneration, exist_ok=True)
AutoProcessor.register(StormConfig, StormProcessor, exist_ok=True)
