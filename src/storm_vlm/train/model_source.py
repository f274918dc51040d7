"""Where a training run's model comes from: `init_from`, `build` or `tiny` (see TrainConfig).

- init_from: a saved STORM model folder (config.json + safetensors + processor), e.g. the
  previous stage's `output_dir/final`; a stage output_dir itself is accepted too (its `final/`).
  Before the load its files are checked (sizes against its manifest.json, complete safetensors).
- build: {vision: DIR, llm: DIR, projector: mamba|mlp, **StormConfig fields} -- a local SigLIP
  folder and a local causal-LM folder assembled by `storm_vlm.builder.build_storm` (what
  `storm-vlm build` runs; the projector is freshly initialised with the run's seed).
- tiny: kwargs of `storm_vlm.demo.tiny.build_tiny_model` -- a tiny random model, written once to
  `output_dir/source-model/` (rank 0, atomically) and loaded from there by every rank.

After loading, `temporal_pool_size` and `model_overrides` (token-compression settings only) are
applied to the model config, and the processor takes the resulting visual-token layout.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from transformers import AutoConfig

from storm_vlm.builder import build_storm
from storm_vlm.demo.tiny import build_tiny_model
from storm_vlm.errors import ConfigError, StormError
from storm_vlm.model.configuration import StormConfig
from storm_vlm.model.modeling import StormForConditionalGeneration
from storm_vlm.model.processing import StormProcessor, default_chat_template
from storm_vlm.train.checkpoint import CheckpointInvalid, check_model_files
from storm_vlm.train.config import TrainConfig
from storm_vlm.train.stages import apply_stage
from storm_vlm.utils import check_loaded_weights, check_model_dir, did_you_mean, no_custom_code

# StormConfig fields a config may change on an existing model (they add no weights).
OVERRIDABLE = ("temporal_pool_size", "spatial_pool_stride", "temporal_sample_stride", "vision_batch_size")
SOURCE_DIR = "source-model"


def resolve_model_dir(path: str | Path, key: str = "init_from") -> Path:
    """The STORM model folder `path` names (itself or its final/), checked before the long load: a
    model of another type, or a weight file cut short (a copy or a stage that stopped), is a
    ConfigError naming the key and the file."""
    p = Path(path)
    folder = next((c for c in (p, p / "final") if (c / "config.json").is_file()), None)
    if folder is None:
        raise ConfigError(f"key {key!r}: {str(p)!r} is not a STORM model folder (no config.json in it or in its final/)")
    try:
        check_model_dir(folder)
    except StormError as exc:
        raise ConfigError(f"key {key!r}: {exc}") from None
    try:
        check_model_files(folder)
    except (CheckpointInvalid, OSError) as exc:
        raise ConfigError(f"key {key!r}: {folder} is damaged: {exc}") from None
    return folder


def _vision_config(vision_dir: Path):
    try:
        with no_custom_code(vision_dir, "key 'build.vision': folder", ConfigError):
            cfg = AutoConfig.from_pretrained(vision_dir, trust_remote_code=False)
    except ConfigError:
        raise
    except (OSError, ValueError) as exc:
        raise ConfigError(f"key 'build.vision': cannot read a model config from {str(vision_dir)!r} ({exc})") from None
    return getattr(cfg, "vision_config", cfg)  # a full SigLIP folder holds text + vision configs


def _text_config(llm_dir: Path):
    try:
        with no_custom_code(llm_dir, "key 'build.llm': folder", ConfigError):
            return AutoConfig.from_pretrained(llm_dir, trust_remote_code=False)
    except ConfigError:
        raise
    except (OSError, ValueError) as exc:
        raise ConfigError(f"key 'build.llm': cannot read a model config from {str(llm_dir)!r} ({exc})") from None


def storm_config_for_build(build: dict, video_token_id=None, image_token_id=None):
    """A StormConfig from `build:` (vision/llm folders' configs + StormConfig fields)."""
    extra = {k: v for k, v in build.items() if k not in ("vision", "llm", "projector")}
    text_config = _text_config(Path(build["llm"]))
    try:
        return StormConfig(
            vision_config=_vision_config(Path(build["vision"])),
            text_config=text_config,
            tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
            projector_type=build.get("projector", "mamba"),
            video_token_id=video_token_id,
            image_token_id=image_token_id,
            **extra,
        )
    except TypeError as exc:
        raise ConfigError(f"key 'build': {exc}") from None


def instantiate_on_meta(cfg: TrainConfig):
    """The stage's model built on the meta device from `build:` configs only (no weights, no tokenizer).

    For checking real-size recipes: parameter counts and trainable groups without memory.
    """
    if cfg.build is None:
        raise ConfigError("key 'build': instantiating on the meta device needs a build: source")
    check_source_keys(cfg)
    text_vocab = _text_config(Path(cfg.build["llm"])).vocab_size
    config = storm_config_for_build(cfg.build, video_token_id=text_vocab - 2, image_token_id=text_vocab - 1)
    _apply_overrides(config, cfg)
    with torch.device("meta"):  # LoRA adapters are created on meta too (no memory, no init)
        model = StormForConditionalGeneration(config)
        apply_stage(model, cfg)
    return model


def _storm_fields() -> set[str]:
    own = set(StormConfig.__dict__.get("__annotations__", {}))
    return own - {"vision_config", "text_config", "video_token_id", "image_token_id"}


def check_source_keys(cfg: TrainConfig) -> None:
    """Unknown keys under `build:` / `tiny:` are ConfigErrors (StormConfig would silently keep them)."""
    for key, fn, section in (("build", build_storm, cfg.build), ("tiny", build_tiny_model, cfg.tiny)):
        if section is None:
            continue
        params = set(inspect.signature(fn).parameters) - {"vision_dir", "llm_dir", "out_dir", "dtype", "seed"}
        allowed = params | _storm_fields() | ({"vision", "llm", "projector"} if key == "build" else set())
        allowed.discard("storm_config_overrides")
        allowed.discard("config_overrides")
        for k in section:
            if k not in allowed:
                raise ConfigError(f"key '{key}.{k}': unknown option{did_you_mean(str(k), allowed)} "
                                  f"(known: {', '.join(sorted(allowed))})")


def _build_from_parts(build: dict, seed: int):
    """Load SigLIP + LLM (+ tokenizer) from local folders and assemble a STORM model (float32 master weights)."""
    extra = {k: v for k, v in build.items() if k not in ("vision", "llm", "projector")}
    try:
        return build_storm(build["vision"], build["llm"], projector_type=build.get("projector", "mamba"),
                           dtype="float32", seed=seed, **extra)
    except TypeError as exc:
        raise ConfigError(f"key 'build': {exc}") from None
    except ConfigError:
        raise
    except StormError as exc:  # a missing / unreadable vision or LLM folder: it is this key's value
        raise ConfigError(f"key 'build': {exc}") from None


def _materialise_tiny(cfg: TrainConfig, env) -> Path:
    """Rank 0 writes the tiny model once under output_dir (atomically); everyone then loads it."""
    target = Path(cfg.output_dir) / SOURCE_DIR
    if env.is_main and not (target / "config.json").is_file():
        try:
            build_tiny_model(target, parts_root=Path(cfg.output_dir) / "source-parts", **cfg.tiny)
        except TypeError as exc:
            raise ConfigError(f"key 'tiny': {exc}") from None
    env.barrier()
    return target


def _apply_overrides(config, cfg: TrainConfig) -> None:
    updates = dict(cfg.model_overrides)
    for key in updates:
        if key not in OVERRIDABLE:
            raise ConfigError(f"key 'model_overrides.{key}': not changeable on a loaded model (choose from {', '.join(OVERRIDABLE)})")
    if cfg.temporal_pool_size is not None:
        updates["temporal_pool_size"] = cfg.temporal_pool_size
    old = {k: getattr(config, k) for k in updates}
    for k, v in updates.items():
        setattr(config, k, v)
    try:
        config.validate_storm_fields()
    except StormError as exc:
        for k, v in old.items():
            setattr(config, k, v)
        raise ConfigError(f"key 'model_overrides'/'temporal_pool_size': {exc}") from None


def load_model_and_processor(cfg: TrainConfig, env):
    """(model in float32 on CPU, processor) for the run, with compression overrides applied."""
    check_source_keys(cfg)
    if cfg.build is not None:
        model, processor = _build_from_parts(cfg.build, cfg.seed)
    else:
        folder = resolve_model_dir(cfg.init_from) if cfg.init_from is not None else _materialise_tiny(cfg, env)
        with no_custom_code(folder, "model folder"):
            model, info = StormForConditionalGeneration.from_pretrained(
                folder, dtype=torch.float32, use_safetensors=True, output_loading_info=True)  # never a pickle
            processor = StormProcessor.from_pretrained(folder, trust_remote_code=False)
        check_loaded_weights(folder, "model folder", info)
    _apply_overrides(model.config, cfg)
    processor.layout = model.config.visual_token_layout
    if not processor.chat_template or "generation" not in processor.chat_template:
        # Labels come from the template's {% generation %} spans; a text-only tokenizer template has none.
        processor.chat_template = default_chat_template(processor.tokenizer)
    return model, processor
