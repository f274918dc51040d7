"""StormProcessor takes the inputs a user of transformers' VLM processors (LLaVA-OneVision,
Qwen2-VL) hands it: image content items as transformers reads them (a path, a data URL, base64
text), and visual inputs given one list per text, which must be that text's own."""

import base64

import pytest
import torch
from helpers import random_video
from PIL import Image
from transformers import AutoProcessor

from storm_vlm.errors import StormError


@pytest.fixture(scope="module")
def processor(qwen2_mamba_dir):
    return AutoProcessor.from_pretrained(qwen2_mamba_dir)


def ask(processor, item):
    conversation = [{"role": "user", "content": [item, {"type": "text", "text": "What is it?"}]}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True)


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_image_items_given_as_base64_or_a_data_url_read_as_their_file(processor, tmp_path):
    path = tmp_path / "picture.png"
    Image.fromarray(random_video(1)[0]).save(path)
    text = base64.b64encode(path.read_bytes()).decode()
    ref = ask(processor, {"type": "image", "path": str(path)})
    for item in ({"type": "image", "base64": text}, {"type": "image", "url": f"data:image/png;base64,{text}"}):
        assert same(ask(processor, item), ref), item
    assert torch.equal(processor(text="<image>", images=path.read_bytes())["pixel_values"], ref["pixel_values"])
    for item, message in (({"type": "image", "url": "https://example.com/a.png"},
                           "image 0: https://example.com/a.png: URLs are not fetched"),
                          ({"type": "image", "base64": "not base64!"}, "image 0: not valid base64"),
                          ({"type": "image", "url": "data:image/png,abc"}, "a data URL must be base64-encoded")):
        with pytest.raises(StormError, match=message):
            ask(processor, item)


def test_visual_inputs_given_per_text_must_be_that_texts_own(processor):
    texts, video, image = ["<video>\nWhat moves?", "Say hi."], random_video(2), random_video(1)[0]
    assert same(processor(text=texts, videos=[[video], []]), processor(text=texts, videos=[video]))
    with pytest.raises(StormError, match=r"text 0 has 1 <video> placeholders but 0 videos were given for it"):
        processor(text=texts, videos=[[], [video]])  # would give text 0 the video of text 1
    with pytest.raises(StormError, match=r"text 0 has 1 <image> placeholders but 0 images were given for it"):
        processor(text=["<image> a", "b"], images=[[], [image]])
