"""Plain helpers the tests share (videos, messages, a tiny config); the shared fixtures (tiny
parts and model folders, built once per session) are in conftest.py."""

from __future__ import annotations

import numpy as np
import storm_vlm  # noqa: F401  (registers the STORM classes with the Auto classes)
from transformers import AutoModelForImageTextToText, AutoProcessor

from storm_vlm.demo.synth import write_mp4 as encode

def load(model_dir):
    """(model in eval mode, processor) from a folder, through the Auto classes."""
    return AutoModelForImageTextToText.from_pretrained(model_dir).eval(), AutoProcessor.from_pretrained(model_dir)


def random_video(num_frames: int, height: int = 40, width: int = 48, seed: int = 0) -> np.ndarray:
    """(T, H, W, 3) uint8 noise frames."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(num_frames, height, width, 3), dtype=np.uint8)


def video_question(video, text: str = "What colour is the circle?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "video", "video": video}, {"type": "text", "text": text}]}]


def write_mp4(path, frames: np.ndarray, fps: int = 8, codec: str = "mpeg4"):
    """Write (T, H, W, 3) uint8 frames as an mp4 with PyAV (the synthetic benchmark's encoder)."""
    encode(str(path), frames, fps, codec)
    return path


# a tiny StormConfig(**TINY_CONFIG) for random-weight models (profiler, CPU fast paths)
TINY_CONFIG = dict(
    vision_config=dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=2, image_size=32, patch_size=8, vision_use_head=False),
    text_config=dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=64),
    projector_num_layers=1,
    video_token_id=63,
    image_token_id=62,
)
