"""`StormForConditionalGeneration`: SigLIP vision tower -> temporal projector -> token compression -> LLM.

A transformers-native model (PreTrainedModel + GenerationMixin): `from_pretrained`,
`save_pretrained` (safetensors), `generate`, SDPA attention, gradient checkpointing and the Auto
classes all work as for any transformers VLM. Shapes: B videos, T frames, N tokens per frame,
D width; L sequence length.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.activations import GELUTanh
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface
from transformers.modeling_outputs import CausalLMOutputWithPast

from storm_vlm.model.compression import spatial_pool, temporal_pool, temporal_sample
from storm_vlm.model.configuration import StormConfig
from storm_vlm.model.projector import MambaTemporalProjector, MLPProjector

__all__ = ["StormPreTrainedModel", "StormForConditionalGeneration", "StormKVCache", "build_projector"]


class _GELUTanhCPU(nn.Module):
    """GELU with the tanh approximation (SigLIP's `gelu_pytorch_tanh`), computed faster on CPU.

    0.5·x·(1 + tanh(u)) = x·sigmoid(2u), u = √(2/π)·(x + 0.044715·x³): the same function, evaluated
    with sigmoid and in-place ops. PyTorch's CPU `gelu(approximate="tanh")` goes through a slow
    vectorised tanh: on a (32, 64, 269) fp32 tensor 2.0 ms vs 0.55 ms for exact GELU, ~30% of the
    bench-cpu vision tower; this form takes ~1.1 ms and differs by < 1e-6 (float rounding). Used for
    fp32/fp64 CPU inference only; with autograd, other dtypes or devices it is `F.gelu(x, "tanh")`.
    """

    _TWO_C = 2.0 * math.sqrt(2.0 / math.pi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64)
                or (torch.is_grad_enabled() and x.requires_grad)):
            return nn.functional.gelu(x, approximate="tanh")
        y = x * x
        y.mul_(0.044715 * self._TWO_C).add_(self._TWO_C).mul_(x)
        return torch.sigmoid_(y).mul_(x)


def _fast_gelu_tanh(module: nn.Module) -> None:
    """Swap transformers' GELUTanh (the C `gelu(approximate="tanh")` variant) for `_GELUTanhCPU`."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is GELUTanh and isinstance(getattr(child, "act", None), functools.partial):
                setattr(parent, name, _GELUTanhCPU())


STORM_SDPA = "storm_sdpa"


def _storm_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                          **kwargs):
    """transformers' SDPA attention, with one faster case: a single query token on CPU with grouped KV heads.

    query (B, H, 1, hd), key/value (B, G, L, hd) with H = G·r. transformers hands this (no mask) to
    `scaled_dot_product_attention(..., enable_gqa=True)`, whose CPU kernel then runs H separate
    1 x L products and reads each KV head r times; here the r query heads of a group become r query
    rows of that group's KV head — (B, G, r, hd) against (B, G, L, hd): one r x L product per KV
    head, same result (what transformers itself does when a mask is present). On the bench-cpu model
    at 4100 cached tokens: 0.31 -> 0.13 ms per layer, ~6 of ~50 ms per generated token. Every other
    case (prefill, masks, CUDA, ...) goes to `sdpa_attention_forward` unchanged.
    """
    groups = getattr(module, "num_key_value_groups", 1)
    if (
        query.shape[2] == 1 and groups > 1 and query.device.type == "cpu" and attention_mask is None
        and kwargs.get("position_bias") is None and kwargs.get("softcap") is None
        and not kwargs.get("output_attentions", False) and key.shape[1] * groups == query.shape[1]
    ):
        b, h, _, hd = query.shape
        out = torch.nn.functional.scaled_dot_product_attention(
            query.reshape(b, h // groups, groups, hd), key, value, dropout_p=dropout, scale=scaling
        )
        return out.reshape(b, h, 1, value.shape[-1]).transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


AttentionInterface.register(STORM_SDPA, _storm_sdpa_attention)
AttentionMaskInterface.register(STORM_SDPA, sdpa_mask)


def _use_storm_sdpa(config) -> None:
    """Switch a text config from "sdpa" to STORM_SDPA (same masks and kernels, faster GQA decode on CPU)."""
    heads = getattr(config, "num_attention_heads", None)
    kv = getattr(config, "num_key_value_heads", None) or heads
    if config._attn_implementation == "sdpa" and heads and kv < heads:
        config._attn_implementation = STORM_SDPA


class _GrowingKVLayer(DynamicLayer):
    """A `DynamicLayer` that appends in place into a buffer with spare room.

    `DynamicLayer.update` concatenates, copying the whole cache of the layer at every generated
    token: O(context) bytes per step, twice what attention reads (at 4100 cached tokens on the
    bench-cpu model ~3 of ~40 ms per step). Here `keys` / `values` are views
    (B, H, L, hd) into buffers (B, H, capacity, hd) that grow by 1/16 (at least 128 tokens) when
    full, so an append copies only the new tokens (amortised: the whole cache once per ~L/16
    steps). Values, shapes and every other `DynamicLayer` method are unchanged (`crop` keeps the
    view, so the next append overwrites the dropped tokens; an operation that replaces the tensors,
    e.g. `batch_select_indices`, makes the next append re-adopt them into a fresh buffer). When
    gradients flow into the cache it falls back to concatenation (in-place writes would break
    autograd's saved views).
    """

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._key_buf = self._value_buf = None

    def _owns(self, key_states: torch.Tensor, value_states: torch.Tensor, needed: int) -> bool:
        kb, vb = self._key_buf, self._value_buf
        if kb is None or needed > kb.shape[-2] or self.keys.numel() == 0:
            return False
        return (
            self.keys.data_ptr() == kb.data_ptr() and self.values.data_ptr() == vb.data_ptr()
            and self.keys.stride() == kb.stride() and self.values.stride() == vb.stride()
            and self.keys.shape[:2] == key_states.shape[:2] == kb.shape[:2]
            and kb.dtype == key_states.dtype and vb.dtype == value_states.dtype
            and kb.device == key_states.device
        )

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if torch.is_grad_enabled() and (key_states.requires_grad or value_states.requires_grad):
            self._key_buf = self._value_buf = None
            return super().update(key_states, value_states, *args, **kwargs)
        n = self.get_seq_length()
        needed = n + key_states.shape[-2]
        if not self._owns(key_states, value_states, needed):
            capacity = needed + max(128, needed // 16)
            kb = key_states.new_empty(*key_states.shape[:2], capacity, key_states.shape[-1])
            vb = value_states.new_empty(*value_states.shape[:2], capacity, value_states.shape[-1])
            if n:
                kb[:, :, :n].copy_(self.keys)
                vb[:, :, :n].copy_(self.values)
            self._key_buf, self._value_buf = kb, vb
        self._key_buf[:, :, n:needed].copy_(key_states)
        self._value_buf[:, :, n:needed].copy_(value_states)
        self.keys = self._key_buf[:, :, :needed]
        self.values = self._value_buf[:, :, :needed]
        return self.keys, self.values

    def reset(self) -> None:
        self._key_buf = self._value_buf = None
        super().reset()


class StormKVCache(DynamicCache):
    """`DynamicCache` whose full-attention layers append in place (see `_GrowingKVLayer`).

    What `StormForConditionalGeneration` uses when it creates a KV cache (in `generate`, or in
    `forward` with `use_cache=True` and no cache given); same contents as a `DynamicCache`.
    Sliding-window and other special layers stay as transformers builds them.
    """

    def __init__(self, ddp_cache_data=None, config=None, **kwargs):
        super().__init__(ddp_cache_data, config=config, **kwargs)
        self.layers = [self._growing(layer) if type(layer) is DynamicLayer else layer for layer in self.layers]
        if self.layer_class_to_replicate is DynamicLayer:
            self.layer_class_to_replicate = _GrowingKVLayer

    @staticmethod
    def _growing(layer: DynamicLayer) -> _GrowingKVLayer:
        new = _GrowingKVLayer()
        if layer.is_initialized and layer.keys is not None and layer.keys.numel():
            new.update(layer.keys, layer.values)
        return new


def build_projector(config: StormConfig) -> nn.Module:
    """A freshly initialised projector for `config` (vision width -> LLM width)."""
    vision_dim = config.vision_config.hidden_size
    d_model = config.text_config.hidden_size
    if config.projector_type == "mlp":
        return MLPProjector(vision_dim, d_model, downsample_ratio=config.downsample_ratio)
    return MambaTemporalProjector(
        vision_dim,
        d_model,
        num_layers=config.projector_num_layers,
        d_state=config.projector_d_state,
        d_conv=config.projector_d_conv,
        expand=config.projector_expand,
        bidirectional=config.projector_bidirectional,
        downsample_ratio=config.downsample_ratio,
    )


class StormPreTrainedModel(PreTrainedModel):
    config: StormConfig
    config_class = StormConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    input_modalities = ("image", "video", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["MambaBlock"]
    _skip_keys_device_placement = ["cache"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False


def _mark_initialised(module: nn.Module) -> None:
    # The projector initialises itself in __init__ (Mamba's dt / A / D inits are not the generic
    # normal(0.02) of `_init_weights`); flagged modules are skipped by `post_init`'s initialisation.
    for sub in module.modules():
        sub._is_hf_initialized = True


class StormForConditionalGeneration(StormPreTrainedModel, GenerationMixin):
    """STORM video-LLM.

    Submodules: `vision_tower` (SiglipVisionModel), `projector` (MambaTemporalProjector or
    MLPProjector), `language_model` (any AutoModelForCausalLM). Pass `vision_tower=` /
    `language_model=` to assemble from already-loaded pretrained parts (see `from_parts`).
    """

    def __init__(
        self,
        config: StormConfig,
        vision_tower: PreTrainedModel | None = None,
        language_model: PreTrainedModel | None = None,
    ):
        super().__init__(config)
        self.vision_tower = vision_tower if vision_tower is not None else AutoModel.from_config(config.vision_config)
        self.projector = build_projector(config)
        _mark_initialised(self.projector)
        if language_model is None:
            language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.language_model = language_model
        # One config object per part, shared with the submodules (resizing the LLM updates ours).
        self.config.vision_config = self.vision_tower.config
        self.config.text_config = self.language_model.config
        for part in (self.vision_tower, self.language_model):
            if part.config._attn_implementation is None:
                # Parts loaded before the StormConfig existed lose their choice when it is built.
                part.config._attn_implementation_internal = part._check_and_adjust_attn_implementation(
                    None, is_init_check=True
                )
        _use_storm_sdpa(self.language_model.config)
        _fast_gelu_tanh(self.vision_tower)
        self.post_init()

    @classmethod
    def from_parts(cls, config: StormConfig, vision_tower: PreTrainedModel, language_model: PreTrainedModel):
        """Assemble from loaded pretrained parts; only the projector is freshly initialised.

        The projector takes the language model's dtype and device.
        """
        model = cls(config, vision_tower=vision_tower, language_model=language_model)
        ref = language_model.get_input_embeddings().weight
        model.projector.to(device=ref.device, dtype=ref.dtype)
        return model

    # ---- embeddings --------------------------------------------------------------------------------

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def get_decoder(self):
        return self.language_model.get_decoder()

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None, **kwargs):
        """Resize the LLM's input (and output) embeddings; keeps `config.text_config.vocab_size` in sync."""
        out = self.language_model.resize_token_embeddings(new_num_tokens, pad_to_multiple_of, **kwargs)
        self.config.text_config = self.language_model.config
        return out

    # ---- visual features ---------------------------------------------------------------------------

    def _tower_layer_output(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(F, 3, H, W) -> hidden state `vision_feature_layer` (F, N̂, C) of the vision tower.

        For SigLIP-style towers (embeddings + encoder.layers) only the layers up to the wanted one
        run and no other hidden state is kept (at real size, keeping all 28 would cost ~4 GB per
        32 frames); other towers go through `output_hidden_states`.
        """
        tower = self.vision_tower
        layers = getattr(getattr(tower, "encoder", None), "layers", None)
        if isinstance(layers, nn.ModuleList) and hasattr(tower, "embeddings"):
            layer = self.config.vision_feature_layer
            stop = layer if layer >= 0 else len(layers) + 1 + layer  # hidden_states[k]: after k layers
            hidden = tower.embeddings(pixel_values)
            for block in layers[:stop]:
                hidden = block(hidden, None)
                if isinstance(hidden, tuple):
                    hidden = hidden[0]
            return hidden
        out = tower(pixel_values=pixel_values, output_hidden_states=True, return_dict=True)
        return out.hidden_states[self.config.vision_feature_layer]

    def _vision_features(self, frames: torch.Tensor) -> torch.Tensor:
        """frames (F, 3, H, W) -> vision features (F, N̂, C) from `vision_feature_layer`, in chunks.

        Each chunk is written into the output as soon as it is done, so only one chunk's features
        exist besides the output (concatenating at the end held all of them twice).
        """
        dtype = next(self.vision_tower.parameters()).dtype
        step = self.config.vision_batch_size
        n = frames.shape[0]
        out = None
        for i in range(0, n, step):
            hidden = self._tower_layer_output(frames[i : i + step].to(dtype))
            if hidden.shape[0] == n:
                return hidden
            if out is None:
                out = hidden.new_empty(n, *hidden.shape[1:])
            out[i : i + hidden.shape[0]] = hidden
        return out

    def get_video_features(
        self,
        pixel_values_videos: torch.Tensor,
        video_frame_mask: torch.Tensor | None = None,
        temporal_sample_stride: int | None = None,
    ):
        """Visual tokens for a batch of videos.

        pixel_values_videos (B, T, 3, H, W); video_frame_mask (B, T) bool (True = real frame, padding
        as a suffix) or None. Only real frames go through the vision tower (in chunks of
        `config.vision_batch_size`); the projector sees each whole video; then temporal pooling,
        spatial pooling and test-time temporal sampling (`temporal_sample_stride`, None = config).

        Returns (B, T', N', D), or ((B, T', N', D), mask (B, T')) when a mask is given.
        """
        if pixel_values_videos.dim() != 5:
            raise ValueError(
                f"pixel_values_videos must have shape (B, T, 3, H, W), got {tuple(pixel_values_videos.shape)}"
            )
        b, t = pixel_values_videos.shape[:2]
        mask = video_frame_mask
        if mask is not None:
            if tuple(mask.shape) != (b, t):
                raise ValueError(f"video_frame_mask shape {tuple(mask.shape)} does not match (B, T) = {(b, t)}")
            mask = mask.to(device=pixel_values_videos.device, dtype=torch.bool)
        real = mask if mask is not None else torch.ones(b, t, dtype=torch.bool, device=pixel_values_videos.device)
        if mask is None or bool(mask.all()):
            # every frame is real: views, no copies of the pixels or the features
            feats = self._vision_features(pixel_values_videos.flatten(0, 1))
            full = feats.view(b, t, *feats.shape[1:])
        else:
            feats = self._vision_features(pixel_values_videos[real])
            full = feats.new_zeros(b, t, *feats.shape[1:])
            full[real] = feats
        x = self.projector(full, frame_mask=mask)
        m = real
        x, m = temporal_pool(x, self.config.temporal_pool_size, frame_mask=m)
        x, m = spatial_pool(x, self.config.spatial_pool_stride, frame_mask=m)
        stride = self.config.temporal_sample_stride if temporal_sample_stride is None else temporal_sample_stride
        x, m = temporal_sample(x, stride, frame_mask=m)
        return (x, m) if video_frame_mask is not None else x

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Visual tokens for images: pixel_values (B, 3, H, W) -> (B, 1, N', D) (a one-frame video)."""
        if pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must have shape (B, 3, H, W), got {tuple(pixel_values.shape)}")
        return self.get_video_features(pixel_values[:, None], temporal_sample_stride=1)

    def _merge(self, input_ids, inputs_embeds, token_id, name, features: torch.Tensor) -> torch.Tensor:
        """Write `features` (M, D) into the positions of `token_id` in input_ids (B, L), in order."""
        if token_id is None:
            raise ValueError(f"config.{name}_token_id is not set, so {name} placeholders cannot be found")
        positions = input_ids == token_id
        n_placeholders = int(positions.sum())
        if n_placeholders != features.shape[0]:
            raise ValueError(
                f"{name} placeholder mismatch: input_ids hold {n_placeholders} <{name}> tokens but the "
                f"{name}s give {features.shape[0]} visual tokens"
            )
        features = features.to(device=inputs_embeds.device, dtype=inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(positions[..., None].to(inputs_embeds.device), features)

    # ---- forward / generate ------------------------------------------------------------------------

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, *args, **kwargs):
        """As GenerationMixin's, but the default dynamic cache is a `StormKVCache` (in-place appends)."""
        out = super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get("cache")
        if (type(cache) is DynamicCache and not getattr(cache, "_is_user_defined", False) and not cache.offloading
                and cache.get_seq_length() == 0):
            model_kwargs["cache"] = StormKVCache(config=self.config.get_text_config(decoder=True))
        return out

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_frame_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        temporal_sample_stride: int | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Causal-LM forward with visual tokens spliced in.

        input_ids (B, L) with each video's / image's placeholder run (`<video>` / `<image>` token
        repeated exactly `config.num_visual_tokens(...)` times); pixel_values_videos (V, T, 3, H, W)
        and video_frame_mask (V, T) bool; pixel_values (I, 3, H, W). Videos and images are in the
        order their placeholder runs appear in the batch (row by row). labels (B, L), -100 = ignored
        (placeholder positions are always ignored). Returns CausalLMOutputWithPast (loss, logits, cache).
        """
        if "past_key_values" in kwargs and cache is None:
            cache = kwargs.pop("past_key_values")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        has_visual = pixel_values_videos is not None or pixel_values is not None
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
            if pixel_values_videos is not None:
                feats = self.get_video_features(pixel_values_videos, video_frame_mask, temporal_sample_stride)
                if video_frame_mask is not None:
                    feats, out_mask = feats
                    tokens = feats[out_mask]
                else:
                    tokens = feats.flatten(0, 1)
                inputs_embeds = self._merge(
                    input_ids, inputs_embeds, self.config.video_token_id, "video", tokens.flatten(0, 1)
                )
            if pixel_values is not None:
                feats = self.get_image_features(pixel_values)
                inputs_embeds = self._merge(
                    input_ids, inputs_embeds, self.config.image_token_id, "image", feats.flatten(0, 2)
                )
        elif has_visual:
            raise ValueError("pixel values need input_ids (the placeholders tell where visual tokens go)")

        if labels is not None and input_ids is not None:
            for token_id in (self.config.video_token_id, self.config.image_token_id):
                if token_id is not None:
                    labels = labels.masked_fill(input_ids == token_id, -100)

        if cache is None and use_cache:
            cache = StormKVCache(config=self.config.get_text_config(decoder=True))

        if position_ids is None and attention_mask is not None and attention_mask.dim() == 2:
            past = cache.get_seq_length() if cache is not None else 0
            if past == 0:
                # Left padding gives each sequence the positions it has alone.
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

        return self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
