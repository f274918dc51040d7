"""The model and processor called as a transformers user calls LLaVA-OneVision / Qwen2-VL: a
hand-written cached decode loop over a padded batch, arguments in the order transformers'
processors take them, and transparent PIL pictures."""

import numpy as np
import pytest
import torch
from helpers import load, random_video, video_question
from PIL import Image

from storm_vlm.errors import StormError


@pytest.fixture(scope="module")
def qwen2(qwen2_mamba_dir):
    return load(qwen2_mamba_dir)


def greedy_loop(model, inputs, steps: int):
    """Greedy decoding by hand: prefill with use_cache=True, then one token per call with the cache
    and the attention mask grown by one column (no position_ids, as such loops are written).
    Returns the logits of every step (steps + 1, B, V)."""
    out = model(**inputs, use_cache=True)
    mask, logits = inputs["attention_mask"], [out.logits[:, -1]]
    for _ in range(steps):
        token = logits[-1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(token)], 1)
        out = model(input_ids=token, attention_mask=mask, cache=out.cache, use_cache=True)
        logits.append(out.logits[:, -1])
    return torch.stack(logits)


@pytest.mark.parametrize("grad", [False, True], ids=["decode-step", "forward"])
def test_a_hand_written_decode_loop_over_a_left_padded_batch_equals_each_prompt_alone(qwen2, grad):
    """Each cached step of a padded row must continue at the positions its prompt had alone (the
    prefill counts them from the row's first real token), whichever path runs the step."""
    model, processor = qwen2
    conversations = [video_question(random_video(3), "What colour is the circle in this video?"),
                     [{"role": "user", "content": "Hi"}]]
    batch = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert batch["attention_mask"][1, 0] == 0  # the text-only row is left-padded
    with torch.set_grad_enabled(grad):
        together = greedy_loop(model, batch, 3)
        for i, conversation in enumerate(conversations):
            one = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                                return_dict=True)
            torch.testing.assert_close(together[:, i], greedy_loop(model, one, 3)[:, 0], atol=1e-5, rtol=0)


def test_text_that_is_not_strings_is_a_clear_error(qwen2):
    _, processor = qwen2
    image = Image.fromarray(random_video(1)[0])
    # transformers' processors take (images, text): here text comes first
    for call in (lambda: processor(image, "<image> What is this?"),
                 lambda: processor(text=["<image> a", None], images=[image])):
        with pytest.raises(StormError, match="text must be a string or a non-empty list of strings, got "
                                             r"(Image|NoneType) .*pass videos= and images= by name"):
            call()
    with pytest.raises(StormError, match="got list"):
        processor(text=[])
    with pytest.raises(StormError, match="temporal_sample_stride must be an integer >= 1, got 0"):
        processor(text="<video>", videos=random_video(2), temporal_sample_stride=0)


def test_a_transparent_picture_in_memory_reads_as_its_file_and_as_transformers_reads_it(qwen2, tmp_path):
    """Transparent pixels are shown over white, as `load_image` shows a file and transformers'
    image processors show a PIL image; dropping the alpha channel would make them black."""
    _, processor = qwen2
    rgba = np.zeros((64, 64, 4), np.uint8)  # bottom half: transparent black
    rgba[:32] = 255
    picture = Image.fromarray(rgba, "RGBA")
    picture.save(tmp_path / "logo.png")
    from_file = processor(text="<image>", images=str(tmp_path / "logo.png"))["pixel_values"]
    transformers_reads = processor.image_processor(images=picture, return_tensors="pt")["pixel_values"]
    assert from_file.min() == 1.0  # all white
    torch.testing.assert_close(processor(text="<image>", images=picture)["pixel_values"], from_file)
    torch.testing.assert_close(transformers_reads.float(), from_file)
    frames = processor(text="<video>", videos=[[picture, picture]])["pixel_values_videos"][0]
    torch.testing.assert_close(frames, from_file.expand(2, -1, -1, -1))


def test_an_image_file_that_cannot_be_read_is_a_clear_error(qwen2, tmp_path):
    _, processor = qwen2
    (tmp_path / "notes.png").write_text("not a picture")
    for path in (tmp_path / "missing.png", tmp_path / "notes.png"):
        with pytest.raises(StormError, match=f"image 0: cannot read {path}"):
            processor(text="<image> q", images=str(path))
