"""Assemble a STORM model + processor from local pretrained parts (what `storm-vlm build` runs).

`build_storm(vision_dir, llm_dir, ...)` loads a SigLIP vision tower (with its image processor) and a
causal LM (with its tokenizer) from ordinary transformers folders, adds the `<video>` / `<image>`
special tokens, resizes the embeddings if needed and puts a freshly initialised projector between
them. The chat template (ChatML or Llama-3, from the tokenizer's turn tokens) ends each answer with a
token generation stops at; an LLM whose tokenizer has neither format's tokens is refused.
`save_storm(model, processor, out_dir)` writes both (safetensors) atomically. A folder that is not
a full-precision pretrained release (quantized, .bin-only, weight files cut short, weights that do not
fit its config.json) is refused with one message naming it, before or instead of a long load, and so
is one that names Python code of its own (`auto_map`: never run, trust_remote_code=False) or holds a
symbolic link out of itself.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer, SiglipVisionModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.models.siglip import SiglipImageProcessorPil
from transformers.utils import is_protobuf_available, is_sentencepiece_available

from storm_vlm.errors import ConfigError, StormError
from storm_vlm.inference import quiet_transformers
from storm_vlm.model.configuration import StormConfig
from storm_vlm.model.modeling import StormForConditionalGeneration
from storm_vlm.model.processing import (
    CHATML_VISUAL_TEMPLATE,
    LLAMA3_VISUAL_TEMPLATE,
    StormProcessor,
    add_placeholder_tokens,
    default_chat_template,
)
from storm_vlm.precision import parse_precision
from storm_vlm.utils import (
    IMAGE_TOKEN,
    VIDEO_TOKEN,
    check_links_inside,
    check_loaded_weights,
    no_custom_code,
    publish_dir,
    safetensors_problem,
)

__all__ = ["build_storm", "save_storm", "check_out_dir", "load_parts", "read_part_configs"]

# The turn markers each of STORM's chat templates writes as text; the last one ends a turn.
TURN_MARKERS = {
    CHATML_VISUAL_TEMPLATE: ("<|im_start|>", "<|im_end|>"),
    LLAMA3_VISUAL_TEMPLATE: ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
}


def _check_dir(path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise StormError(f"{what} folder {path} does not exist")
    if not path.is_dir():
        raise StormError(f"{what} folder {path} is not a directory")
    if not (path / "config.json").is_file():
        raise StormError(f"{what} folder {path} has no config.json (expected a transformers model folder)")
    check_links_inside(path, f"{what} folder")
    return path


def _storage_dtype(dtype):
    """The dtype weights are stored in (a precision name, storm_vlm.precision); None: as the LLM is stored."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = parse_precision("auto" if dtype is None else dtype)
    return None if name == "auto" else getattr(torch, name)


def read_part_configs(vision_dir, llm_dir):
    """Check both folders and return (vision config, LLM config) without loading weights.

    Every transformers load here passes trust_remote_code=False: code a folder names is never run.
    """

    vision_dir = _check_dir(vision_dir, "vision")
    llm_dir = _check_dir(llm_dir, "LLM")
    try:
        with no_custom_code(vision_dir, "vision folder"):
            vcfg = AutoConfig.from_pretrained(vision_dir, trust_remote_code=False)
    except StormError:
        raise
    except (OSError, ValueError) as exc:
        raise StormError(f"vision folder {vision_dir}: cannot read config.json ({exc})") from exc
    if vcfg.model_type not in ("siglip", "siglip_vision_model"):
        hint = ("; SigLIP2 NaFlex (variable-resolution) towers are not supported, the fixed-resolution "
                "SigLIP2 releases (model_type 'siglip') are") if vcfg.model_type.startswith("siglip2") else ""
        raise StormError(
            f"vision folder {vision_dir} holds a {vcfg.model_type!r} model; expected SigLIP "
            f"(model_type 'siglip' or 'siglip_vision_model'){hint}"
        )
    if vcfg.model_type == "siglip":
        vcfg = vcfg.vision_config
    try:
        with no_custom_code(llm_dir, "LLM folder"):
            lcfg = AutoConfig.from_pretrained(llm_dir, trust_remote_code=False)
    except StormError:
        raise
    except (OSError, ValueError) as exc:
        raise StormError(f"LLM folder {llm_dir}: cannot read config.json ({exc})") from exc
    if lcfg.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise StormError(f"LLM folder {llm_dir} holds a {lcfg.model_type!r} model, which is not a causal LM")
    quantized = getattr(lcfg, "quantization_config", None)
    if quantized:
        method = quantized.get("quant_method") if isinstance(quantized, dict) else quantized.quant_method
        raise StormError(f"LLM folder {llm_dir} holds a quantized ({method}) checkpoint, which cannot be "
                         "trained nor saved as STORM; build from the full-precision release")
    return vcfg, lcfg


def _check_safetensors(folder: Path, what: str) -> None:
    """Weights are read from safetensors only (a pickle can run code): say so for a .bin-only folder.

    The header of each file transformers reads (model.safetensors or its model-*-of-*.safetensors
    shards; not e.g. a consolidated.safetensors duplicate) is parsed and must cover the file exactly, so
    a copy or download cut short, or a Git LFS pointer left by a clone without LFS, is named before any
    weights load.
    """
    if not any(folder.glob("*.safetensors")) and any(folder.glob("pytorch_model*.bin")):
        raise StormError(f"{what} folder {folder} holds PyTorch .bin weights only; STORM reads safetensors only "
                         "(pickles can run code): use the release's *.safetensors files")
    for path in sorted(folder.glob("model*.safetensors")):
        if (problem := safetensors_problem(path)) is not None:
            raise StormError(f"{what} folder {folder}: {path.name} is not a complete safetensors file ({problem}); "
                             "a copy or download cut short, or a Git LFS pointer (run `git lfs pull`)")


def _load_tokenizer(llm_dir: Path):
    """The LLM folder's tokenizer, or a StormError saying why there is none."""
    try:
        with no_custom_code(llm_dir, "LLM folder"):
            tokenizer = AutoTokenizer.from_pretrained(llm_dir, trust_remote_code=False)
    except StormError:
        raise
    except (OSError, ValueError, TypeError, ImportError) as exc:
        spm_only = (llm_dir / "tokenizer.model").is_file() and not (llm_dir / "tokenizer.json").is_file()
        if spm_only and not (is_sentencepiece_available() and is_protobuf_available()):
            # transformers then reports a failed tiktoken fallback, which hides the real cause
            raise StormError(
                f"LLM folder {llm_dir}: its tokenizer is a SentencePiece tokenizer.model only; reading it needs "
                "the sentencepiece and protobuf packages (or put the LLM's tokenizer.json beside it)"
            ) from exc
        raise StormError(f"LLM folder {llm_dir}: cannot load the tokenizer ({exc})") from exc
    if not tokenizer("What colour is the square?", add_special_tokens=False)["input_ids"]:
        # transformers builds an empty tokenizer from a folder without tokenizer files
        raise StormError(f"LLM folder {llm_dir}: has no usable tokenizer (no tokenizer.json / tokenizer.model "
                         "there, or it encodes text to nothing); copy the LLM's tokenizer files into it")
    return tokenizer


def _chat_format(tokenizer, llm_dir) -> tuple[str, str]:
    """(STORM's chat template for this tokenizer, the token that ends a turn in it).

    The templates write their turn markers as text, so each must be one token of the LLM's
    vocabulary: split into pieces (Vicuna's or GPT-2's vocabulary has no such tokens) the model
    could never stop at the end of its turn, so such an LLM is refused.
    """
    template = default_chat_template(tokenizer)
    markers = TURN_MARKERS[template]
    vocab = tokenizer.get_vocab()
    if not all(m in vocab for m in markers):
        raise StormError(
            f"LLM folder {llm_dir}: its tokenizer has neither ChatML turn tokens (<|im_start|>, <|im_end|>: "
            "Qwen2 / Qwen2.5) nor Llama-3 ones (<|start_header_id|>, <|eot_id|>), which STORM's chat templates "
            "use; build from a Qwen2 / Qwen2.5 or Llama-3 LLM"
        )
    return template, markers[-1]


def load_parts(vision_dir, llm_dir, dtype="auto"):
    """Load (vision_tower, image_processor, language_model, tokenizer) from two local folders.

    The vision folder may hold a SigLIP vision model or a full SigLIP (image-text) model; only the
    vision transformer is kept (without the pooling head, which STORM never uses).
    """

    vision_dir, llm_dir = Path(vision_dir), Path(llm_dir)
    vcfg, lcfg = read_part_configs(vision_dir, llm_dir)
    torch_dtype = _storage_dtype(dtype)

    with quiet_transformers():
        tokenizer = _load_tokenizer(llm_dir)  # before the weights: its faults are found in seconds
        _chat_format(tokenizer, llm_dir)
        _check_safetensors(vision_dir, "vision")
        _check_safetensors(llm_dir, "LLM")
        try:
            vision, info = SiglipVisionModel.from_pretrained(
                vision_dir, vision_use_head=False, dtype=torch_dtype or "auto", output_loading_info=True,
                use_safetensors=True, ignore_mismatched_sizes=True,  # never a pickle; mismatches: check_loaded_weights
            )
        except (OSError, ValueError) as exc:
            raise StormError(f"vision folder {vision_dir}: cannot load the SigLIP weights ({exc})") from exc
        check_loaded_weights(vision_dir, "vision folder", info)
        try:
            language_model, info = AutoModelForCausalLM.from_pretrained(
                llm_dir, dtype=torch_dtype or "auto", output_loading_info=True, use_safetensors=True,
                ignore_mismatched_sizes=True, trust_remote_code=False,
            )
        except (OSError, ValueError) as exc:
            raise StormError(
                f"LLM folder {llm_dir}: cannot load a causal LM of type {lcfg.model_type!r} ({exc})"
            ) from exc
        check_loaded_weights(llm_dir, "LLM folder", info)
        try:
            with no_custom_code(vision_dir, "vision folder"):
                image_processor = AutoImageProcessor.from_pretrained(vision_dir, trust_remote_code=False)
        except StormError:
            raise
        except (OSError, ValueError):  # no preprocessor_config.json: SigLIP's defaults
            size = vision.config.image_size
            image_processor = SiglipImageProcessorPil(
                size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
            )
    return vision, image_processor, language_model, tokenizer


def build_storm(
    vision_dir,
    llm_dir,
    projector_type: str = "mamba",
    projector_num_layers: int = 2,
    temporal_pool_size: int = 1,
    spatial_pool_stride: int = 1,
    dtype="auto",
    seed: int | None = 0,
    **config_overrides,
):
    """Build (model, processor) from a SigLIP folder and a causal-LM folder.

    The projector is freshly initialised (seeded with `seed`); the vision tower and the projector
    take the LLM's dtype. Extra `config_overrides` go to `StormConfig` (e.g. vision_batch_size,
    projector_d_state, temporal_sample_stride).
    """
    vcfg, lcfg = read_part_configs(vision_dir, llm_dir)
    fields = dict(projector_type=projector_type, projector_num_layers=projector_num_layers,
                  temporal_pool_size=temporal_pool_size, spatial_pool_stride=spatial_pool_stride, **config_overrides)
    # Validate the STORM fields before loading any weights.
    try:
        StormConfig(vision_config=vcfg, text_config=lcfg, **fields)
    except ConfigError as exc:  # e.g. a spatial_pool_stride that does not divide the token grid
        raise ConfigError(
            f"cannot build STORM from vision folder {vision_dir} and LLM folder {llm_dir}: {exc}"
        ) from exc
    vision, image_processor, language_model, tokenizer = load_parts(vision_dir, llm_dir, dtype)
    llm_dtype = language_model.get_input_embeddings().weight.dtype
    vision.to(llm_dtype)

    add_placeholder_tokens(tokenizer)
    vocab = language_model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > vocab:
        language_model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    config = StormConfig(
        vision_config=vision.config,
        text_config=language_model.config,
        video_token_id=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        tie_word_embeddings=bool(getattr(language_model.config, "tie_word_embeddings", False)),
        **fields,
    )
    config.dtype = llm_dtype
    if seed is not None:
        torch.manual_seed(seed)
    model = StormForConditionalGeneration.from_parts(config, vision, language_model)
    template, end_of_turn = _chat_format(tokenizer, llm_dir)
    gen = language_model.generation_config
    gen.pad_token_id = tokenizer.pad_token_id
    end_id = tokenizer.convert_tokens_to_ids(end_of_turn)
    gen.eos_token_id = _with_stop(gen.eos_token_id, tokenizer.eos_token_id, end_id)
    model.generation_config = gen
    processor = StormProcessor(
        image_processor, tokenizer, chat_template=template, visual_token_layout=config.visual_token_layout
    )
    return model, processor


def _with_stop(eos, fallback, end_of_turn: int):
    """The LLM's eos id(s) (`fallback` where it has none) plus the chat template's end-of-turn id.

    A base LLM's generation config stops only at its end of text (Qwen2.5's <|endoftext|>, Llama-3's
    <|end_of_text|>), while STORM's answers end with the template's <|im_end|> / <|eot_id|>.
    """
    eos = fallback if eos is None else eos
    ids = list(eos) if isinstance(eos, (list, tuple)) else [] if eos is None else [eos]
    if end_of_turn not in ids:
        ids.append(end_of_turn)
    return ids[0] if len(ids) == 1 else ids


def check_out_dir(out_dir, overwrite: bool = False, sources=()) -> Path:
    """An existing non-empty `out_dir` is a StormError unless `overwrite=True`; a file there always is
    (overwrite replaces a model folder, never a file), and so is a folder that is or holds one of
    `sources` (the pretrained folders the model is built from, which overwriting would delete)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise StormError(f"output folder {out_dir} exists and is a file, not a folder")
    for source in filter(None, sources):
        source = Path(source)
        if source.exists() and out_dir.resolve() in (source.resolve(), *source.resolve().parents):
            raise StormError(f"output folder {out_dir} is or holds the pretrained folder {source} the model is "
                             "built from, which it would delete; choose another output folder")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise StormError(f"output folder {out_dir} already exists and is not empty (use --overwrite)")
    return out_dir


def save_storm(model, processor, out_dir, overwrite: bool = False) -> Path:
    """Write model (safetensors) + processor to `out_dir` atomically; returns the folder.

    An existing non-empty `out_dir` is an error unless `overwrite=True`, and so is the folder of a
    part the model was built from (or one above it). The files are written to a hidden
    `.NAME.partial-*` folder beside `out_dir` and renamed once complete; one left by a save that
    was killed is removed by the next save to `out_dir`.
    """
    sources = (model.vision_tower.config.name_or_path, model.language_model.config.name_or_path)
    out_dir = check_out_dir(out_dir, overwrite, sources)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{out_dir.name}.partial-"
    for stale in out_dir.parent.iterdir():
        if stale.name.startswith(prefix):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        publish_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
