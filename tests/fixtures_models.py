"""Tiny STORM parts and models for the model/processor/CLI tests, built once per test session.

Import the fixtures into a test module (`from fixtures_models import tiny_parts, ...`); the
folders are cached per process, so every module that uses them shares one build.
"""

from __future__ import annotations

import numpy as np
import pytest

_CACHE: dict = {}


def _parts(tmp_path_factory, llm: str):
    key = ("parts", llm)
    if key not in _CACHE:
        from storm_vlm.demo.tiny import make_tiny_parts

        _CACHE[key] = make_tiny_parts(tmp_path_factory.mktemp(f"parts-{llm}"), llm=llm)
    return _CACHE[key]


def _model_dir(tmp_path_factory, llm: str, projector: str, **overrides):
    key = ("model", llm, projector, tuple(sorted(overrides.items())))
    if key not in _CACHE:
        from storm_vlm.builder import build_storm, save_storm

        vision_dir, llm_dir = _parts(tmp_path_factory, llm)
        model, processor = build_storm(vision_dir, llm_dir, projector_type=projector, **overrides)
        _CACHE[key] = save_storm(model, processor, tmp_path_factory.mktemp(f"storm-{llm}-{projector}") / "model")
    return _CACHE[key]


def load(model_dir):
    """(model in eval mode, processor) from a folder, through the Auto classes."""
    import storm_vlm  # noqa: F401
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return AutoModelForImageTextToText.from_pretrained(model_dir).eval(), AutoProcessor.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def qwen2_parts(tmp_path_factory):
    """(vision_dir, llm_dir): tiny SigLIP (64 px, 8 px patches) + tiny Qwen2 with a trained tokenizer."""
    return _parts(tmp_path_factory, "qwen2")


@pytest.fixture(scope="session")
def llama_parts(tmp_path_factory):
    return _parts(tmp_path_factory, "llama")


@pytest.fixture(scope="session")
def qwen2_mamba_dir(tmp_path_factory):
    """A tiny STORM (Mamba projector, 1 layer) + Qwen2 folder: 16 visual tokens per frame."""
    return _model_dir(tmp_path_factory, "qwen2", "mamba", projector_num_layers=1)


@pytest.fixture(scope="session")
def qwen2_mlp_dir(tmp_path_factory):
    return _model_dir(tmp_path_factory, "qwen2", "mlp")


@pytest.fixture(scope="session")
def llama_mamba_dir(tmp_path_factory):
    return _model_dir(tmp_path_factory, "llama", "mamba", projector_num_layers=1)


def random_video(num_frames: int, height: int = 40, width: int = 48, seed: int = 0) -> np.ndarray:
    """(T, H, W, 3) uint8 noise frames."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(num_frames, height, width, 3), dtype=np.uint8)


def video_question(video, text: str = "What colour is the circle?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "video", "video": video}, {"type": "text", "text": text}]}]


def write_mp4(path, frames: np.ndarray, fps: int = 8, codec: str = "mpeg4"):
    """Write (T, H, W, 3) uint8 frames as an mp4 with PyAV (the synthetic benchmark's encoder)."""
    from storm_vlm.demo.synth import write_mp4 as encode

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
