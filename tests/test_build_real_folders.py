"""`storm-vlm build` on folders shaped like the real releases people download.

`write_llm` / `write_siglip` write a tiny copy of a released folder: the same model_type, config keys and
special values (tied embeddings, llama3 / yarn rope scaling, sliding-window keys, eos lists in
generation_config.json, the chat template in tokenizer_config.json or in chat_template.jinja, a
tokenizer without a pad token, sharded safetensors with an index, a full SigLIP folder), with tiny
widths, random weights and a tokenizer trained on the spot. The build must then either work end to
end (save, load, generate, stop at the LLM's own end-of-turn token) or refuse with one message
naming the folder and the cause.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import random_video, video_question, write_mp4
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast, SiglipConfig, SiglipModel,
                          SiglipVisionConfig, SiglipVisionModel)

from storm_vlm.cli import main
from storm_vlm.demo.tiny import tiny_corpus
from storm_vlm.inference import load_model

# Tiny LLM widths every fixture shares (the real values of everything else are kept).
TINY_LLM = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2)

QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|video_pad|>"]
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
LLAMA2_SPECIAL = ["<unk>", "<s>", "</s>"]

QWEN_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{- message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def _train_tokenizer(specials: list[str], bos: str | None = None, vocab_size: int = 400) -> Tokenizer:
    """A byte-level BPE trained on the tiny corpus; with `bos`, a post-processor that prepends it
    (as the Llama releases' tokenizer.json does)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(tiny_corpus(), trainer=trainer)
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    return tok


def write_llm(folder: Path, config: dict, generation: dict, tokenizer: dict, specials: list[str],
              template_file: str | None = None, vocab_pad: int = 0, shard: bool = False) -> Path:
    """A causal-LM folder as a release ships it.

    config / generation / tokenizer: the release's config.json, generation_config.json and
    tokenizer_config.json entries, with special tokens given by name (`"<|im_end|>"`) where the
    release has ids, or lists of names; they are replaced by the trained tokenizer's ids.
    template_file: the chat template written to chat_template.jinja instead (newer releases).
    vocab_pad: embedding rows beyond the tokenizer (Qwen pads its vocabulary); shard: several
    safetensors files plus model.safetensors.index.json.
    """
    folder.mkdir(parents=True)
    tok = _train_tokenizer(specials, bos=tokenizer.get("bos_token"))

    def ids(value):
        if isinstance(value, list):
            return [tok.token_to_id(v) for v in value]
        return tok.token_to_id(value) if isinstance(value, str) else value

    config = {k: ids(v) if k.endswith("token_id") else v for k, v in config.items()}
    config = {**config, **TINY_LLM, "vocab_size": tok.get_vocab_size() + vocab_pad}
    (folder / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    dtype = getattr(torch, config["torch_dtype"])
    state = {k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight")  # a tied release stores the table once
    _save_weights(folder, state, shard)
    gen = {k: ids(v) if k.endswith("token_id") else v for k, v in generation.items()}
    (folder / "generation_config.json").write_text(json.dumps(gen))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.save_pretrained(folder)
    (folder / "special_tokens_map.json").unlink(missing_ok=True)
    if template_file is not None:
        (folder / "chat_template.jinja").write_text(template_file)
    added = {str(tok.token_to_id(t)): dict(content=t, lstrip=False, normalized=False, rstrip=False,
                                           single_word=False, special=True) for t in specials}
    (folder / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": added, **tokenizer}))
    return folder


def _save_weights(folder: Path, state: dict, shard: bool) -> None:
    if not shard:
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        return
    names = sorted(state)
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for i, part in enumerate(halves, 1):
        file = f"model-{i:05d}-of-{len(halves):05d}.safetensors"
        save_file({k: state[k] for k in part}, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    total = sum(v.numel() * v.element_size() for v in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


QWEN2_COMMON = dict(
    architectures=["Qwen2ForCausalLM"], attention_dropout=0.0, bos_token_id="<|endoftext|>",
    eos_token_id="<|im_end|>", hidden_act="silu", initializer_range=0.02, max_position_embeddings=32768,
    model_type="qwen2", rms_norm_eps=1e-06, rope_theta=1000000.0, torch_dtype="bfloat16",
    transformers_version="4.43.1", use_cache=True, use_sliding_window=False,
)
QWEN_TOKENIZER = dict(
    bos_token=None, chat_template=QWEN_TEMPLATE, clean_up_tokenization_spaces=False, eos_token="<|im_end|>",
    errors="replace", model_max_length=131072, pad_token="<|endoftext|>", split_special_tokens=False,
    tokenizer_class="Qwen2Tokenizer", unk_token=None,
)
QWEN_GENERATION = dict(bos_token_id="<|endoftext|>", pad_token_id="<|endoftext|>", do_sample=True,
                       eos_token_id=["<|im_end|>", "<|endoftext|>"], repetition_penalty=1.05,
                       temperature=0.7, top_p=0.8, top_k=20)
LLAMA3_COMMON = dict(
    architectures=["LlamaForCausalLM"], attention_bias=False, attention_dropout=0.0,
    bos_token_id="<|begin_of_text|>", eos_token_id=["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
    hidden_act="silu", initializer_range=0.02, max_position_embeddings=131072, mlp_bias=False,
    model_type="llama", pretraining_tp=1, rms_norm_eps=1e-05, rope_theta=500000.0, torch_dtype="bfloat16",
    transformers_version="4.45.0.dev0", use_cache=True,
)
LLAMA3_TOKENIZER = dict(
    bos_token="<|begin_of_text|>", clean_up_tokenization_spaces=True, eos_token="<|eot_id|>",
    model_input_names=["input_ids", "attention_mask"], model_max_length=131072,
    tokenizer_class="PreTrainedTokenizerFast",
)
LLAMA3_GENERATION = dict(bos_token_id="<|begin_of_text|>", do_sample=True, temperature=0.6, top_p=0.9,
                         eos_token_id=["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"])


def _llama3_rope(factor: float) -> dict:
    return dict(factor=factor, high_freq_factor=4.0, low_freq_factor=1.0,
                original_max_position_embeddings=8192, rope_type="llama3")


# name -> write_llm keywords (a tiny copy of that release's folder)
LLMS = {
    "Qwen2-7B-Instruct": dict(
        config={**QWEN2_COMMON, "max_window_layers": 28, "sliding_window": 131072, "tie_word_embeddings": False},
        generation=QWEN_GENERATION, tokenizer=QWEN_TOKENIZER, specials=QWEN_SPECIAL, vocab_pad=24, shard=True),
    "Qwen2.5-0.5B-Instruct": dict(
        config={**QWEN2_COMMON, "max_window_layers": 21, "sliding_window": 32768, "tie_word_embeddings": True},
        generation=QWEN_GENERATION, tokenizer=QWEN_TOKENIZER, specials=QWEN_SPECIAL, vocab_pad=24),
    "Qwen2.5-7B-Instruct-yarn": dict(  # the README's long-context recipe adds rope_scaling
        config={**QWEN2_COMMON, "max_window_layers": 28, "sliding_window": 131072, "tie_word_embeddings": False,
                "rope_scaling": dict(factor=4.0, original_max_position_embeddings=32768, type="yarn")},
        generation=QWEN_GENERATION, tokenizer=QWEN_TOKENIZER, specials=QWEN_SPECIAL, vocab_pad=24, shard=True),
    "Qwen2.5-0.5B": dict(  # a base model: its own eos is <|endoftext|>
        config={**QWEN2_COMMON, "eos_token_id": "<|endoftext|>", "max_window_layers": 24,
                "sliding_window": 32768, "tie_word_embeddings": True},
        generation=dict(bos_token_id="<|endoftext|>", eos_token_id="<|endoftext|>", do_sample=False,
                        max_new_tokens=2048),
        tokenizer={**QWEN_TOKENIZER, "eos_token": "<|endoftext|>"}, specials=QWEN_SPECIAL, vocab_pad=24),
    "Llama-3.1-8B-Instruct": dict(
        config={**LLAMA3_COMMON, "rope_scaling": _llama3_rope(8.0), "tie_word_embeddings": False},
        generation=LLAMA3_GENERATION, tokenizer={**LLAMA3_TOKENIZER, "chat_template": LLAMA3_TEMPLATE},
        specials=LLAMA3_SPECIAL, shard=True),
    "Llama-3.2-1B-Instruct": dict(
        config={**LLAMA3_COMMON, "head_dim": 8, "rope_scaling": _llama3_rope(32.0), "tie_word_embeddings": True},
        generation=LLAMA3_GENERATION, tokenizer=LLAMA3_TOKENIZER, template_file=LLAMA3_TEMPLATE,
        specials=LLAMA3_SPECIAL),
    "vicuna-7b-v1.5": dict(
        config=dict(architectures=["LlamaForCausalLM"], bos_token_id="<s>", eos_token_id="</s>", hidden_act="silu",
                    initializer_range=0.02, max_position_embeddings=4096, model_type="llama", pad_token_id=0,
                    pretraining_tp=1, rms_norm_eps=1e-05, rope_scaling=None, tie_word_embeddings=False,
                    torch_dtype="float16", transformers_version="4.31.0", use_cache=True),
        generation=dict(bos_token_id="<s>", eos_token_id="</s>", pad_token_id=0, max_length=4096,
                        temperature=0.9, top_p=0.6, do_sample=True),
        tokenizer=dict(add_bos_token=True, add_eos_token=False, bos_token="<s>", eos_token="</s>", pad_token=None,
                       unk_token="<unk>", legacy=False, model_max_length=4096, padding_side="right",
                       tokenizer_class="LlamaTokenizer"),
        specials=LLAMA2_SPECIAL),
}


TINY_VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
SIGLIP_PREPROCESSOR = dict(do_normalize=True, do_rescale=True, do_resize=True, image_mean=[0.5] * 3,
                           image_std=[0.5] * 3, image_processor_type="SiglipImageProcessor",
                           processor_class="SiglipProcessor", resample=3, rescale_factor=1 / 255)


def write_siglip(folder: Path, image_size: int, patch_size: int, full: bool = True) -> Path:
    """A SigLIP folder: the full image-text model (as google/siglip-* ship it) or the vision tower
    alone (as VLM repos ship it), with the release's preprocessor_config.json."""
    vision = dict(TINY_VISION, image_size=image_size, patch_size=patch_size)
    torch.manual_seed(0)
    if full:
        text = dict(TINY_VISION, vocab_size=64, max_position_embeddings=16)
        SiglipModel(SiglipConfig(vision_config=vision, text_config=text)).save_pretrained(folder)
    else:
        SiglipVisionModel(SiglipVisionConfig(**vision)).save_pretrained(folder)
    size = {"height": image_size, "width": image_size}
    (folder / "preprocessor_config.json").write_text(json.dumps({**SIGLIP_PREPROCESSOR, "size": size}))
    return folder


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    """Tiny SigLIP folders shaped as released: full image-text (google/siglip-so400m-patch14-448's
    14 px patches, a 4 x 4 grid here), a vision tower alone without a preprocessor_config.json, and
    an odd grid (siglip-so400m-patch14-384's 27 x 27 patches; 3 x 3 here)."""
    root = tmp_path_factory.mktemp("towers")
    vision_only = write_siglip(root / "siglip-vision-only", 56, 14, full=False)
    (vision_only / "preprocessor_config.json").unlink()
    return {"full": write_siglip(root / "siglip-so400m-patch14-448", 56, 14), "vision-only": vision_only,
            "odd-grid": write_siglip(root / "siglip-so400m-patch14-384", 42, 14)}


BUILDABLE = [("Qwen2-7B-Instruct", "full"), ("Qwen2.5-0.5B-Instruct", "vision-only"),
             ("Qwen2.5-7B-Instruct-yarn", "full"), ("Qwen2.5-0.5B", "full"),
             ("Llama-3.1-8B-Instruct", "vision-only"), ("Llama-3.2-1B-Instruct", "full"),
             ("Qwen2.5-0.5B-Instruct", "odd-grid")]


@pytest.mark.parametrize("release,tower", BUILDABLE)
def test_release_folder_builds_loads_and_stops_at_its_end_of_turn(release, tower, towers, tmp_path):
    llm_dir = write_llm(tmp_path / release, **LLMS[release])
    out = tmp_path / "storm"
    assert main(["build", "--vision", str(towers[tower]), "--llm", str(llm_dir), "--out", str(out),
                 "--layers", "1"]) == 0
    model, processor = load_model(out, device="cpu", precision="float32")
    tok, lm_config = processor.tokenizer, AutoConfig.from_pretrained(llm_dir)

    # the LLM's config survives the round trip: rope scaling, sliding-window keys, tying
    text = model.config.text_config
    for key in ("rope_parameters", "sliding_window", "use_sliding_window", "max_window_layers", "head_dim",
                "tie_word_embeddings"):
        assert getattr(text, key, None) == getattr(lm_config, key, None), key
    # the pretrained rows are kept; <video> / <image> have rows; a tied head stays the embedding table
    original = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=torch.float32).get_input_embeddings().weight
    embeddings, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert embeddings.shape[0] == max(len(tok), original.shape[0]) > tok.convert_tokens_to_ids("<video>")
    assert torch.equal(embeddings[: original.shape[0]], original)
    assert (head is embeddings) == bool(lm_config.tie_word_embeddings)

    # a video turn renders in the LLM's own conversation format, with one BOS at most
    llama = "Llama" in release
    size = model.config.vision_config.image_size
    conversation = video_question(random_video(4, size, size))
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    user_turn = "<|start_header_id|>user<|end_header_id|>\n\n" if llama else "<|im_start|>user\n"
    assert user_turn + "<video>\n" in prompt
    inputs = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True)
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(model.config.video_token_id) == processor.num_visual_tokens(4)
    assert tok.bos_token is None or ids.count(tok.bos_token_id) == 1
    # generation stops at the template's end-of-turn token (made the likeliest here)
    end_id = tok.convert_tokens_to_ids("<|eot_id|>" if llama else "<|im_end|>")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, sequence_bias={(end_id,): 100.0})
    assert out[0, len(ids):].tolist() == [end_id]


def test_chat_runs_on_a_model_built_from_a_tied_llama(towers, tmp_path):
    """Llama-3.2-1B-Instruct's shape: tied embeddings resized for <video> / <image>, its chat
    template in chat_template.jinja, no pad token."""
    llm_dir = write_llm(tmp_path / "Llama-3.2-1B-Instruct", **LLMS["Llama-3.2-1B-Instruct"])
    assert main(["build", "--vision", str(towers["full"]), "--llm", str(llm_dir), "--out", str(tmp_path / "m"),
                 "--projector", "mlp"]) == 0
    video = write_mp4(tmp_path / "v.mp4", random_video(6, 48, 64))
    assert main(["chat", str(tmp_path / "m"), str(video), "-q", "What colour is the square?", "--frames", "4",
                 "--max-new-tokens", "3", "--dtype", "float32"]) == 0


def _naflex(folder: Path) -> Path:
    folder.mkdir()
    config = {"model_type": "siglip2", "text_config": {"model_type": "siglip2_text_model", "vocab_size": 256000},
              "vision_config": {"model_type": "siglip2_vision_model", "num_patches": 256, "patch_size": 16}}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _sentencepiece_only(folder: Path) -> Path:
    write_llm(folder, **LLMS["Qwen2.5-0.5B-Instruct"])
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.model").write_bytes(b"\n\x05hello")  # vicuna ships a SentencePiece model only
    return folder


def _bin_only(folder: Path) -> Path:
    write_llm(folder, **LLMS["Qwen2.5-0.5B-Instruct"])
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    return folder


# case -> (make the vision folder or None for the full tower, make the LLM folder or None for Qwen2.5,
#          which folder the message names, what it says)
REFUSED = {
    "vicuna-no-chat-tokens": (None, lambda d: write_llm(d, **LLMS["vicuna-7b-v1.5"]), "llm", "neither ChatML"),
    "siglip2-naflex": (_naflex, None, "vision", "NaFlex"),
    "sentencepiece-only": (None, _sentencepiece_only, "llm", "SentencePiece tokenizer.model"),
    "bin-only": (None, _bin_only, "llm", "safetensors only"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unusable_folders_are_refused_with_one_message(case, towers, tmp_path, capsys, monkeypatch):
    from transformers.utils import import_utils

    make_vision, make_llm, named, cause = REFUSED[case]
    if case == "sentencepiece-only" and import_utils.is_sentencepiece_available() and \
            import_utils.is_protobuf_available():
        pytest.skip("sentencepiece and protobuf are installed here: the tokenizer.model is read")
    vision_dir = make_vision(tmp_path / "vision") if make_vision else towers["full"]
    llm_dir = (make_llm or (lambda d: write_llm(d, **LLMS["Qwen2.5-0.5B-Instruct"])))(tmp_path / "llm")
    # the cause is found before any weights are read
    monkeypatch.setattr("storm_vlm.builder.AutoModelForCausalLM.from_pretrained",
                        lambda *a, **k: pytest.fail("LLM weights loaded before the folder was checked"))
    rc = main(["build", "--vision", str(vision_dir), "--llm", str(llm_dir), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and cause in err, err
    assert str(vision_dir if named == "vision" else llm_dir) in err
    assert not (tmp_path / "out").exists()
