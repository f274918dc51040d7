"""Tiny random-weight "pretrained parts" for tests, demos and smoke runs (no downloads).

`make_tiny_parts(root)` writes two ordinary transformers folders -- a tiny SigLIP vision
tower (with its image processor) and a tiny causal LM (Qwen2 or Llama) with a tokenizer
trained on the spot -- exactly the kind of folders a user passes to `storm-vlm build`.
`build_tiny_model(out_dir)` then assembles a STORM model from them through the same code
path as `storm-vlm build`.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.models.siglip import SiglipImageProcessorPil

from storm_vlm.builder import build_storm, save_storm

# Sentences covering the synthetic benchmark's vocabulary (colours, shapes, directions,
# counts, order, option letters) plus everyday English, so the trained tokenizer splits
# benchmark prompts and answers into sensible tokens.
_COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "cyan", "magenta", "pink", "gray", "brown"]
_SHAPES = ["circle", "square", "triangle", "star", "rectangle", "ball", "box", "disk", "diamond", "cross", "object", "shape"]
_DIRECTIONS = ["left", "right", "up", "down", "top", "bottom", "clockwise", "counterclockwise", "towards", "away", "stationary", "still"]
_NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10"]
_ORDER = ["first", "second", "third", "fourth", "last", "before", "after", "then", "next", "earlier", "later", "beginning", "end", "middle", "order", "sequence"]
_COMMON = (
    "the a an of to in on at is are was were be been it this that these those what which who "
    "how many much when where why does do did has have had will would can could should may "
    "and or not no yes with from by for as into over under between during while video frame "
    "frames clip scene appears appear appeared moves moving moved move direction colour color "
    "shape count times time change changes changed happens happened event events question "
    "answer option options choice choices letter given directly describe description image "
    "picture see seen show shows shown there here you your I me my we our they them their he "
    "she his her its person man woman people car dog cat tree sky water background foreground "
    "screen side corner centre center speed fast slow quickly slowly large small big size "
    "grows shrinks bigger smaller disappears flashes blinks bounces rotates spins stops starts "
    "total number same different other each every all some any most more less only also "
    "Please please Answer Question Options Describe What Which How When Where Is Are Does The"
).split()

_CORPUS_TEMPLATES = [
    "What colour is the {shape} that appears {order}?",
    "Which direction does the {colour} {shape} move?",
    "How many times does the {colour} {shape} flash?",
    "How many {shape}s appear in the video?",
    "The {colour} {shape} moves {direction} across the frame.",
    "In what order do the shapes appear? {colour} {shape}, then {colour2} {shape2}.",
    "Which object appears {order}: the {colour} {shape} or the {colour2} {shape2}?",
    "There are {number} {colour} {shape}s in the video.",
    "Does the {colour} {shape} move {direction} or {direction2}?",
]


def tiny_corpus() -> list[str]:
    """Training sentences for the tiny tokenizer: benchmark-style questions, options and words."""
    lines: list[str] = []
    combos = itertools.product(_COLOURS, _SHAPES)
    for i, (colour, shape) in enumerate(combos):
        fill = dict(
            colour=colour,
            shape=shape,
            colour2=_COLOURS[(i + 3) % len(_COLOURS)],
            shape2=_SHAPES[(i + 5) % len(_SHAPES)],
            direction=_DIRECTIONS[i % len(_DIRECTIONS)],
            direction2=_DIRECTIONS[(i + 1) % len(_DIRECTIONS)],
            order=_ORDER[i % len(_ORDER)],
            number=_NUMBERS[i % len(_NUMBERS)],
        )
        for template in _CORPUS_TEMPLATES:
            lines.append(template.format(**fill))
    for i, word in enumerate(_COLOURS + _SHAPES + _DIRECTIONS + _NUMBERS + _ORDER):
        lines.append(f"A. {word}\nB. {_COLOURS[i % len(_COLOURS)]}\nC. {_SHAPES[i % len(_SHAPES)]}\nD. {_NUMBERS[i % len(_NUMBERS)]}")
    letters = "ABCD"
    for i in range(200):
        letter = letters[i % 4]
        lines.append(f"Answer with the option's letter from the given choices directly. {letter}")
        lines.append(f"({letter}) {letter}. The answer is {letter}.")
        lines.append(f"Best option: ({letter})")
    lines.append(" ".join(_COMMON))
    lines.extend(" ".join(_COMMON[i : i + 12]) + "." for i in range(0, len(_COMMON), 6))
    return lines


CHATML_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

# Text-only chat templates in the style of the real models' tokenizers.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


def make_tiny_tokenizer(llm: str = "qwen2", vocab_size: int = 1024):
    """A byte-level BPE `PreTrainedTokenizerFast` trained on `tiny_corpus()`.

    `llm="qwen2"` gives ChatML special tokens (pad = eos = `<|endoftext|>`, turns end with
    `<|im_end|>`); `llm="llama"` gives Llama-3 style tokens (`<|begin_of_text|>`, `<|eot_id|>`).
    """
    specials = CHATML_SPECIAL if llm == "qwen2" else LLAMA3_SPECIAL
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tiny_corpus(), trainer=trainer)
    if llm == "qwen2":
        kwargs = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML_TEMPLATE)
    else:
        kwargs = dict(
            bos_token="<|begin_of_text|>",
            eos_token="<|eot_id|>",
            pad_token="<|end_of_text|>",
            chat_template=LLAMA3_TEMPLATE,
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


def make_tiny_parts(
    root: str | os.PathLike,
    llm: str = "qwen2",
    image_size: int = 64,
    patch_size: int = 8,
    vision_hidden: int = 64,
    vision_layers: int = 3,
    vision_heads: int = 4,
    llm_hidden: int = 64,
    llm_layers: int = 2,
    llm_heads: int = 4,
    llm_kv_heads: int = 2,
    llm_intermediate: int = 128,
    vocab_size: int = 1024,
    llm_init_std: float = 0.02,
    seed: int = 0,
) -> tuple[Path, Path]:
    """Write a tiny SigLIP folder and a tiny causal-LM folder under `root`; returns (vision_dir, llm_dir).

    Weights are random (seeded). The vision folder holds a `SiglipVisionModel` and a
    `SiglipImageProcessorPil` resizing to `image_size`; the LLM folder holds a
    `Qwen2ForCausalLM` or `LlamaForCausalLM` plus a freshly trained tokenizer with a chat template.
    `llm_init_std` is the LLM's `initializer_range` (transformers' default 0.02); a larger one
    (e.g. 0.1) lets a from-scratch tiny LLM learn to read the visual tokens in far fewer steps.
    """
    if llm not in ("qwen2", "llama"):
        raise ValueError(f"llm must be 'qwen2' or 'llama', got {llm!r}")
    root = Path(root)
    vision_dir, llm_dir = root / "tiny-siglip", root / f"tiny-{llm}"

    torch.manual_seed(seed)
    vcfg = SiglipVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_hidden * 2,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
    )
    SiglipVisionModel(vcfg).save_pretrained(vision_dir)
    SiglipImageProcessorPil(
        size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    ).save_pretrained(vision_dir)

    tokenizer = make_tiny_tokenizer(llm, vocab_size=vocab_size)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=llm_hidden,
        intermediate_size=llm_intermediate,
        num_hidden_layers=llm_layers,
        num_attention_heads=llm_heads,
        num_key_value_heads=llm_kv_heads,
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=False,
        initializer_range=llm_init_std,
    )
    if llm == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(llm_dir)
    tokenizer.save_pretrained(llm_dir)
    return vision_dir, llm_dir


def build_tiny_model(
    out_dir: str | os.PathLike,
    projector_type: str = "mamba",
    llm: str = "qwen2",
    parts_root: str | os.PathLike | None = None,
    parts_kwargs: dict | None = None,
    overwrite: bool = True,
    **storm_config_overrides,
) -> Path:
    """Make tiny parts and build a tiny STORM model in `out_dir` (model + processor); returns out_dir.

    Runs the same code path as `storm-vlm build` (`storm_vlm.builder.build_storm` + `save_storm`).
    Parts go to `parts_root` (default: `<out_dir>.parts`). `storm_config_overrides` go to
    StormConfig (e.g. projector_num_layers=1, temporal_pool_size=2, spatial_pool_stride=2).
    Defaults: 64 px frames, 8 px patches -> 16 visual tokens per frame; 2-layer 64-wide LLM.
    """
    out_dir = Path(out_dir)
    parts_root = Path(parts_root) if parts_root is not None else out_dir.with_name(out_dir.name + ".parts")
    vision_dir, llm_dir = make_tiny_parts(parts_root, llm=llm, **(parts_kwargs or {}))
    model, processor = build_storm(vision_dir, llm_dir, projector_type=projector_type, **storm_config_overrides)
    save_storm(model, processor, out_dir, overwrite=overwrite)
    return out_dir
