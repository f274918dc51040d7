"""`StormConfig`: the configuration of a STORM video-LLM (vision tower + projector + LLM).

Its `visual_token_layout` (a `storm_vlm.model.compression.VisualTokenLayout`) says how many
visual tokens a video becomes; the processor saves a copy to expand `<video>` / `<image>`
placeholders and the model applies it.
"""

from __future__ import annotations

import dataclasses

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from storm_vlm.errors import ConfigError
from storm_vlm.model.compression import VisualTokenLayout, shuffled_grid_side
from storm_vlm.utils import check_int

__all__ = ["StormConfig"]

# SigLIP-so400m-patch14-448, the vision tower STORM uses.
SIGLIP_SO400M_448 = dict(
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    image_size=448,
    patch_size=14,
)

PROJECTOR_TYPES = ("mamba", "mlp")


def _check_int(field: str, value, minimum: int = 1) -> int:
    return check_int(f"StormConfig.{field}", value, minimum, error=ConfigError)


class StormConfig(PreTrainedConfig):
    r"""Configuration of `StormForConditionalGeneration` (`model_type="storm"`).

    Args (keywords; the two sub-configs may be positional):
        vision_config: SigLIP vision config (a `PreTrainedConfig` or a dict with `model_type`);
            defaults to SigLIP-so400m-patch14-448.
        text_config: causal-LM config (a `PreTrainedConfig` or a dict with `model_type`); default Qwen2.
        vision_feature_layer: which vision-tower hidden state feeds the projector (-2: second to last).
        projector_type: "mamba" (STORM's temporal projector) or "mlp" (the VILA baseline).
        projector_num_layers, projector_d_state, projector_d_conv, projector_expand,
        projector_bidirectional: Mamba projector shape.
        projector_divide_out: halve the sum of the two scan directions (Vim's released
            bidirectional models do; bidirectional projectors only).
        downsample_ratio: pixel-shuffle ratio r (a √N̂ x √N̂ patch grid -> ceil(√N̂ / r)² tokens per frame;
            a 384 px SigLIP's 27 x 27 patches are zero-padded to 28 x 28 first, as in VILA).
        temporal_pool_size: k, average groups of k frames after the projector (trained).
        spatial_pool_stride: p, average p x p token windows per frame after the projector (trained).
        temporal_sample_stride: s, keep every s-th frame after pooling (test-time default; can be
            overridden per call).
        video_token_id, image_token_id: ids of the `<video>` / `<image>` placeholder tokens.
        vision_batch_size: frames per vision-tower call (bounds memory on long videos).
    """

    model_type = "storm"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(
            config_class=AutoConfig, model_type="siglip_vision_model", init_kwargs=SIGLIP_SO400M_448
        ),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    vision_feature_layer: int = -2
    projector_type: str = "mamba"
    projector_num_layers: int = 2
    projector_d_state: int = 16
    projector_d_conv: int = 4
    projector_expand: int = 2
    projector_bidirectional: bool = True
    projector_divide_out: bool = False
    downsample_ratio: int = 2
    temporal_pool_size: int = 1
    spatial_pool_stride: int = 1
    temporal_sample_stride: int = 1
    video_token_id: int | None = None
    image_token_id: int | None = None
    vision_batch_size: int = 32
    tie_word_embeddings: bool = False

    def __init__(self, vision_config=None, text_config=None, **kwargs):
        # Like every transformers config the fields are keywords; the two sub-configs may also be
        # given positionally: StormConfig(vision_config, text_config, projector_type="mlp").
        kwargs.update(vision_config=vision_config, text_config=text_config)
        names = set()
        for f in dataclasses.fields(self):
            names.add(f.name)
            if f.name in kwargs:
                setattr(self, f.name, kwargs[f.name])
            elif f.default is not dataclasses.MISSING:
                setattr(self, f.name, f.default)
            elif f.default_factory is not dataclasses.MISSING:
                setattr(self, f.name, f.default_factory())
        self.__post_init__(**{k: v for k, v in kwargs.items() if k not in names})

    def __post_init__(self, **kwargs):
        for key in ("vision_config", "text_config"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, (dict, PreTrainedConfig)):
                raise ConfigError(f"StormConfig.{key} must be a config or a dict, got {type(value).__name__}")
        try:
            super().__post_init__(**kwargs)
        except (ValueError, TypeError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"StormConfig: invalid sub-config: {exc}") from exc
        self.validate_storm_fields()

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """PreTrainedConfig's, with the keyword overrides checked too (`from_pretrained(path,
        temporal_sample_stride=0)` is a ConfigError here, not a model that fails later).

        A keyword naming one of the derived read-only properties (`visual_token_layout`,
        `tokens_per_frame`, ...) is left unused, as an unknown one is: AutoTokenizer and
        AutoProcessor hand a processor's own keywords (its `visual_token_layout`) to this method,
        and setting a property would raise AttributeError.
        """
        derived = {k: kwargs.pop(k) for k in list(kwargs)
                   if isinstance(getattr(cls, k, None), property) and getattr(cls, k).fset is None}
        out = super().from_dict(config_dict, **kwargs)
        config, unused = out if isinstance(out, tuple) else (out, None)
        config.validate_storm_fields()
        if unused is not None:
            unused.update(derived)
        return out

    def validate(self) -> None:
        """PreTrainedConfig's checks (run by `save_pretrained`), then the STORM fields: a field
        changed after construction to an invalid value fails when saved, not when loaded back."""
        super().validate()
        self.validate_storm_fields()

    def validate_storm_fields(self) -> None:
        """Raise ConfigError naming the first invalid field."""
        if self.projector_type not in PROJECTOR_TYPES:
            raise ConfigError(
                f"StormConfig.projector_type must be one of {PROJECTOR_TYPES}, got {self.projector_type!r}"
            )
        _check_int("projector_num_layers", self.projector_num_layers, 0)
        for name in ("projector_d_state", "projector_d_conv", "projector_expand", "downsample_ratio",
                     "temporal_pool_size", "spatial_pool_stride", "temporal_sample_stride", "vision_batch_size"):
            _check_int(name, getattr(self, name))
        for name in ("projector_bidirectional", "projector_divide_out"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"StormConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.projector_divide_out and not self.projector_bidirectional:
            raise ConfigError("StormConfig.projector_divide_out needs projector_bidirectional=True")
        for name in ("video_token_id", "image_token_id"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value, 0)
        num_layers = getattr(self.vision_config, "num_hidden_layers", None)
        layer = self.vision_feature_layer
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ConfigError(f"StormConfig.vision_feature_layer must be an int, got {layer!r}")
        if num_layers is not None and not -(num_layers + 1) <= layer <= num_layers:
            raise ConfigError(
                f"StormConfig.vision_feature_layer {layer} is out of range for a vision tower with "
                f"{num_layers} layers (hidden states -{num_layers + 1}..{num_layers})"
            )
        for name in ("image_size", "patch_size"):
            if getattr(self.vision_config, name, None) is None:
                raise ConfigError(f"StormConfig.vision_config has no {name}")
        side = self.vision_config.image_size // self.vision_config.patch_size
        if side < 1:
            raise ConfigError(
                f"StormConfig.vision_config: image_size {self.vision_config.image_size} is smaller than "
                f"patch_size {self.vision_config.patch_size}"
            )
        grid = self.shuffled_grid_side
        if grid % self.spatial_pool_stride:
            raise ConfigError(
                f"StormConfig.spatial_pool_stride {self.spatial_pool_stride} does not divide the "
                f"{grid} x {grid} token grid after pixel shuffle ({side} x {side} patches, downsample_ratio "
                f"{self.downsample_ratio})"
            )

    # ---- visual tokens -------------------------------------------------------------------------------

    @property
    def patch_grid_side(self) -> int:
        """Patches per side of a frame in the vision tower: image_size // patch_size."""
        return self.vision_config.image_size // self.vision_config.patch_size

    @property
    def shuffled_grid_side(self) -> int:
        """Tokens per side after pixel shuffle: ceil(patch_grid_side / downsample_ratio) (see `pixel_shuffle`)."""
        return shuffled_grid_side(self.patch_grid_side, self.downsample_ratio)

    @property
    def projector_tokens_per_frame(self) -> int:
        """N: tokens per frame leaving the projector (shuffled_grid_side²), before spatial pooling."""
        return self.shuffled_grid_side**2

    @property
    def visual_token_layout(self) -> VisualTokenLayout:
        """How this model turns a video into visual tokens (grid, pooling, default sampling stride)."""
        return VisualTokenLayout(
            grid_side=self.shuffled_grid_side,
            temporal_pool_size=self.temporal_pool_size,
            spatial_pool_stride=self.spatial_pool_stride,
            temporal_sample_stride=self.temporal_sample_stride,
        )

    @property
    def tokens_per_frame(self) -> int:
        """N': tokens per frame the LLM reads (after pixel shuffle and spatial pooling)."""
        return self.visual_token_layout.tokens_per_frame

    def num_visual_frames(self, num_frames: int, temporal_sample_stride: int | None = None) -> int:
        """T': frames left of a T-frame video after temporal pooling and test-time sampling."""
        return self.visual_token_layout.with_sample_stride(temporal_sample_stride).num_frames(num_frames)

    def num_visual_tokens(self, num_frames: int, temporal_sample_stride: int | None = None) -> int:
        """Visual tokens the LLM reads for a `num_frames`-frame video (an image is num_frames=1).

        temporal_sample_stride=None uses the config default (see `visual_token_layout`).
        """
        return self.visual_token_layout.with_sample_stride(temporal_sample_stride).num_tokens(num_frames)
