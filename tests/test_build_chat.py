import json

import numpy as np
import pytest
import torch
from helpers import load, random_video, write_mp4

from storm_vlm.cli import main


@pytest.fixture(scope="module")
def built(qwen2_parts, tmp_path_factory):
    vision_dir, llm_dir = qwen2_parts
    out = tmp_path_factory.mktemp("build") / "storm"
    rc = main(["build", "--vision", str(vision_dir), "--llm", str(llm_dir), "--out", str(out),
               "--projector", "mamba", "--layers", "1", "--temporal-pool", "2", "--spatial-pool", "2"])
    assert rc == 0
    return out


def test_build_writes_a_loadable_model(built, qwen2_parts, capsys):
    from transformers import AutoTokenizer

    assert (built / "model.safetensors").is_file() and (built / "processor_config.json").is_file()
    config = json.loads((built / "config.json").read_text())
    assert config["model_type"] == "storm" and config["temporal_pool_size"] == 2
    assert config["spatial_pool_stride"] == 2 and config["projector_num_layers"] == 1
    model, processor = load(built)
    original = AutoTokenizer.from_pretrained(qwen2_parts[1])
    tok = processor.tokenizer
    assert "<video>" not in original.get_vocab() and len(tok) == len(original) + 2
    assert model.config.video_token_id == tok.convert_tokens_to_ids("<video>")
    assert model.get_input_embeddings().weight.shape[0] == len(tok)  # embeddings resized
    assert processor.layout == model.config.visual_token_layout and processor.layout.temporal_pool_size == 2
    assert processor.num_visual_tokens(8) == model.config.num_visual_tokens(8) == 4 * 4
    # the pretrained LLM weights are kept, only the new rows are added
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(qwen2_parts[1])
    old = lm.get_input_embeddings().weight
    assert torch.equal(model.get_input_embeddings().weight[: old.shape[0]], old)


def test_build_prints_parameter_counts(qwen2_parts, tmp_path, capsys):
    vision_dir, llm_dir = qwen2_parts
    assert main(["build", "--vision", str(vision_dir), "--llm", str(llm_dir), "--out", str(tmp_path / "m"),
                 "--projector", "mlp"]) == 0
    out = capsys.readouterr().out
    for part in ("vision_tower", "projector", "language_model"):
        assert part in out


@pytest.mark.parametrize(
    "which,message",
    [
        ("missing-vision", "does not exist"),
        ("llm-as-vision", "expected SigLIP"),
        ("vision-as-llm", "not a causal LM"),
        ("bad-pool", "spatial_pool_stride 3"),
        ("existing-out", "already exists"),
    ],
)
def test_build_errors_are_one_clear_message(which, message, qwen2_parts, tmp_path, capsys):
    vision_dir, llm_dir = map(str, qwen2_parts)
    out = tmp_path / "out"
    args = {"missing-vision": [str(tmp_path / "nope"), llm_dir], "llm-as-vision": [llm_dir, llm_dir],
            "vision-as-llm": [vision_dir, vision_dir]}.get(which, [vision_dir, llm_dir])
    extra = ["--spatial-pool", "3"] if which == "bad-pool" else []
    if which == "existing-out":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    rc = main(["build", "--vision", args[0], "--llm", args[1], "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err
    if which == "existing-out":
        assert (out / "keep.txt").read_text() == "mine"


def _reference_answer(model, processor, clip, question, temporal_sample_stride, max_new_tokens):
    """The answer straight from the public API: chat template -> processor -> generate -> decode."""
    import torch

    conversation = [{"role": "user", "content": [{"type": "video", "video": clip}, {"type": "text", "text": question}]}]
    inputs = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           temporal_sample_stride=temporal_sample_stride)
    with torch.inference_mode():
        out = model.generate(**inputs, temporal_sample_stride=temporal_sample_stride,
                             max_new_tokens=max_new_tokens, do_sample=False)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


@pytest.mark.parametrize("codec", ["mpeg4", "libx264"])
def test_chat_answers_about_an_mp4(qwen2_mamba_dir, tmp_path, capsys, codec):
    from storm_vlm.video import load_video

    frames = np.zeros((12, 48, 64, 3), np.uint8)
    frames[:, 10:30, 20:40] = (220, 30, 30)
    try:
        video = write_mp4(tmp_path / "clip.mp4", frames, codec=codec)
    except Exception as exc:  # an encoder missing from this PyAV build
        pytest.skip(f"{codec} encoder unavailable: {exc}")
    rc = main(["chat", str(qwen2_mamba_dir), str(video), "-q", "What colour is the square?", "--frames", "6",
               "--temporal-sample", "2", "--max-new-tokens", "4", "--dtype", "float32"])
    printed = capsys.readouterr().out.strip()
    assert rc == 0
    model, processor = load(qwen2_mamba_dir)
    clip = load_video(video, num_frames=6)
    assert printed == _reference_answer(model, processor, clip, "What colour is the square?", 2, 4)


def test_chat_on_a_broken_video_exits_2_with_the_message(qwen2_mamba_dir, tmp_path, capsys):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(100))
    rc = main(["chat", str(qwen2_mamba_dir), str(bad), "-q", "What happens?"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "broken.mp4" in err and "Traceback" not in err


def test_chat_on_a_missing_model_folder(tmp_path, capsys):
    video = write_mp4(tmp_path / "v.mp4", random_video(4, 32, 32))
    rc = main(["chat", str(tmp_path / "nope"), str(video), "-q", "?"])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_build_from_a_full_siglip_folder_and_refuses_incomplete_checkpoints(qwen2_parts, tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import SiglipConfig, SiglipModel

    from storm_vlm.builder import build_storm
    from storm_vlm.errors import StormError

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=32, patch_size=8)
    full = SiglipModel(SiglipConfig(vision_config=vision, text_config=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=50,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)))
    full.save_pretrained(tmp_path / "siglip")
    model, processor = build_storm(tmp_path / "siglip", qwen2_parts[1])
    assert model.config.vision_config.hidden_size == 32 and processor.image_processor.size["height"] == 32
    assert torch.equal(model.vision_tower.embeddings.patch_embedding.weight,
                       full.vision_model.embeddings.patch_embedding.weight)

    weights = load_file(tmp_path / "siglip" / "model.safetensors")
    del weights["vision_model.encoder.layers.1.mlp.fc1.weight"]
    save_file(weights, tmp_path / "siglip" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(StormError, match="lacks 1 weights"):
        build_storm(tmp_path / "siglip", qwen2_parts[1])


def test_build_tiny_model_is_the_build_path(tmp_path):
    from storm_vlm.demo.tiny import build_tiny_model

    out = build_tiny_model(tmp_path / "tiny", projector_type="mlp", llm="llama", temporal_pool_size=2)
    model, processor = load(out)
    assert model.config.projector_type == "mlp" and model.config.text_config.model_type == "llama"
    assert model.config.temporal_pool_size == 2 and processor.num_visual_tokens(8) == 4 * 16
    inputs = processor(text="<video>\nWhat colour?", videos=[random_video(8)])
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


def test_build_causal_makes_a_streamable_model(qwen2_parts, tmp_path):
    from storm_vlm.cli import main
    from storm_vlm.model.configuration import StormConfig

    out = tmp_path / "causal"
    assert main(["build", "--vision", str(qwen2_parts[0]), "--llm", str(qwen2_parts[1]), "--out", str(out),
                 "--layers", "1", "--causal"]) == 0
    assert StormConfig.from_pretrained(out).projector_bidirectional is False


def test_save_storm_never_replaces_a_file_nor_a_model_folder_unasked(qwen2_parts, tmp_path):
    from storm_vlm.builder import build_storm, save_storm
    from storm_vlm.errors import StormError

    model, processor = build_storm(*qwen2_parts, projector_type="mlp")
    notes = tmp_path / "model"
    notes.write_text("notes")
    for overwrite in (False, True):
        with pytest.raises(StormError, match="is a file, not a folder"):
            save_storm(model, processor, notes, overwrite=overwrite)
    assert notes.read_text() == "notes"
    out = save_storm(model, processor, tmp_path / "folder")
    with pytest.raises(StormError, match="not empty"):
        save_storm(model, processor, out)
    assert save_storm(model, processor, out, overwrite=True) == out and (out / "config.json").is_file()
