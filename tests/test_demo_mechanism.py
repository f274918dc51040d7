"""The within-window tasks isolate STORM's mechanism: averaging a pooling window's frames without
temporal mixing erases their answer exactly, while a Mamba projector before the pooling keeps it."""

import numpy as np
import pytest
import torch

from storm_vlm.builder import build_storm
from storm_vlm.demo.synth_tasks import LETTERS, WINDOW, recover_fact, render_flash_order, render_step


def _swapped(task: str, frames: np.ndarray) -> np.ndarray:
    """The other answer's video: the same scene with the event window's frames in another order.

    That reordering is the other answer only if the scene holds still in the window apart from
    the squares, which is checked here first."""
    saturated = (frames.max(-1).astype(int) - frames.min(-1)) > 80  # (T, H, W): the coloured squares
    lit = np.flatnonzero(saturated.any(axis=(1, 2)))
    window = range(lit[0] // WINDOW * WINDOW, lit[0] // WINDOW * WINDOW + WINDOW)
    assert lit[-1] in window
    scene = ~saturated[lit].any(0)
    for t in lit:
        np.testing.assert_array_equal(frames[t][scene], frames[lit[0]][scene])
    out = frames.copy()
    if task == "flash_order":  # swap the two flashes
        out[[lit[0], lit[1]]] = frames[[lit[1], lit[0]]]
    else:  # play the window backwards: the square steps the other way
        out[list(window)] = frames[list(window)][::-1]
    return out


@pytest.fixture(scope="module")
def models(qwen2_parts):
    built = {}
    for name, projector, extra in (("vila", "mlp", {}), ("storm", "mamba", {}),
                                   ("storm_causal", "mamba", {"projector_bidirectional": False})):
        model, processor = build_storm(*qwen2_parts, projector_type=projector, projector_num_layers=1,
                                       temporal_pool_size=WINDOW, **extra)
        built[name] = model.eval()
    return built, processor


def _features(model, processor, frames: np.ndarray) -> torch.Tensor:
    inputs = processor(text="<video>", videos=[frames], return_tensors="pt")
    with torch.no_grad():
        feats, _ = model.get_video_features(inputs["pixel_values_videos"],
                                            video_token_layout=inputs["video_token_layout"])
    return feats[0]  # (T / WINDOW, N, D)


@pytest.mark.parametrize("task,render", [("flash_order", render_flash_order), ("step", render_step)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pooling_erases_the_answer_and_mixing_keeps_it(models, task, render, seed):
    built, processor = models
    size = processor.image_size
    frames = render(np.random.default_rng(seed), 16, size, LETTERS[seed % 4]).frames
    other = _swapped(task, frames)
    # the two videos are the two answers of the question
    assert recover_fact(frames, task) is not None and recover_fact(other, task) is not None
    assert recover_fact(frames, task) != recover_fact(other, task)

    vila_a, vila_b = _features(built["vila"], processor, frames), _features(built["vila"], processor, other)
    assert vila_a.shape[0] == 16 // WINDOW
    torch.testing.assert_close(vila_a, vila_b, atol=1e-5, rtol=0)  # equal up to summation order
    for name in ("storm", "storm_causal"):
        a, b = _features(built[name], processor, frames), _features(built[name], processor, other)
        assert (a - b).abs().max() > 1e-3 * a.abs().max(), name
