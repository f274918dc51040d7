"""A model folder written by storm-vlm 0.1.0 (tests/data/model-0.1.0, see tests/data/README.md)
still loads and answers exactly as 0.1.0 did."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

import storm_vlm  # noqa: F401  (registers the STORM classes)
from storm_vlm.model.compression import VisualTokenLayout

DATA = Path(__file__).parent / "data"
EXPECTED = json.loads((DATA / "model-0.1.0-expected.json").read_text())


@pytest.fixture(scope="module")
def legacy():
    folder = DATA / "model-0.1.0"
    return AutoModelForImageTextToText.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)


def _inputs(processor, stride):
    frames = np.random.default_rng(0).integers(0, 256, size=(8, 40, 48, 3), dtype=np.uint8)
    conversation = [{"role": "user", "content": [{"type": "video", "video": frames},
                                                 {"type": "text", "text": EXPECTED["question"]}]}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         temporal_sample_stride=stride)


def test_the_0_1_0_processor_fields_become_the_models_layout(legacy):
    model, processor = legacy
    assert processor.layout == model.config.visual_token_layout == VisualTokenLayout(4, 2, 1, 1)


@pytest.mark.parametrize("stride", [1, 2])
def test_a_0_1_0_folder_answers_as_0_1_0_did(legacy, stride):
    model, processor = legacy
    want = EXPECTED[f"stride{stride}"]
    inputs = _inputs(processor, stride)
    assert inputs["input_ids"].shape[1] == want["num_input_ids"]
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1]
        generated = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        # 0.1.0's call named the stride twice; that still works
        twice = model.generate(**inputs, temporal_sample_stride=stride, max_new_tokens=6, do_sample=False)
    torch.testing.assert_close(logits, torch.tensor(want["last_logits"]), rtol=0, atol=2e-4)
    assert generated[0, inputs["input_ids"].shape[1]:].tolist() == want["generated"]
    assert torch.equal(generated, twice)


def test_saving_again_writes_the_layout_and_loads_back(legacy, tmp_path):
    model, processor = legacy
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["visual_token_layout"] == VisualTokenLayout(4, 2, 1, 1).to_dict()
    assert AutoProcessor.from_pretrained(tmp_path).layout == processor.layout
