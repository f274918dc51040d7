"""`storm-vlm build` on folders as they arrive from a download or a copy, not only as released.

A shard cut short or left as a Git LFS pointer, a config.json that no longer fits its weights, a
quantized release, an LLM whose tokenizer already has the <image> / <video> placeholders, an
output folder that holds the inputs, and a save killed midway. Folders are tiny copies of the real
layouts (`write_llm` / `write_siglip` of test_build_real_folders).
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import load, random_video, video_question
from test_build_real_folders import LLMS, QWEN_SPECIAL, write_llm, write_siglip

from storm_vlm.builder import build_storm, save_storm
from storm_vlm.cli import main
from storm_vlm.model.processing import StormProcessor

LFS_POINTER = (b"version https://git-lfs.github.com/spec/v1\n"
               b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 3877821664\n")


@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
    """A full SigLIP folder (google/siglip-* layout), 4 x 4 patches."""
    return write_siglip(tmp_path_factory.mktemp("vision") / "siglip-so400m-patch14-448", 56, 14)


def _build(vision, llm, out, *extra) -> int:
    return main(["build", "--vision", str(vision), "--llm", str(llm), "--out", str(out), "--layers", "1", *extra])


def _cut_llm_shard(folder):
    shard = folder / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-64])
    return "model-00002-of-00002.safetensors"


def _lfs_pointer_vision(folder):
    (folder / "model.safetensors").write_bytes(LFS_POINTER)
    return "model.safetensors"


def _edited_image_size(folder):
    config = json.loads((folder / "config.json").read_text())
    config["vision_config"]["image_size"] = 84  # 6 x 6 patches; the stored position table has 4 x 4
    (folder / "config.json").write_text(json.dumps(config))
    return "position_embedding"


def _quantized(folder):
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = dict(bits=4, group_size=128, quant_method="awq", version="gemm", zero_point=True)
    (folder / "config.json").write_text(json.dumps(config))
    return "quantized (awq)"


# case -> (damage the vision folder?, damage(folder) -> what the message says, weights ever loaded?)
DAMAGED = {
    "llm-shard-cut-short": (False, _cut_llm_shard, False),
    "vision-lfs-pointer": (True, _lfs_pointer_vision, False),
    "vision-config-edited": (True, _edited_image_size, True),
    "llm-quantized-awq": (False, _quantized, False),
}


@pytest.mark.parametrize("case", list(DAMAGED))
def test_a_damaged_or_unusable_part_is_one_message_naming_it(case, siglip, tmp_path, capsys, monkeypatch):
    damage_vision, damage, loads = DAMAGED[case]
    llm = write_llm(tmp_path / "Qwen2-7B-Instruct", **LLMS["Qwen2-7B-Instruct"])  # sharded, bf16
    vision = siglip
    if damage_vision:
        vision = write_siglip(tmp_path / "siglip", 56, 14)
    said = damage(vision if damage_vision else llm)
    if not loads:  # found from the folder's files alone, before a long weight load
        monkeypatch.setattr("storm_vlm.builder.AutoModelForCausalLM.from_pretrained",
                            lambda *a, **k: pytest.fail("LLM weights loaded before the folder was checked"))
    rc = _build(vision, llm, tmp_path / "out")
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and said in err, err
    assert str(vision if damage_vision else llm) in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("out", ["llm", "parent"])
def test_overwrite_never_deletes_the_pretrained_parts(out, siglip, tmp_path, capsys):
    llm = write_llm(tmp_path / "models" / "Qwen2.5-0.5B-Instruct", **LLMS["Qwen2.5-0.5B-Instruct"])
    before = sorted(p.name for p in llm.iterdir())
    rc = _build(siglip, llm, llm if out == "llm" else llm.parent, "--overwrite")
    err = capsys.readouterr().err
    assert rc == 2 and "is or holds the pretrained folder" in err, err
    assert sorted(p.name for p in llm.iterdir()) == before
    assert not (llm / "processor_config.json").exists()


def test_a_killed_save_leaves_no_model_under_the_final_name_and_the_next_save_clears_it(siglip, tmp_path,
                                                                                       monkeypatch):
    llm = write_llm(tmp_path / "Qwen2.5-0.5B-Instruct", **LLMS["Qwen2.5-0.5B-Instruct"])
    model, processor = build_storm(siglip, llm, projector_type="mlp")
    out = tmp_path / "storm"
    stale = tmp_path / ".storm.partial-x1y2z3"  # what a save killed (SIGKILL, OOM) midway leaves
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    seen = []
    save = StormProcessor.save_pretrained

    def watched(self, folder, *a, **k):  # the model is written; the final name must not exist yet
        seen.append(out.exists())
        return save(self, folder, *a, **k)

    monkeypatch.setattr(StormProcessor, "save_pretrained", watched)
    assert save_storm(model, processor, out) == out
    assert seen == [False] and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_a_tokenizer_that_already_has_the_placeholders_keeps_them(siglip, tmp_path):
    """A LLaVA-style Qwen2 LLM folder: <image> and <video> are special tokens of its tokenizer, with
    rows in its (padded) embedding table: they are reused, nothing is resized, and the built folder
    loads with the Auto classes and answers, stopping at <|im_end|>."""
    spec = dict(LLMS["Qwen2-7B-Instruct"], specials=QWEN_SPECIAL + ["<image>", "<video>"])
    llm = write_llm(tmp_path / "LLaVA-Qwen2-7B", **spec)
    assert _build(siglip, llm, tmp_path / "out") == 0
    model, processor = load(tmp_path / "out")
    tok = processor.tokenizer
    original = json.loads((llm / "tokenizer.json").read_text())["model"]["vocab"]
    assert (model.config.image_token_id, model.config.video_token_id) == (original["<image>"], original["<video>"])
    assert model.get_input_embeddings().weight.shape[0] == json.loads((llm / "config.json").read_text())["vocab_size"]
    conversation = video_question(random_video(3, 56, 56))
    inputs = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True)
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(model.config.video_token_id) == processor.num_visual_tokens(3)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, sequence_bias={(end,): 100.0})
    assert out[0, len(ids):].tolist() == [end]
