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
    with torch.no_grad():
        encoded = model.get_video_features(batch["pixel_values_videos"], batch["video_frame_mask"],
                                           video_token_layout=batch["video_token_layout"], return_dict=True)
        tokens = [len(t) for t in encoded.pooler_output]
        assert tokens == [2 * tokens[0] // 2, 3 * tokens[0] // 2, 4 * tokens[0] // 2]  # 2, 3 and 4 frames
        ids, kw = model._expand_inputs_for_generation(
            expand_size=2, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            mm_encoder_outputs={"video": encoded})
        order = [0, 1, 0, 1, 2, 2]  # row 0's videos [A, B] -> [A, B, A, B], never [A, A, B, B]
        assert [len(t) for t in kw["mm_encoder_outputs"]["video"].pooler_output] == [tokens[i] for i in order]
        expanded = model(input_ids=ids, **kw).logits[:, -1]
        rows = model(**batch).logits[:, -1]
    torch.testing.assert_close(expanded, rows.repeat_interleave(2, 0), atol=1e-5, rtol=0)


def test_generate_encodes_each_video_once_whatever_the_beams(qwen2, monkeypatch):
    model, processor = qwen2
    inputs = chat(processor, TWO_VIDEOS)
    seen = []
    encode = model._vision_features
    monkeypatch.setattr(model, "_vision_features", lambda frames: seen.append(len(frames)) or encode(frames))
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, num_beams=3, num_return_sequences=3, do_sample=False)
    assert sum(seen) == 5  # the 2 + 3 frames, not once per beam


def test_pre_encoded_visuals_answer_as_pixels_do_and_a_chunked_prefill_too(qwen2):
    model, processor = qwen2
    inputs = chat(processor, ask(("video", random_video(3, seed=4)), ("image", Image.fromarray(random_video(1)[0]))))
    pixels = {k: inputs.pop(k) for k in ("pixel_values_videos", "video_frame_mask", "video_token_layout",
                                         "pixel_values")}
    kw = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        encoded = {"video": model.get_video_features(pixels["pixel_values_videos"], pixels["video_frame_mask"],
                                                     video_token_layout=pixels["video_token_layout"],
                                                     return_dict=True),
                   "image": model.get_image_features(pixels["pixel_values"], return_dict=True)}
        own = model.generate(**inputs, **pixels, **kw)
        again = model.generate(**inputs, mm_encoder_outputs=encoded, **kw)  # a video encoded once, asked again
        chunked = model.generate(**inputs, **pixels, prefill_chunk_size=5, **kw)
        with pytest.raises(ValueError, match="not both"):
            model(**inputs, **pixels, mm_encoder_outputs=encoded)
        short = {"video": type(encoded["video"])(pooler_output=[encoded["video"].pooler_output[0][:-1]])}
        with pytest.raises(ValueError, match="video placeholder mismatch"):
            model(**inputs, mm_encoder_outputs=short)
    assert inputs["input_ids"].shape[1] > 10  # the prompt was split into several chunks
    for out in (again, chunked):
        assert torch.equal(out.sequences, own.sequences)
        torch.testing.assert_close(torch.stack(out.logits), torch.stack(own.logits), atol=1e-5, rtol=0)


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


@pytest.mark.parametrize("kw", [dict(num_beams=3, num_return_sequences=2, do_sample=False),
                                dict(num_return_sequences=3, do_sample=True),
                                dict(num_beams=2, do_sample=False, prefill_chunk_size=7)],
                         ids=["beams", "samples", "chunked"])
def test_the_llm_prefills_each_prompt_once_whatever_the_copies(qwen2, kw, monkeypatch):
    """generate repeats rows for beams / returned sequences before the prefill; the prefill runs on
    one copy of each row and the copies continue from its cache, as if each had prefilled itself."""
    from transformers import GenerationMixin

    model, processor = qwen2
    batch = chat(processor, [TWO_VIDEOS, NO_VISUALS])
    gen = dict(max_new_tokens=3, min_new_tokens=3, output_logits=True, return_dict_in_generate=True, **kw)
    rows = []
    llm = model.language_model.forward
    monkeypatch.setattr(model.language_model, "forward",
                        lambda *a, **k: rows.append(k["inputs_embeds"].shape) or llm(*a, **k))
    with torch.no_grad():
        torch.manual_seed(0)
        once = model.generate(**batch, **gen)
        prefill_rows = {shape[0] for shape in rows if shape[1] > 1}
        monkeypatch.setattr(type(model), "_prefill", GenerationMixin._prefill)  # transformers': every copy
        torch.manual_seed(0)
        every = model.generate(**batch, **gen)
    assert prefill_rows == {2}  # the two prompts, not their copies
    assert torch.equal(once.sequences, every.sequences)
    torch.testing.assert_close(torch.stack(once.logits), torch.stack(every.logits), atol=1e-5, rtol=0)
