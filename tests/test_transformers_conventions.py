"""StormConfig / StormForConditionalGeneration / StormProcessor behave as transformers' VLMs
(LLaVA-OneVision, Qwen2-VL) do for what a user of those reaches for: frame sampling keywords,
continue_final_message, keyword overrides at load time, attention implementations, output
options, sharded / bfloat16 checkpoints, cache kinds and activation checkpointing."""

import inspect

import pytest
import torch
from helpers import load, random_video, video_question, write_mp4
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from storm_vlm import StormConfig, StormProcessor
from storm_vlm.errors import ConfigError, StormError
from storm_vlm.video import uniform_indices


@pytest.fixture(scope="module")
def qwen2(qwen2_mamba_dir):
    return load(qwen2_mamba_dir)


def chat(processor, conversation, **kw):
    return processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         **kw)


def frames_given(batch) -> int:
    return batch["pixel_values_videos"].shape[1]


# ---- processor ----------------------------------------------------------------------------------


def test_num_frames_samples_frames_in_memory_as_a_file_and_fps_needs_a_file(qwen2, tmp_path):
    _, processor = qwen2
    video = random_video(8)
    for n in (3, 12):  # fewer frames: evenly spread; more: repeated evenly (load_video's rule)
        sampled = processor(text="<video>", videos=video, num_frames=n)
        by_hand = processor(text="<video>", videos=video[uniform_indices(8, n)[0]])
        assert frames_given(sampled) == n
        assert torch.equal(sampled["pixel_values_videos"], by_hand["pixel_values_videos"])
    path = write_mp4(tmp_path / "clip.mp4", random_video(12, 64, 64), fps=8)
    assert frames_given(processor(text="<video>", videos=path, num_frames=5)) == 5
    assert frames_given(processor(text="<video>", videos=video)) == 8  # no keyword: frames kept as given
    # the chat template samples the content items' frames with the call's or the item's own setting
    assert frames_given(chat(processor, video_question(video), num_frames=4)) == 4
    item = [{"role": "user", "content": [{"type": "video", "video": video, "num_frames": 2}]}]
    assert frames_given(chat(processor, item)) == 2
    assert frames_given(chat(processor, video_question(path), fps=2)) == 3  # 1.5 s at 2 fps
    for call in (lambda: processor(text="<video>", videos=video, fps=2),
                 lambda: chat(processor, video_question(video), fps=2)):
        with pytest.raises(StormError, match="fps=2 samples a video file .* frames already"):
            call()


def test_explicit_videos_replace_the_content_items_without_reading_their_files(qwen2):
    _, processor = qwen2
    conversation = [{"role": "user", "content": [{"type": "video", "path": "/nonexistent/clip.mp4"},
                                                 {"type": "text", "text": "q"}]}]
    out = chat(processor, conversation, videos=[random_video(6)], num_frames=3)
    assert frames_given(out) == 3


def test_continue_final_message(qwen2):
    _, processor = qwen2
    conversation = video_question(random_video(2)) + [{"role": "assistant", "content": "The circle is"}]
    prompt = processor.apply_chat_template(conversation, continue_final_message=True)
    assert prompt.endswith("<|im_start|>assistant\nThe circle is")  # left open: no end-of-turn
    ids = processor.apply_chat_template(conversation, continue_final_message=True, tokenize=True)
    assert processor.decode(ids[0]).endswith("assistant\nThe circle is")
    assert processor.post_process_image_text_to_text(ids) == processor.batch_decode(ids, skip_special_tokens=True)
    for other in ("add_generation_prompt", "return_assistant_tokens_mask"):
        with pytest.raises(StormError, match=f"cannot be combined with {other}"):
            processor.apply_chat_template(conversation, continue_final_message=True, tokenize=True, **{other: True})


def test_processor_keywords_unknown_refused_own_honoured_at_load(qwen2, qwen2_mamba_dir):
    _, processor = qwen2
    with pytest.raises(TypeError, match="padding_sde"):
        StormProcessor(processor.image_processor, processor.tokenizer, padding_sde="right")
    # the tokenizer's loader hands the processor's keywords to the model config too: not a crash
    layout = {**processor.layout.to_dict(), "temporal_sample_stride": 2}
    back = AutoProcessor.from_pretrained(qwen2_mamba_dir, visual_token_layout=layout)
    assert back.layout.to_dict() == layout


def test_model_input_names_are_what_the_processor_returns_and_forward_reads(qwen2):
    model, processor = qwen2
    content = [{"type": "video", "video": random_video(2)}, {"type": "image", "image": random_video(1)[0]},
               {"type": "text", "text": "q"}]
    batch = chat(processor, [{"role": "user", "content": content}])
    assert set(batch) == set(processor.model_input_names)
    assert set(processor.model_input_names) <= set(inspect.signature(model.forward).parameters)


# ---- config -------------------------------------------------------------------------------------


def test_config_round_trip_and_checked_overrides(qwen2_mamba_dir, tmp_path):
    config = AutoConfig.from_pretrained(qwen2_mamba_dir)
    again = StormConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict() and again.get_text_config() == config.text_config
    assert StormConfig.from_dict({**config.to_dict(), "my_note": "kept"}).to_dict()["my_note"] == "kept"
    assert AutoConfig.from_pretrained(qwen2_mamba_dir, temporal_sample_stride=2).temporal_sample_stride == 2
    with pytest.raises(ConfigError, match="spatial_pool_stride 3 does not divide"):
        AutoModelForImageTextToText.from_pretrained(qwen2_mamba_dir, spatial_pool_stride=3)
    _, unused = AutoConfig.from_pretrained(qwen2_mamba_dir, visual_token_layout={}, return_unused_kwargs=True)
    assert "visual_token_layout" in unused  # a derived property, never set
    config.temporal_sample_stride = 0  # set after construction: caught when saved, not when loaded back
    with pytest.raises(ConfigError, match="temporal_sample_stride must be an integer >= 1"):
        config.save_pretrained(tmp_path)


# ---- model --------------------------------------------------------------------------------------


def test_attention_implementations_and_output_options(qwen2, qwen2_mamba_dir):
    model, processor = qwen2
    inputs = chat(processor, video_question(random_video(3)))
    eager = AutoModelForImageTextToText.from_pretrained(qwen2_mamba_dir, attn_implementation="eager").eval()
    assert eager.language_model.config._attn_implementation == "eager"
    layers = model.config.text_config.num_hidden_layers
    with torch.no_grad():
        ref = model(**inputs)
        out = eager(**inputs, output_attentions=True, output_hidden_states=True)
        torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
        length = inputs["input_ids"].shape[1]
        assert [a.shape[-2:] for a in out.attentions] == [(length, length)] * layers
        assert len(out.hidden_states) == layers + 1
        eager.set_attn_implementation("sdpa")
        torch.testing.assert_close(eager(**inputs).logits, ref.logits, atol=1e-5, rtol=0)
        as_tuple = model(**inputs, return_dict=False)
        assert torch.equal(as_tuple[0], ref.logits)
        last = model(**inputs, logits_to_keep=1).logits
        assert last.shape[1] == 1
        torch.testing.assert_close(last[:, 0], ref.logits[:, -1], atol=1e-5, rtol=0)


def test_sharded_and_bfloat16_checkpoints(qwen2, qwen2_mamba_dir, tmp_path):
    model, processor = qwen2
    inputs = chat(processor, video_question(random_video(3)))
    model.save_pretrained(tmp_path, max_shard_size="200KB")
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    back = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    bf16 = AutoModelForImageTextToText.from_pretrained(qwen2_mamba_dir, dtype=torch.bfloat16).eval()
    assert bf16.dtype == bf16.vision_tower.dtype == bf16.language_model.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(back(**inputs).logits, model(**inputs).logits)
        generated = bf16.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 2


def test_cache_kinds_and_resized_embeddings_give_the_same_greedy_tokens(qwen2, qwen2_mamba_dir):
    model, processor = qwen2
    batch = chat(processor, [video_question(random_video(4)), [{"role": "user", "content": "text only"}]])
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    resized = AutoModelForImageTextToText.from_pretrained(qwen2_mamba_dir).eval()
    vocab = resized.config.text_config.vocab_size
    resized.resize_token_embeddings(vocab + 8, mean_resizing=False)
    assert resized.config.text_config.vocab_size == vocab + 8
    with torch.no_grad():
        ref = model.generate(**batch, **kw)
        assert torch.equal(model.generate(**batch, cache_implementation="static", **kw), ref)
        # the old tokens keep their logits; the new ones (untrained) are kept out of the answer
        assert torch.equal(resized.generate(**batch, suppress_tokens=list(range(vocab, vocab + 8)), **kw), ref)


def test_activation_checkpointing_v5_name(qwen2):
    model, processor = qwen2
    conversation = video_question(random_video(3)) + [{"role": "assistant", "content": "A"}]
    example = processor.build_training_example(conversation)
    with torch.no_grad():
        ref = model(**example).loss
    model.train()
    try:
        model.activation_checkpointing_enable()
        assert model.is_activation_checkpointing and model.projector.gradient_checkpointing
        recompute, blocks = model.projector._gradient_checkpointing_func, []  # the options it was enabled with
        model.projector._gradient_checkpointing_func = lambda fn, *a, **k: blocks.append(fn) or recompute(fn, *a, **k)
        loss = model(**example).loss
        assert blocks == list(model.projector.layers)
        loss.backward()
        torch.testing.assert_close(loss, ref, atol=1e-5, rtol=0)
        assert model.projector.in_proj.weight.grad is not None
    finally:
        model.activation_checkpointing_disable()
        model.zero_grad(set_to_none=True)
        model.eval()
    assert not model.is_activation_checkpointing
