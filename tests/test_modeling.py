import itertools

import pytest
import torch
from helpers import load, random_video, video_question

from storm_vlm import StormForConditionalGeneration


@pytest.fixture(scope="module")
def qwen2(qwen2_mamba_dir):
    return load(qwen2_mamba_dir)


def chat_inputs(processor, video, **kw):
    return processor.apply_chat_template(video_question(video), add_generation_prompt=True, tokenize=True,
                                         return_dict=True, **kw)


def test_forward_with_labels_trains_every_part(qwen2):
    model, processor = qwen2
    ex = processor.build_training_example(video_question(random_video(8)) + [{"role": "assistant", "content": "B"}])
    model.train()
    try:
        out = model(**ex)
    finally:
        model.eval()
    assert torch.isfinite(out.loss)
    assert out.logits.shape == (*ex["input_ids"].shape, model.config.text_config.vocab_size)
    out.loss.backward()
    for part in ("vision_tower", "projector", "language_model"):
        grads = [p.grad for p in getattr(model, part).parameters() if p.grad is not None]
        assert grads and sum(float(g.abs().sum()) for g in grads) > 0, part
    model.zero_grad(set_to_none=True)


def test_placeholders_are_never_labels(qwen2):
    model, processor = qwen2
    ex = processor(text="<video>\nWhat colour?", videos=[random_video(4)])
    with torch.no_grad():
        as_labels = model(**ex, labels=ex["input_ids"]).loss
        labels = ex["input_ids"].masked_fill(ex["input_ids"] == processor.video_token_id, -100)
        masked = model(**ex, labels=labels).loss
    assert torch.allclose(as_labels, masked)


def test_generate_prefills_then_decodes_with_cache(qwen2):
    model, processor = qwen2
    inputs = chat_inputs(processor, random_video(8))
    n = inputs["input_ids"].shape[1]
    with torch.no_grad():
        cached = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        uncached = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=False)
        first = model(**inputs).logits[0, -1].argmax()
    assert cached.shape == (1, n + 6)
    assert torch.equal(cached, uncached)
    assert cached[0, n] == first
    assert torch.equal(cached[0, :n], inputs["input_ids"][0])


def test_generate_with_test_time_temporal_sampling(qwen2):
    model, processor = qwen2
    video = random_video(8)
    inputs = chat_inputs(processor, video, temporal_sample_stride=2)
    assert int((inputs["input_ids"] == processor.video_token_id).sum()) == 4 * 16
    assert inputs["video_token_layout"][:, 3].tolist() == [2]  # the batch carries the stride
    with torch.no_grad():
        # named once, to the processor ...
        once = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        # ... is the same as 0.1.0's two-argument call
        twice = model.generate(**inputs, temporal_sample_stride=2, max_new_tokens=3, do_sample=False)
        assert once.shape[1] > inputs["input_ids"].shape[1] and torch.equal(once, twice)
        # inputs without the layout (built by hand) still take the keyword
        legacy = {k: v for k, v in inputs.items() if k != "video_token_layout"}
        torch.testing.assert_close(model(**legacy, temporal_sample_stride=2).logits, model(**inputs).logits)
        with pytest.raises(ValueError, match="64 <video> tokens but the videos give 128 visual tokens"):
            model(**legacy)  # the model's default stride (1) gives 8 frames' worth
        # naming a different stride than the processor counted is a clear error
        with pytest.raises(ValueError, match=r"temporal_sample_stride=1 was given .* counted these videos with stride \[2\]"):
            model.generate(**inputs, temporal_sample_stride=1, max_new_tokens=1)


def test_placeholder_mismatch_states_both_counts(qwen2):
    model, processor = qwen2
    inputs = processor(text="<video>\nq", videos=[random_video(4)])
    ids = inputs["input_ids"].clone()
    first = (ids[0] == processor.video_token_id).nonzero()[0, 0]
    ids[0, first] = processor.tokenizer.pad_token_id  # one placeholder too few
    with pytest.raises(ValueError, match=r"hold 63 <video> tokens but the videos give 64 visual tokens"):
        with torch.no_grad():
            model(input_ids=ids, pixel_values_videos=inputs["pixel_values_videos"])


def test_videos_out_of_row_order_are_an_error(qwen2):
    model, processor = qwen2
    batch = processor(text=["<video>\nq", "<video>\nq"], videos=[random_video(2), random_video(3, seed=1)])
    swapped = {k: v[[1, 0]] if k in ("pixel_values_videos", "video_frame_mask", "video_token_layout") else v
               for k, v in batch.items()}  # as many visual tokens in all, but row 0 would read the 3-frame video
    with pytest.raises(ValueError, match="row 0 of input_ids holds 32 <video> tokens, which is not a whole number"):
        with torch.no_grad():
            model(**swapped)


def test_save_load_identical_logits_and_auto_classes(qwen2, tmp_path):
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    model, processor = qwen2
    inputs = processor(text="<video>\nWhat colour?", videos=[random_video(5)])
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pt"))
    assert type(AutoConfig.from_pretrained(tmp_path)).__name__ == "StormConfig"
    back = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert isinstance(back, StormForConditionalGeneration)
    assert type(AutoProcessor.from_pretrained(tmp_path)).__name__ == "StormProcessor"
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, back(**inputs).logits)


def test_images_are_one_frame_videos(qwen2):
    model, processor = qwen2
    image = random_video(1, seed=5)[0]
    inputs = processor(text="<image>\nWhat is this?", images=[image])
    with torch.no_grad():
        img = model.get_image_features(inputs["pixel_values"])
        vid, _ = model.get_video_features(inputs["pixel_values"][:, None])
        logits = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert generated.shape == (1, inputs["input_ids"].shape[1] + 3)
    assert img.shape == (1, 1, 16, model.config.text_config.hidden_size)
    assert torch.allclose(img, vid)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_of_different_lengths_equals_each_alone(qwen2, side):
    model, processor = qwen2
    videos = [random_video(8, seed=1), random_video(3, seed=2)]
    texts = ["<video>\nWhat colour is the circle?", "<video>\nHow many?"]
    batch = processor(text=texts, videos=videos, padding_side=side)
    with torch.no_grad():
        logits = model(**batch).logits
        for i in range(2):
            alone = processor(text=texts[i], videos=[videos[i]])
            solo = model(**alone).logits[0]
            real = batch["attention_mask"][i].bool()
            assert torch.allclose(logits[i][real], solo, atol=1e-5), (side, i)


def test_visual_token_counts_match_features_for_every_compression(qwen2):
    model, processor = qwen2
    cfg = model.config
    saved = (cfg.temporal_pool_size, cfg.spatial_pool_stride, cfg.temporal_sample_stride)
    lengths = (7, 2)
    batch = processor(text=["<video>", "<video>"], videos=[random_video(t, seed=t) for t in lengths])
    try:
        with torch.no_grad():
            for k, p, s in itertools.product([1, 2, 3], [1, 2], [1, 2, 4]):
                cfg.temporal_pool_size, cfg.spatial_pool_stride, cfg.temporal_sample_stride = k, p, s
                feats, mask = model.get_video_features(batch["pixel_values_videos"], batch["video_frame_mask"])
                assert feats.shape[2] == cfg.tokens_per_frame == 16 // p**2
                for i, t in enumerate(lengths):
                    assert int(mask[i].sum()) * feats.shape[2] == cfg.num_visual_tokens(t), (k, p, s, t)
                # the call-time stride overrides the config's
                feats, mask = model.get_video_features(batch["pixel_values_videos"], batch["video_frame_mask"], 1)
                assert int(mask[0].sum()) * feats.shape[2] == cfg.num_visual_tokens(7, temporal_sample_stride=1)
    finally:
        cfg.temporal_pool_size, cfg.spatial_pool_stride, cfg.temporal_sample_stride = saved


def test_only_real_frames_reach_the_vision_tower_in_chunks(qwen2):
    model, processor = qwen2
    batch = processor(text=["<video>", "<video>"], videos=[random_video(7), random_video(2, seed=1)])
    calls = []
    pre = model.vision_tower.embeddings.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append((args[0] if args else kwargs["pixel_values"]).shape[0]),
        with_kwargs=True)
    old = model.config.vision_batch_size
    try:
        with torch.no_grad():
            full = model.get_video_features(batch["pixel_values_videos"], batch["video_frame_mask"])[0]
            calls.clear()
            model.config.vision_batch_size = 4
            chunked = model.get_video_features(batch["pixel_values_videos"], batch["video_frame_mask"])[0]
    finally:
        model.config.vision_batch_size = old
        pre.remove()
    assert calls == [3, 3, 3]  # 9 real frames of 14 slots, at most 4 per call, evened out
    assert torch.allclose(full, chunked, atol=1e-5)


def test_bf16_autocast_and_gradient_checkpointing(qwen2):
    model, processor = qwen2
    ex = processor.build_training_example(video_question(random_video(4)) + [{"role": "assistant", "content": "A"}])
    with torch.no_grad():
        ref = model(**ex).loss
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(**ex).loss
    assert torch.isfinite(bf16) and abs(float(bf16) - float(ref)) < 0.1
    model.train()
    try:
        model.activation_checkpointing_enable()
        assert model.projector.gradient_checkpointing
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.vision_tower.modules())
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.language_model.modules())
        loss = model(**ex).loss
        loss.backward()
        assert torch.allclose(loss, ref, atol=1e-5)
        assert model.projector.in_proj.weight.grad is not None
    finally:
        model.activation_checkpointing_disable()
        model.zero_grad(set_to_none=True)
        model.eval()
    assert not model.projector.gradient_checkpointing


@pytest.mark.parametrize("which", ["mlp", "llama"])
def test_other_projector_and_llm(which, qwen2_mlp_dir, llama_mamba_dir, tmp_path):
    model, processor = load(qwen2_mlp_dir if which == "mlp" else llama_mamba_dir)
    assert type(model.projector).__name__ == ("MLPProjector" if which == "mlp" else "MambaTemporalProjector")
    ex = processor.build_training_example(video_question(random_video(6)) + [{"role": "assistant", "content": "D"}])
    model.train()
    out = model(**ex)
    out.loss.backward()
    model.eval()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None for p in model.projector.parameters())
    inputs = chat_inputs(processor, random_video(6))
    with torch.no_grad():
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        model.save_pretrained(tmp_path)
        back = type(model).from_pretrained(tmp_path).eval()
        assert torch.equal(model(**inputs).logits, back(**inputs).logits)
    assert gen.shape[1] > inputs["input_ids"].shape[1]


def test_batched_generation_equals_each_alone(qwen2):
    model, processor = qwen2
    videos = [random_video(8, seed=3), random_video(3, seed=4)]
    conversations = [video_question(videos[0], "What colour is the circle in the video?"),
                     video_question(videos[1], "How many?")]
    batch = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert processor.padding_side == "left" and batch["attention_mask"][1, 0] == 0
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        together = model.generate(**batch, **kw)
        for i in range(2):
            one = processor.apply_chat_template(conversations[i], add_generation_prompt=True, tokenize=True,
                                                return_dict=True)
            alone = model.generate(**one, **kw)
            assert torch.equal(together.sequences[i, -4:], alone.sequences[0, -4:])
            for step_batch, step_alone in zip(together.scores, alone.scores):
                assert torch.allclose(step_batch[i], step_alone[0], atol=1e-4)


@pytest.mark.parametrize("layer", [-2, -1, 0, 1, -4])
def test_vision_features_are_the_requested_hidden_state(qwen2, layer):
    model, processor = qwen2
    pixels = processor(text="<video>", videos=[random_video(3)])["pixel_values_videos"][0]
    old = model.config.vision_feature_layer
    model.config.vision_feature_layer = layer
    try:
        with torch.no_grad():
            ours = model._vision_features(pixels)
            ref = model.vision_tower(pixel_values=pixels, output_hidden_states=True).hidden_states[layer]
    finally:
        model.config.vision_feature_layer = old
    assert ours.shape == (3, 64, model.config.vision_config.hidden_size)
    assert torch.allclose(ours, ref, atol=1e-5)  # float rounding: the frames per call can differ
