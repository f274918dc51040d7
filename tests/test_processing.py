import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import random_video, video_question, write_mp4
from PIL import Image

from storm_vlm import StormProcessor, load_video
from storm_vlm.errors import StormError
from storm_vlm.media.images import load_image
from storm_vlm.model.compression import VisualTokenLayout
from storm_vlm.model.processing import default_chat_template

FIELDS = dict(image_size=64, patch_size=8, downsample_ratio=2, temporal_pool_size=1, spatial_pool_stride=1,
              temporal_sample_stride=1)


def make_processor(parts, **fields):
    from transformers import AutoImageProcessor, AutoTokenizer

    vision_dir, llm_dir = parts
    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    image_processor = AutoImageProcessor.from_pretrained(vision_dir)
    return StormProcessor(image_processor, tokenizer, chat_template=default_chat_template(tokenizer),
                          visual_token_layout=VisualTokenLayout.from_dict({**FIELDS, **fields}))


@pytest.fixture(scope="module")
def processor(qwen2_parts):
    return make_processor(qwen2_parts)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """(an mp4 of 12 frames at 8 fps = 1.5 s, a png)."""
    root = tmp_path_factory.mktemp("media")
    video = write_mp4(root / "clip.mp4", random_video(12, 64, 64, seed=7), fps=8)
    image = root / "image.png"
    Image.fromarray(random_video(1, seed=8)[0]).save(image)
    return video, image


def test_tiny_tokenizer_covers_the_benchmark_vocabulary(processor):
    tok = processor.tokenizer
    for letter in "ABCD":
        assert len(tok.encode(letter, add_special_tokens=False)) == 1
        assert len(tok.encode(" " + letter, add_special_tokens=False)) == 1
    prompt = "Which direction does the red circle move? Answer with the option's letter from the given choices directly."
    ids = tok.encode(prompt, add_special_tokens=False)
    assert tok.decode(ids) == prompt
    assert len(ids) < 30  # words, not characters
    assert tok.convert_tokens_to_ids("<video>") == processor.video_token_id != tok.unk_token_id


@pytest.mark.parametrize("fields,stride", [({}, None), ({"temporal_pool_size": 2}, None),
                                           ({"spatial_pool_stride": 2}, 3), ({"temporal_sample_stride": 2}, None)])
def test_placeholders_expand_to_the_config_count(qwen2_parts, fields, stride):
    proc = make_processor(qwen2_parts, **fields)
    layout = VisualTokenLayout.from_dict({**FIELDS, **fields}).with_sample_stride(stride)
    videos = [random_video(8), random_video(5, seed=1), random_video(3, seed=2)]
    out = proc(text=["<video>\nWhat colour?", "Count <video> and <video> please"], videos=videos,
               temporal_sample_stride=stride)
    counts = (out["input_ids"] == proc.video_token_id).sum(1).tolist()
    expected = [layout.num_tokens(t) for t in (8, 5, 3)]
    assert counts == [expected[0], expected[1] + expected[2]]
    assert out["video_token_layout"].tolist() == [layout.as_row()] * 3  # what the model will apply
    assert out["pixel_values_videos"].shape == (3, 8, 3, 64, 64)
    assert out["video_frame_mask"].dtype == torch.bool
    assert out["video_frame_mask"].sum(1).tolist() == [8, 5, 3]
    assert torch.all(out["pixel_values_videos"][1, 5:] == 0)


def test_padding_sides_and_attention_mask(processor):
    videos = [random_video(8), random_video(2, seed=3)]
    texts = ["<video>\nWhat colour is the circle?", "<video>\nHow many?"]
    right = processor(text=texts, videos=videos, padding_side="right")
    left = processor(text=texts, videos=videos, padding_side="left")
    lengths = right["attention_mask"].sum(1)
    assert lengths.tolist() == left["attention_mask"].sum(1).tolist()
    n = int(lengths[1])
    assert torch.equal(right["input_ids"][1, :n], left["input_ids"][1, -n:])
    assert torch.all(right["input_ids"][1, n:] == processor.tokenizer.pad_token_id)
    assert torch.all(left["attention_mask"][1, :-n] == 0)


def test_accepts_clips_frame_lists_and_a_single_video(processor):
    video = random_video(4)
    a = processor(text="<video> hi", videos=video)
    b = processor(text="<video> hi", videos=[SimpleNamespace(frames=video)])
    c = processor(text="<video> hi", videos=[list(video)])
    for other in (b, c):
        assert torch.equal(a["input_ids"], other["input_ids"])
        assert torch.equal(a["pixel_values_videos"], other["pixel_values_videos"])


def test_images_count_as_one_frame(processor):
    image = random_video(1)[0]
    out = processor(text="<image>\nWhat is this?", images=[image])
    assert out["pixel_values"].shape == (1, 3, 64, 64)
    assert int((out["input_ids"] == processor.image_token_id).sum()) == processor.num_visual_tokens(1) == 16
    assert "pixel_values_videos" not in out


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(text="<video> <video>", videos=[random_video(2)]), "2 <video> placeholders but 1 videos"),
        (dict(text="no placeholder", videos=[random_video(2)]), "0 <video> placeholders"),
        (dict(text="<image>", images=[]), "1 <image> placeholders but 0 images"),
        (dict(text="<video>", videos=[np.zeros((2, 8, 8, 3), np.int16)]), "uint8"),
        (dict(text="<video>", videos=[np.full((2, 8, 8, 3), 7.0, np.float32)]),
         r"uint8 pixels or floats in \[0, 1\], got float32 values in \[7, 7\]"),
        (dict(text="<video>", videos=[np.zeros((2, 8, 8), np.uint8)]), "shape"),
        (dict(text="<video>", videos=b"clip.mp4"), r"videos must be a video \(a file path, .* got bytes"),
        (dict(text="<image>", images={"image": 1}), r"images must be an image \(a file path, .* got dict"),
        (dict(text="<video>", videos=[3]), "an item is a int"),
    ],
)
def test_input_errors(processor, kwargs, message):
    with pytest.raises(StormError, match=message):
        processor(**kwargs)


def test_chat_template_and_assistant_labels(processor):
    video = random_video(8)
    conversation = video_question(video) + [
        {"role": "assistant", "content": "A"},
        {"role": "user", "content": "And the second one?"},
        {"role": "assistant", "content": [{"type": "text", "text": "B. blue"}]},
    ]
    prompt = processor.apply_chat_template(conversation)
    assert prompt.count("<video>") == 1 and "<|im_start|>assistant\nA<|im_end|>" in prompt
    gen = processor.apply_chat_template(conversation[:1], add_generation_prompt=True)
    assert gen.endswith("<|im_start|>assistant\n")

    ex = processor.build_training_example(conversation)
    ids, labels = ex["input_ids"][0], ex["labels"][0]
    assert ids.shape == labels.shape and ex["pixel_values_videos"].shape == (1, 8, 3, 64, 64)
    assert int((ids == processor.video_token_id).sum()) == processor.num_visual_tokens(8)
    kept = labels != -100
    assert torch.equal(labels[kept], ids[kept])
    assert processor.tokenizer.decode(labels[kept]) == "A<|im_end|>B. blue<|im_end|>"
    # the same ids as the plain processor call on the rendered prompt
    plain = processor(text=prompt, videos=[video])
    assert torch.equal(plain["input_ids"][0], ids)


def test_llama_style_template(llama_parts):
    proc = make_processor(llama_parts)
    conversation = video_question(random_video(2)) + [{"role": "assistant", "content": "C"}]
    prompt = proc.apply_chat_template(conversation)
    assert prompt.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<video>")
    ex = proc.build_training_example(conversation)
    ids = ex["input_ids"][0]
    assert int((ids == proc.tokenizer.bos_token_id).sum()) == 1  # bos not added twice
    kept = ex["labels"][0] != -100
    assert proc.tokenizer.decode(ex["labels"][0][kept]) == "C<|eot_id|>"


def test_save_load_round_trip(processor, tmp_path):
    from transformers import AutoProcessor

    from storm_vlm import StormConfig  # noqa: F401  (registration)

    processor.save_pretrained(tmp_path)
    # AutoProcessor needs the model's config.json to know the model type
    StormConfig(vision_config=dict(model_type="siglip_vision_model", image_size=64, patch_size=8),
                text_config=dict(model_type="qwen2")).save_pretrained(tmp_path)
    back = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(back, StormProcessor)
    assert back.layout == processor.layout
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["visual_token_layout"] == processor.layout.to_dict() and "visual_token_config" not in saved
    assert back.chat_template == processor.chat_template
    videos = [random_video(6)]
    a, b = processor(text="<video> q", videos=videos), back(text="<video> q", videos=videos)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_frames_at_the_processor_size_skip_the_resize_with_the_same_pixels(processor):
    size = processor.image_size
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(3)]
    reference = processor.image_processor(images=frames, return_tensors="pt")["pixel_values"].float()
    fast = processor(text="<video>", videos=[np.stack(frames)], return_tensors="pt")["pixel_values_videos"][0]
    torch.testing.assert_close(fast, reference, atol=1e-6, rtol=0)
    # other sizes still go through the image processor's resize
    big = rng.integers(0, 256, (2, size + 8, size + 8, 3), dtype=np.uint8)
    out = processor(text="<video>", videos=[big], return_tensors="pt")["pixel_values_videos"]
    torch.testing.assert_close(out[0], processor.image_processor(images=list(big), return_tensors="pt")["pixel_values"].float())


def test_file_paths_are_read_as_one_video_or_image_each(processor, media):
    video, image = media
    clip = load_video(video, num_frames=4, min_side=processor.image_size)
    ref = processor(text="<video><image>", videos=[clip], images=[load_image(image)])
    for videos, images in (([str(video)], [str(image)]), (str(video), str(image)), (video, image)):
        out = processor(text="<video><image>", videos=videos, images=images, num_frames=4)
        assert out.keys() == ref.keys() and all(torch.equal(out[k], ref[k]) for k in ref)
    # fps mode: a frame every 1/2 s of the 1.5 s clip
    assert processor(text="<video>", videos=[video], fps=2)["pixel_values_videos"].shape[1] == 3


def test_chat_template_sends_other_keywords_to_the_processor(processor, media):
    video, _ = media
    kw = dict(add_generation_prompt=True, tokenize=True, return_dict=True)
    batch = [video_question(random_video(4)), [{"role": "user", "content": "a text-only prompt"}]]
    for how in (dict(padding_side="right"), dict(processor_kwargs={"padding_side": "right"})):
        mask = processor.apply_chat_template(batch, **kw, **how)["attention_mask"]
        assert mask[1, 0] == 1 and mask[1, -1] == 0, how  # the shorter row is padded on the right

    def frames(item, **extra):
        conversation = [{"role": "user", "content": [{"type": "video", "path": str(video), **item},
                                                     {"type": "text", "text": "q"}]}]
        return processor.apply_chat_template(conversation, **kw, **extra)["pixel_values_videos"].shape[1]

    assert frames({}) == 32
    assert frames({}, fps=2) == frames({"fps": 2}) == 3  # to load_video; the item's own setting too
    assert frames({}, processor_kwargs={"num_frames": 4}) == frames({"num_frames": 4}) == 4
    # what the template reads stays a template variable; an unknown keyword is an error
    template = "{{ greeting }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert processor.apply_chat_template([{"role": "user", "content": "x"}], chat_template=template,
                                         greeting="Hi ") == "Hi x"
    with pytest.raises(TypeError, match="num_frame"):
        processor.apply_chat_template(video_question(random_video(2)), tokenize=True, num_frame=4)


def test_tokenized_conversation_is_a_batch_of_one(processor):
    conversation = video_question(random_video(2))
    ids = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
    full = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert ids.dim() == 2 and torch.equal(ids, full["input_ids"])


def test_channels_first_and_float_pixels_give_the_same_inputs(processor):
    video = random_video(3)
    t = torch.from_numpy(video)
    ref = processor(text="<video><image>", videos=[video], images=[video[0]])
    for videos, images in (
        ([t.permute(0, 3, 1, 2)], [t[0].permute(2, 0, 1)]),  # channels-first tensors
        ([list(t.permute(0, 3, 1, 2))], [Image.fromarray(video[0])]),  # a list of channels-first frames
        ([video.astype(np.float32) / 255], [video[0] / 255]),  # floats in [0, 1]
    ):
        out = processor(text="<video><image>", videos=videos, images=images)
        assert all(torch.equal(out[k], ref[k]) for k in ref)


@pytest.mark.parametrize("height", [1, 3])
def test_frames_one_or_three_pixels_tall_are_read_channels_last(processor, height):
    frame = np.zeros((height, 8, 3), np.uint8)
    frame[:, :4] = 255  # left half white
    pixels = processor(text="<video>", videos=[np.stack([frame] * 2)])["pixel_values_videos"][0, 0]
    assert pixels[:, :, :24].mean() > 0.95 and pixels[:, :, -24:].mean() < -0.95


def test_tokenizer_options_apply_to_the_expanded_rows(processor):
    texts, videos = ["<video>\nWhat colour is the circle?", "Hi"], [random_video(2)]
    n = processor.num_visual_tokens(2)
    padded = processor(text=texts, videos=videos, padding="max_length", max_length=n + 16)
    assert padded["input_ids"].shape == (2, n + 16)
    assert processor(text=texts, videos=videos, pad_to_multiple_of=16)["input_ids"].shape[1] % 16 == 0
    assert list(processor(text="a", return_attention_mask=False)) == ["input_ids"]
    with pytest.raises(TypeError, match="retun_tensors"):
        processor(text="a", retun_tensors="np")
    # truncation counts the visual tokens and never cuts a placeholder
    full = processor(text=texts[0], videos=videos)["input_ids"][0]
    cut = processor(text=texts, videos=videos, truncation=True, max_length=n + 2, padding_side="right")
    assert torch.equal(cut["input_ids"][0], full[: n + 2])
    with pytest.raises(StormError, match="would cut visual placeholders from row 0"):
        processor(text=texts, videos=videos, truncation=True, max_length=n - 1)
    tokenizer = processor.tokenizer
    tokenizer.truncation_side = "left"
    try:
        kept = processor(text="Describe this: <video>", videos=videos, truncation=True, max_length=n)["input_ids"]
    finally:
        tokenizer.truncation_side = "right"
    assert kept.tolist() == [[processor.video_token_id] * n]


def test_padding_side_is_the_tokenizers(processor, tmp_path):
    assert processor.padding_side == processor.tokenizer.padding_side == "left"
    try:
        processor.tokenizer.padding_side = "right"
        assert processor(text=["a", "b c d"])["attention_mask"][0, 0] == 1
        processor.save_pretrained(tmp_path)
        assert json.loads((tmp_path / "processor_config.json").read_text())["padding_side"] == "right"
        assert StormProcessor.from_pretrained(tmp_path).padding_side == "right"
    finally:
        processor.padding_side = "left"
    assert processor.tokenizer.padding_side == "left"
