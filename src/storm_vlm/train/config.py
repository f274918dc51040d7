"""Training configuration: YAML file + `--set key=value` overrides -> a validated `TrainConfig`.

A config file is a flat mapping of the keys below. It may also hold a `stages:` mapping
(`{align: {...}, sft: {...}, long: {...}}`): the section named by `stage` is merged over the
top-level keys, so one file can describe a whole align -> sft -> long chain
(`configs/tiny-synthetic.yaml`). `--set` overrides win over both; nested keys use dots
(`--set lora.r=16`) and values are parsed as YAML (`--set precision=bfloat16`, `--set lora=null`).
Relative paths are resolved against the current working directory.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from storm_vlm.errors import ConfigError, StormError
from storm_vlm.precision import parse_precision
from storm_vlm.utils import check_int, did_you_mean, yaml_problem

STAGES = ("align", "sft", "long")
PARTS = ("vision_tower", "projector", "language_model")
# Parts trained by default in each stage (paper / VILA recipe): alignment trains only the
# projector on image-caption pairs; SFT and long-video fine-tuning train everything.
DEFAULT_TRAIN_PARTS = {
    "align": ("projector",),
    "sft": ("vision_tower", "projector", "language_model"),
    "long": ("vision_tower", "projector", "language_model"),
}
LORA_KEYS = {"r", "alpha", "dropout", "target_modules", "bias"}
BUILD_REQUIRED = ("vision", "llm")


@dataclass
class LoraConfig:
    """PEFT LoRA on the language model (the projector still trains fully)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    bias: str = "none"


@dataclass
class TrainConfig:
    # --- required ---
    stage: str
    output_dir: str
    train_file: str
    media_root: str
    num_frames: int
    max_steps: int
    save_steps: int
    seed: int
    # --- model source: exactly one of the three ---
    init_from: str | None = None  # a saved STORM model folder (e.g. the previous stage's output)
    build: dict | None = None  # {vision: DIR, llm: DIR, projector: mamba|mlp, **StormConfig overrides}
    tiny: dict | None = None  # kwargs of storm_vlm.demo.tiny.build_tiny_model (tiny random model)
    # --- model settings applied on top of the source ---
    temporal_pool_size: int | None = None
    model_overrides: dict = field(default_factory=dict)
    # --- what trains ---
    train_parts: list[str] | None = None  # default per stage (DEFAULT_TRAIN_PARTS)
    lora: LoraConfig | None = None
    # --- optimisation ---
    per_device_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-5
    projector_lr: float | None = None  # default: learning_rate
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    lr_scheduler: str = "cosine"  # cosine | linear | constant (all with linear warmup)
    warmup_ratio: float = 0.03
    max_grad_norm: float | None = 1.0
    gradient_checkpointing: bool = False
    precision: str = "auto"  # storm_vlm.precision names; the legacy key `bf16: auto|true|false` maps onto it
    # --- data ---
    max_length: int = 2048
    shuffle: bool = True
    num_workers: int = 0
    image_aspect: str = "resize"  # kept for forward compatibility of recipes; only "resize" exists
    # --- distributed / bookkeeping ---
    distributed: str = "ddp"  # ddp | fsdp (used when launched by torchrun with WORLD_SIZE > 1)
    logging_steps: int = 1
    save_total_limit: int | None = None
    # manifest.json of each checkpoint holds SHA-256s, checked by --resume (false: sizes and structure only)
    checkpoint_checksums: bool = True
    # --resume with the global batch split otherwise (processes, per_device_batch_size,
    # gradient_accumulation_steps) when the model draws random numbers (dropout): false refuses
    # (the ranks' RNG streams cannot be carried over, masks are drawn per micro-batch), true reseeds each rank
    resume_reseed_rng: bool = False
    progress_bar: bool = True
    tensorboard: bool = True  # written when the tensorboard package is installed
    description: str = ""

    # ------------------------------------------------------------------
    def parts_to_train(self) -> tuple[str, ...]:
        """Parts whose weights train (with `lora`, "language_model" trains through its adapters only)."""
        if self.train_parts is not None:
            return tuple(self.train_parts)
        if self.lora is not None:
            return ("projector", "language_model")
        return DEFAULT_TRAIN_PARTS[self.stage]

    @property
    def effective_projector_lr(self) -> float:
        return self.learning_rate if self.projector_lr is None else self.projector_lr

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
# What --resume does when a key differs from the checkpoint's config (`resume_config_changes`):
# these may change freely (bookkeeping, or how the same global batch is split over processes; the
# global batch itself is checked on its own) ...
RESUME_FREE_KEYS = frozenset({
    "output_dir", "save_steps", "save_total_limit", "logging_steps", "progress_bar", "tensorboard",
    "checkpoint_checksums", "num_workers", "description", "distributed", "per_device_batch_size",
    "gradient_accumulation_steps", "gradient_checkpointing", "resume_reseed_rng",
})
# ... these may change and are reported (a longer or shorter run, another machine's precision, data
# moved to another folder: its record count is checked on its own); every other key is refused.
RESUME_STATED_KEYS = ("max_steps", "precision", "train_file", "media_root")
REQUIRED_KEYS = ("stage", "output_dir", "train_file", "media_root", "num_frames", "max_steps", "save_steps", "seed")
TOP_KEYS = frozenset(_FIELDS) | {"bf16"}  # bf16: the legacy spelling of precision
SEED_MAX = 2**32 - 1  # numpy's seeds, and the sampler's per-epoch seed must fit a 64-bit generator


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key, line: int, first: int):
        super().__init__(f"line {line}: key {key!r} is given twice (first on line {first})")


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping: PyYAML keeps the last one
    silently, so a key added at the end of a long config would quietly override the one above it.
    Keys a `<<` merge brings in may still be overridden."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    line = first.setdefault(key, key_node.start_mark.line + 1)
                except TypeError:  # an unhashable key: the base constructor reports it
                    continue
                if line != key_node.start_mark.line + 1:
                    raise _DuplicateKey(key, key_node.start_mark.line + 1, line)
        return super().construct_mapping(node, deep=deep)


# ----------------------------------------------------------------------------- loading
def parse_override(item: str) -> tuple[list[str], Any]:
    """`"a.b=value"` -> (["a", "b"], yaml-parsed value)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML ({yaml_problem(exc)})") from None
    return key.split("."), value


def _set_nested(raw: dict, path: list[str], value: Any, label: str) -> None:
    node = raw
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"--set {label}: {part!r} is not a mapping (it is {child!r})")
        node = child
    node[path[-1]] = value


def apply_overrides(raw: dict, overrides: list[str] | None) -> dict:
    out = copy.deepcopy(raw)
    for item in overrides or []:
        path, value = parse_override(item)
        _set_nested(out, path, value, ".".join(path))
    return out


def _deep_merge(base: dict, over: Mapping) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def read_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a YAML config (not UTF-8 text)") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: plain data only
    except _DuplicateKey as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({yaml_problem(exc)})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys, got {type(data).__name__}")
    return data


def resolve_raw(raw: Mapping, overrides: list[str] | None = None, source: str = "config") -> dict:
    """Apply `--set` overrides and merge the `stages.<stage>` section (overrides still win)."""
    raw = apply_overrides(dict(raw), overrides)
    stages = raw.pop("stages", None)
    if stages is not None:
        if not isinstance(stages, dict):
            raise ConfigError(f"{source}: key 'stages' must map stage names to sections")
        for name, section in stages.items():
            if name not in STAGES:
                raise ConfigError(f"{source}: key 'stages.{name}': unknown stage (choose from {', '.join(STAGES)})")
            if not isinstance(section, dict):
                raise ConfigError(f"{source}: key 'stages.{name}' must be a mapping")
            for key in section:
                if key not in TOP_KEYS:
                    raise ConfigError(f"{source}: unknown key 'stages.{name}.{key}'{did_you_mean(str(key), TOP_KEYS)}")
        stage = raw.get("stage")
        if stage not in STAGES:
            raise ConfigError(f"{source}: key 'stage': {stage!r} is not a stage (choose from {', '.join(STAGES)})")
        if stage in stages:
            raw = _deep_merge(raw, stages[stage])
            raw = apply_overrides(raw, overrides)
    return raw


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config, apply `--set` overrides, validate. Errors are ConfigError naming the key."""
    raw = read_yaml(path)
    return config_from_dict(resolve_raw(raw, overrides, source=str(path)), source=str(path))


# ----------------------------------------------------------------------------- validation
def _bad(source: str, key: str, msg: str) -> ConfigError:
    return ConfigError(f"{source}: key {key!r}: {msg}")


def _int(source, key, v, minimum=None, allow_none=False, maximum=None):
    if v is None and allow_none:
        return None
    try:
        return check_int("value", v, minimum, maximum)
    except ValueError as exc:
        raise _bad(source, key, str(exc).removeprefix("value ")) from None


def _float(source, key, v, minimum=None, maximum=None, allow_none=False):
    if v is None and allow_none:
        return None
    if isinstance(v, str):  # YAML reads "1e-3" (no dot) as a string
        try:
            v = float(v)
        except ValueError:
            raise _bad(source, key, f"expected a number, got {v!r}") from None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _bad(source, key, f"expected a number, got {v!r}")
    v = float(v)
    if not math.isfinite(v):  # .nan / .inf in YAML, 1e999 in a string
        raise _bad(source, key, f"must be a finite number, got {v}")
    if minimum is not None and v < minimum:
        raise _bad(source, key, f"must be >= {minimum}, got {v}")
    if maximum is not None and v > maximum:
        raise _bad(source, key, f"must be <= {maximum}, got {v}")
    return v


def _bool(source, key, v):
    if not isinstance(v, bool):
        raise _bad(source, key, f"expected true or false, got {v!r}")
    return v


def _str(source, key, v, allow_none=False, choices=None):
    if v is None and allow_none:
        return None
    if not isinstance(v, str) or (choices is None and not v):
        raise _bad(source, key, f"expected a non-empty string, got {v!r}")
    if choices is not None and v not in choices:
        raise _bad(source, key, f"must be one of {', '.join(choices)}, got {v!r}")
    return v


def _mapping(source, key, v, allow_none=True):
    if v is None and allow_none:
        return None
    if not isinstance(v, dict):
        raise _bad(source, key, f"expected a mapping, got {v!r}")
    return dict(v)


def _precision(source: str, raw: dict) -> str:
    """`precision:` (storm_vlm.precision's names), or the legacy `bf16: auto|true|false` mapped onto it."""
    legacy = {"auto": "auto", True: "bfloat16", False: "float32"}
    if "bf16" in raw:
        if raw["bf16"] not in legacy:
            raise _bad(source, "bf16", f"must be auto, true or false, got {raw['bf16']!r}")
        if "precision" in raw and parse_precision(raw["precision"]) != legacy[raw["bf16"]]:
            raise _bad(source, "bf16", f"contradicts precision: {raw['precision']!r} (give only precision)")
    try:
        return parse_precision(raw.get("precision", legacy[raw.get("bf16", "auto")]))
    except StormError as exc:
        raise _bad(source, "precision", str(exc).removeprefix("precision ")) from None


def config_from_dict(raw: Mapping, source: str = "config") -> TrainConfig:
    """Validate a plain mapping (already merged/overridden) into a TrainConfig."""
    if isinstance(raw, TrainConfig):
        return raw
    raw = dict(raw)
    raw.pop("stages", None)
    for key in raw:
        if key not in TOP_KEYS:
            raise ConfigError(f"{source}: unknown key {key!r}{did_you_mean(str(key), TOP_KEYS)}")
    for key in REQUIRED_KEYS:
        if raw.get(key) is None:
            raise ConfigError(f"{source}: missing required key {key!r}")
    s = source
    v: dict[str, Any] = {}
    v["stage"] = _str(s, "stage", raw["stage"], choices=STAGES)
    for key in ("output_dir", "train_file", "media_root"):
        v[key] = _str(s, key, str(raw[key]) if isinstance(raw[key], (str, Path)) else raw[key])
    v["num_frames"] = _int(s, "num_frames", raw["num_frames"], minimum=1)
    v["max_steps"] = _int(s, "max_steps", raw["max_steps"], minimum=1)
    v["save_steps"] = _int(s, "save_steps", raw["save_steps"], minimum=0)
    v["seed"] = _int(s, "seed", raw["seed"], minimum=0, maximum=SEED_MAX)

    sources = [k for k in ("init_from", "build", "tiny") if raw.get(k) is not None]
    if len(sources) != 1:
        found = ", ".join(sources) if sources else "none"
        raise ConfigError(f"{source}: key 'init_from'/'build'/'tiny': set exactly one model source (found: {found})")
    v["init_from"] = _str(s, "init_from", raw.get("init_from"), allow_none=True)
    build = _mapping(s, "build", raw.get("build"))
    if build is not None:
        for req in BUILD_REQUIRED:
            if not build.get(req):
                raise _bad(s, f"build.{req}", "required (a local model folder)")
        if build.get("projector", "mamba") not in ("mamba", "mlp"):
            raise _bad(s, "build.projector", f"must be mamba or mlp, got {build.get('projector')!r}")
    v["build"] = build
    v["tiny"] = _mapping(s, "tiny", raw.get("tiny"))

    v["temporal_pool_size"] = _int(s, "temporal_pool_size", raw.get("temporal_pool_size"), minimum=1, allow_none=True)
    v["model_overrides"] = _mapping(s, "model_overrides", raw.get("model_overrides", {}), allow_none=False)

    parts = raw.get("train_parts")
    if parts is not None:
        if isinstance(parts, str):
            parts = [parts]
        if not isinstance(parts, list) or not parts:
            raise _bad(s, "train_parts", f"expected a non-empty list of {', '.join(PARTS)}")
        for p in parts:
            if p not in PARTS:
                raise _bad(s, "train_parts", f"unknown part {p!r} (choose from {', '.join(PARTS)})")
    v["train_parts"] = list(parts) if parts is not None else None

    lora = raw.get("lora")
    if lora is not None and lora is not False:
        if lora is True:
            lora = {}
        lora = _mapping(s, "lora", lora, allow_none=False)
        for k in lora:
            if k not in LORA_KEYS:
                raise _bad(s, f"lora.{k}", f"unknown LoRA option{did_you_mean(str(k), LORA_KEYS)} "
                                           f"(known: {', '.join(sorted(LORA_KEYS))})")
        d = LoraConfig()
        tm = lora.get("target_modules", d.target_modules)
        if isinstance(tm, str):
            tm = [tm]
        if not isinstance(tm, list) or not tm or not all(isinstance(t, str) and t for t in tm):
            raise _bad(s, "lora.target_modules", f"expected a list of module names, got {tm!r}")
        v["lora"] = LoraConfig(
            r=_int(s, "lora.r", lora.get("r", d.r), minimum=1),
            alpha=_float(s, "lora.alpha", lora.get("alpha", d.alpha), minimum=0),
            dropout=_float(s, "lora.dropout", lora.get("dropout", d.dropout), minimum=0, maximum=1),
            target_modules=list(tm),
            bias=_str(s, "lora.bias", lora.get("bias", d.bias), choices=("none", "all", "lora_only")),
        )
        if v["stage"] == "align":
            raise _bad(s, "lora", "the align stage trains only the projector; LoRA applies to sft/long")
    else:
        v["lora"] = None

    v["per_device_batch_size"] = _int(s, "per_device_batch_size", raw.get("per_device_batch_size", 1), minimum=1)
    v["gradient_accumulation_steps"] = _int(
        s, "gradient_accumulation_steps", raw.get("gradient_accumulation_steps", 1), minimum=1
    )
    v["learning_rate"] = _float(s, "learning_rate", raw.get("learning_rate", 2e-5), minimum=0)
    v["projector_lr"] = _float(s, "projector_lr", raw.get("projector_lr"), minimum=0, allow_none=True)
    v["weight_decay"] = _float(s, "weight_decay", raw.get("weight_decay", 0.0), minimum=0)
    for key, default in (("adam_beta1", 0.9), ("adam_beta2", 0.999)):
        v[key] = _float(s, key, raw.get(key, default), minimum=0)
        if v[key] >= 1:  # AdamW divides by 1 - beta**step
            raise _bad(s, key, f"must be below 1, got {v[key]}")
    v["adam_epsilon"] = _float(s, "adam_epsilon", raw.get("adam_epsilon", 1e-8), minimum=0)
    v["lr_scheduler"] = _str(s, "lr_scheduler", raw.get("lr_scheduler", "cosine"), choices=("cosine", "linear", "constant"))
    v["warmup_ratio"] = _float(s, "warmup_ratio", raw.get("warmup_ratio", 0.03), minimum=0, maximum=1)
    v["max_grad_norm"] = _float(s, "max_grad_norm", raw.get("max_grad_norm", 1.0), minimum=0, allow_none=True)
    v["gradient_checkpointing"] = _bool(s, "gradient_checkpointing", raw.get("gradient_checkpointing", False))
    v["precision"] = _precision(s, raw)

    v["max_length"] = _int(s, "max_length", raw.get("max_length", 2048), minimum=8)
    v["shuffle"] = _bool(s, "shuffle", raw.get("shuffle", True))
    v["num_workers"] = _int(s, "num_workers", raw.get("num_workers", 0), minimum=0)
    v["image_aspect"] = _str(s, "image_aspect", raw.get("image_aspect", "resize"), choices=("resize",))
    v["distributed"] = _str(s, "distributed", raw.get("distributed", "ddp"), choices=("ddp", "fsdp"))
    v["logging_steps"] = _int(s, "logging_steps", raw.get("logging_steps", 1), minimum=1)
    v["save_total_limit"] = _int(s, "save_total_limit", raw.get("save_total_limit"), minimum=1, allow_none=True)
    v["checkpoint_checksums"] = _bool(s, "checkpoint_checksums", raw.get("checkpoint_checksums", True))
    v["resume_reseed_rng"] = _bool(s, "resume_reseed_rng", raw.get("resume_reseed_rng", False))
    v["progress_bar"] = _bool(s, "progress_bar", raw.get("progress_bar", True))
    v["tensorboard"] = _bool(s, "tensorboard", raw.get("tensorboard", True))
    desc = raw.get("description", "")
    v["description"] = desc if isinstance(desc, str) else str(desc)

    if v["stage"] == "align" and v["train_parts"] is not None and set(v["train_parts"]) != {"projector"}:
        raise _bad(s, "train_parts", "the align stage trains only the projector")
    return TrainConfig(**v)


def resume_config_changes(saved: Mapping, cfg: TrainConfig) -> tuple[list[str], list[str]]:
    """Keys that differ between a checkpoint's config snapshot and this run's: (refused, stated),
    each as "key: old -> new". A key the snapshot lacks (written before the key existed) counts as
    its default. Values are compared as JSON, the form the snapshot is stored in."""
    now = json.loads(json.dumps(cfg.to_dict()))
    saved = json.loads(json.dumps(dict(saved)))
    refused, stated = [], []
    for key, f in _FIELDS.items():
        if key in RESUME_FREE_KEYS:
            continue
        if key in saved:
            old = saved[key]
        elif f.default is not dataclasses.MISSING:
            old = f.default
        elif f.default_factory is not dataclasses.MISSING:
            old = json.loads(json.dumps(f.default_factory()))
        else:
            old = None
        if old != now[key]:
            (stated if key in RESUME_STATED_KEYS else refused).append(f"{key}: {old!r} -> {now[key]!r}")
    return refused, stated
