"""generate with num_beams / num_return_sequences > 1 expands every row into copies: each copy must
read that row's own videos and images, in order (a row's [A, B] becomes [A, B, A, B], never
[A, A, B, B])."""

import pytest
import torch
from helpers import load, random_video
from PIL import Image


@pytest.fixture(scope="module")
def qwen2(qwen2_mamba_dir):
    return load(qwen2_mamba_dir)


def chat(processor, conversations):
    return processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True, return_dict=True)


def ask(*visuals, text="Compare them."):
    """A one-turn conversation: each visual is ("video", frames) or ("image", PIL image)."""
    content = [{"type": kind, kind: x} for kind, x in visuals] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


TWO_VIDEOS = ask(("video", random_video(2, seed=1)), ("video", random_video(3, seed=2)))
TWO_IMAGES = ask(*[("image", Image.fromarray(random_video(1, seed=s)[0])) for s in (11, 12)])
NO_VISUALS = [{"role": "user", "content": "none at all"}]


def test_each_copy_of_a_row_reads_the_rows_videos_in_order(qwen2):
    model, processor = qwen2
    batch = chat(processor, [TWO_VIDEOS, NO_VISUALS, ask(("video", random_video(4, seed=3)))])
    ids, kw = model._expand_inputs_for_generation(
        expand_size=2, input_ids=batch["input_ids"], **{k: v for k, v in batch.items() if k != "input_ids"})
    order = [0, 1, 0, 1, 2, 2]
    for key in ("pixel_values_videos", "video_frame_mask", "video_token_layout"):
        assert torch.equal(kw[key], batch[key][order]), key
    with torch.no_grad():
        expanded = model(input_ids=ids, **kw).logits[:, -1]
        rows = model(**batch).logits[:, -1]
    torch.testing.assert_close(expanded, rows.repeat_interleave(2, 0), atol=1e-5, rtol=0)


@pytest.mark.parametrize("conversation", [TWO_VIDEOS, TWO_IMAGES], ids=["two-videos", "two-images"])
def test_beams_and_returned_sequences_read_the_prompts_own_visuals(qwen2, conversation):
    model, processor = qwen2
    inputs = chat(processor, conversation)
    kw = dict(max_new_tokens=1, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        own = model(**inputs).logits[0, -1]
        beams = model.generate(**inputs, num_beams=2, do_sample=False, **kw)
        samples = model.generate(**inputs, num_return_sequences=2, do_sample=True, **kw)
    for out in (beams, samples):
        torch.testing.assert_close(out.logits[0], own.expand(2, -1), atol=1e-5, rtol=0)


def test_a_batch_of_rows_with_two_and_no_videos(qwen2):
    model, processor = qwen2
    batch = chat(processor, [TWO_VIDEOS, NO_VISUALS])
    with torch.no_grad():
        rows = model(**batch).logits[:, -1]
        out = model.generate(**batch, max_new_tokens=2, min_new_tokens=2, num_beams=2, num_return_sequences=2,
                             do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert out.sequences.shape[0] == 4
    torch.testing.assert_close(out.logits[0], rows.repeat_interleave(2, 0), atol=1e-5, rtol=0)
