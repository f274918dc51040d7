"""What each stage trains, and the optimizer's parameter groups.

align: only the projector (image-caption pairs). sft / long: vision tower, projector and LLM
(or `train_parts`), or -- with `lora:` -- LoRA adapters on the LLM while the projector trains
fully and the vision tower stays frozen (unless `train_parts` lists it). The projector has its own learning rate (`projector_lr`).
"""

from __future__ import annotations

import re

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from storm_vlm.errors import ConfigError
from storm_vlm.train.config import PARTS, TrainConfig

LORA_ADAPTER = "default"
# A Mamba mixer's state matrix, A_log (and A_b_log for the backward direction): 2-D, but, as in
# mamba_ssm (`_no_weight_decay`), never decayed -- decay pulls A = -exp(A_log) towards -1 and so
# changes how fast the scan forgets. Matched by name because `from_pretrained` and FSDP2 replace
# the Parameter objects, dropping the `_no_weight_decay` attribute the mixer sets on them.
_NO_DECAY_NAME = re.compile(r"A(_\w+)?_log")


def apply_stage(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """Freeze / unfreeze the model's parts for `cfg.stage`; inject LoRA into the LLM when asked.

    Works in place on a `StormForConditionalGeneration` (with `vision_tower`, `projector`,
    `language_model`) and returns it. Parameter names of the base model do not change apart
    from LoRA's `base_layer` / `lora_A` / `lora_B` (see `merged_state_dict`).
    """
    parts = set(cfg.parts_to_train())
    for part in PARTS:
        getattr(model, part).requires_grad_(part in parts)
    if cfg.lora is not None and "language_model" in parts:
        lm = model.language_model
        lm.requires_grad_(False)
        peft_cfg = PeftLoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=list(cfg.lora.target_modules),
            bias=cfg.lora.bias,
        )
        inject_adapter_in_model(peft_cfg, lm, adapter_name=LORA_ADAPTER)
        n = sum(1 for name, _ in lm.named_parameters() if "lora_" in name)
        if n == 0:
            raise ConfigError(
                f"key 'lora.target_modules': none of {cfg.lora.target_modules} matches a module of the language model"
            )
        for name, p in lm.named_parameters():
            p.requires_grad_("lora_" in name)
    return model


def has_lora(model: nn.Module) -> bool:
    return any("lora_" in name for name, _ in model.named_parameters())


def draws_random_numbers(model: nn.Module) -> bool:
    """Whether a training forward draws random numbers: a Dropout with p > 0 (LoRA's lora_dropout
    among them) or an attention layer with attention dropout (transformers keeps that rate as a
    float attribute, `attention_dropout` or `dropout`, and applies it only in training mode)."""
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return True
        if any(isinstance(getattr(m, a, None), float) and getattr(m, a) > 0 for a in ("attention_dropout", "dropout")):
            return True
    return False


def trainable_names(model: nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


def parameter_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """AdamW groups: projector vs the rest (separate lr), each split into decay / no-decay.

    Biases, 1-D weights (norms) and the Mamba mixers' A_log matrices get no weight decay.
    Every group carries a "name".
    """
    buckets: dict[str, list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = "projector" if name.startswith("projector.") else "model"
        decay = (cfg.weight_decay > 0 and p.ndim >= 2 and not getattr(p, "_no_weight_decay", False)
                 and not _NO_DECAY_NAME.fullmatch(name.rsplit(".", 1)[-1]))
        key = part if decay or cfg.weight_decay == 0 else f"{part}_no_decay"
        buckets.setdefault(key, []).append(p)
    groups = []
    for key in ("projector", "projector_no_decay", "model", "model_no_decay"):
        if key not in buckets:
            continue
        lr = cfg.effective_projector_lr if key.startswith("projector") else cfg.learning_rate
        wd = cfg.weight_decay if not key.endswith("no_decay") else 0.0
        groups.append({"params": buckets[key], "lr": lr, "weight_decay": wd, "name": key})
    if not groups:
        raise ConfigError(f"stage {cfg.stage!r}: no parameter is trainable (check 'train_parts' / 'lora')")
    return groups


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable parameter counts per part (works on the meta device)."""
    out = {}
    for part in PARTS:
        out[part] = sum(p.numel() for p in getattr(model, part).parameters() if p.requires_grad)
    return out


@torch.no_grad()
def merged_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The model's state dict with LoRA merged into the base weights, under the base names.

    `x.base_layer.weight` + scale * B @ A -> `x.weight`; lora_* tensors are dropped. `state_dict`:
    a full state dict of `model` to merge (e.g. gathered from FSDP2 shards); default the model's
    own. Does not modify the model (training continues bitwise unchanged). Without LoRA: unchanged.
    """
    sd = model.state_dict() if state_dict is None else state_dict
    if not has_lora(model):
        return sd
    scale = {name: m.scaling[LORA_ADAPTER] for name, m in model.named_modules()
             if isinstance(m, LoraLayer) and LORA_ADAPTER in getattr(m, "lora_A", {})}
    out = {}
    for key, t in sd.items():
        if ".lora_" in key:
            continue
        module = key.removesuffix(".base_layer.weight") if key.endswith(".base_layer.weight") else None
        if module in scale:
            a = sd[f"{module}.lora_A.{LORA_ADAPTER}.weight"].float()
            b = sd[f"{module}.lora_B.{LORA_ADAPTER}.weight"].float()
            t = (t.float() + scale[module] * (b @ a)).to(t.dtype)
        out[key.replace(".base_layer.", ".")] = t
    return out
