"""`StormForConditionalGeneration`: SigLIP vision tower -> temporal projector -> token compression -> LLM.

A transformers-native model (PreTrainedModel + GenerationMixin): `from_pretrained`,
`save_pretrained` (safetensors), `generate`, SDPA attention, gradient checkpointing and the Auto
classes all work as for any transformers VLM. Shapes: B videos, T frames, N tokens per frame,
D width; L sequence length.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPooling, CausalLMOutputWithPast

from storm_vlm.model.compression import VisualTokenLayout, check_frame_mask
from storm_vlm.model.configuration import StormConfig
from storm_vlm.model.decode import decode_step
from storm_vlm.model.fast_paths import enable_fast_paths, siglip_stack
from storm_vlm.model.kv_cache import StormKVCache
from storm_vlm.model.projector import MambaTemporalProjector, MLPProjector
from storm_vlm.utils import IGNORE_INDEX, check_int

__all__ = ["StormPreTrainedModel", "StormForConditionalGeneration", "build_projector"]


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
        divide_out=config.projector_divide_out,
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


# The generate kwargs `_prefill` knows how to take one copy of (per row, or the shared cache and
# settings); any other kwarg makes it prefill every copy, as transformers does.
_PREFILL_ROW_KWARGS = {"attention_mask", "position_ids", "mm_encoder_outputs", "logits_to_keep", "cache", "use_cache"}


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
        enable_fast_paths(self)
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
            stacked = siglip_stack(layers[:stop], hidden)  # CPU inference: all the layers in one C call
            if stacked is not None:
                return stacked
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
        exist besides the output (concatenating at the end held all of them twice). Chunks are at
        most `config.vision_batch_size` frames, as even as their count allows.
        """
        dtype = next(self.vision_tower.parameters()).dtype
        n = frames.shape[0]
        calls = -(-n // self.config.vision_batch_size)
        out = None
        for c in range(calls):  # calls of (nearly) equal size: no short last one
            i, j = n * c // calls, n * (c + 1) // calls
            hidden = self._tower_layer_output(frames[i:j].to(dtype))
            if hidden.shape[0] == n:
                return hidden
            if out is None:
                out = hidden.new_empty(n, *hidden.shape[1:])
            out[i : i + hidden.shape[0]] = hidden
        return out

    def video_sample_strides(self, num_videos: int, video_token_layout: torch.Tensor | None = None,
                             temporal_sample_stride: int | None = None) -> list[int]:
        """The test-time sampling stride of each video: what the processor counted
        (`video_token_layout` rows), else `temporal_sample_stride`, else the config's default.

        A layout counted for another model (grid, pooling) or a `temporal_sample_stride` that
        differs from the counted one is a ValueError naming both.
        """
        if temporal_sample_stride is not None:
            check_int("temporal_sample_stride", temporal_sample_stride)
        if video_token_layout is None:
            stride = self.config.temporal_sample_stride if temporal_sample_stride is None else temporal_sample_stride
            return [stride] * num_videos
        rows = torch.as_tensor(video_token_layout).tolist()
        if len(rows) != num_videos or any(len(r) != 4 for r in rows):
            raise ValueError(f"video_token_layout must have shape ({num_videos}, 4) for {num_videos} videos, "
                             f"got {tuple(torch.as_tensor(video_token_layout).shape)}")
        mine = self.config.visual_token_layout
        strides = []
        for row in rows:
            layout = VisualTokenLayout.from_row(row)
            if not layout.same_model(mine):
                raise ValueError(
                    f"the processor counted visual tokens for {layout} but this model has {mine}: "
                    "use the processor saved with this model")
            strides.append(layout.temporal_sample_stride)
        if temporal_sample_stride is not None and any(s != temporal_sample_stride for s in strides):
            raise ValueError(
                f"temporal_sample_stride={temporal_sample_stride} was given to the model, but the processor "
                f"counted these videos with stride {sorted(set(strides))}: name the stride once, to the "
                "processor (the batch carries it)")
        return strides

    def get_video_features(
        self,
        pixel_values_videos: torch.Tensor,
        video_frame_mask: torch.Tensor | None = None,
        temporal_sample_stride: int | None = None,
        video_token_layout: torch.Tensor | None = None,
        return_dict: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor] | BaseModelOutputWithPooling:
        """Visual tokens for a batch of videos.

        pixel_values_videos (B, T, 3, H, W); video_frame_mask (B, T) bool (True = real frame,
        padding as a suffix) or None; video_token_layout (B, 4) as the processor writes it, or
        None. Only real frames go through the vision tower (in chunks of
        `config.vision_batch_size`); the projector sees each whole video; then the layout's
        temporal pooling, spatial pooling and test-time sampling (stride per video: see
        `video_sample_strides`).

        Returns (features (B, T', N', D), mask (B, T') bool: True where a video has a real frame);
        with ``return_dict`` a BaseModelOutputWithPooling whose pooler_output lists each video's
        visual tokens (N_b, D) in the order forward writes them: what `generate` asks for to encode
        the videos once (before it repeats rows for beams, before a chunked prefill) and hands to
        forward as ``mm_encoder_outputs["video"]``.
        """
        if return_dict:
            with self._autocast():
                feats, mask = self.get_video_features(pixel_values_videos, video_frame_mask, temporal_sample_stride,
                                                      video_token_layout)
            return BaseModelOutputWithPooling(pooler_output=[f[m].flatten(0, 1) for f, m in zip(feats, mask)])
        if pixel_values_videos.dim() != 5:
            raise ValueError(
                f"pixel_values_videos must have shape (B, T, 3, H, W), got {tuple(pixel_values_videos.shape)}"
            )
        b, t = pixel_values_videos.shape[:2]
        strides = self.video_sample_strides(b, video_token_layout, temporal_sample_stride)
        mask = video_frame_mask
        if mask is not None:
            if tuple(mask.shape) != (b, t):
                raise ValueError(f"video_frame_mask shape {tuple(mask.shape)} does not match (B, T) = {(b, t)}")
            mask = mask.to(device=pixel_values_videos.device, dtype=torch.bool)
            check_frame_mask("video_frame_mask", pixel_values_videos, mask)  # padding after the real frames
            if bool(mask.all()):
                mask = None
        if mask is None:
            # every frame is real: views, no copies of the pixels or the features
            feats = self._vision_features(pixel_values_videos.flatten(0, 1))
            full = feats.view(b, t, *feats.shape[1:])
        else:
            feats = self._vision_features(pixel_values_videos[mask])
            full = feats.new_zeros(b, t, *feats.shape[1:])
            full[mask] = feats
        x = self.projector(full, frame_mask=mask)
        return self.config.visual_token_layout.apply(x, mask, sample_strides=strides)

    def encode_video_chunk(self, pixel_values: torch.Tensor, projector_states: list | None = None):
        """Streaming: projector outputs for the next frames of one video, continuing from `projector_states`.

        pixel_values (T_c, 3, H, W) -> ``(x (T_c, N, D), states)``: the projector's outputs before
        any compression (pooling windows may straddle chunks, so the caller pools) and the states
        to pass with the next chunk (None at the video's start). Chunk after chunk equals
        `get_video_features`' projector pass over the whole video. Needs a causal Mamba projector
        (`projector_bidirectional=False`) or the MLP baseline (no state: frames are independent).
        """
        feats = self._vision_features(pixel_values)[None]
        if isinstance(self.projector, MLPProjector):
            return self.projector(feats)[0], None
        out, states = self.projector.forward_chunk(feats, projector_states)
        return out[0], states

    def get_image_features(self, pixel_values: torch.Tensor,
                           return_dict: bool = False) -> torch.Tensor | BaseModelOutputWithPooling:
        """Visual tokens for images: pixel_values (B, 3, H, W) -> (B, 1, N', D) (a one-frame video);
        with ``return_dict``, each image's (N', D) listed in pooler_output (see `get_video_features`)."""
        if pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must have shape (B, 3, H, W), got {tuple(pixel_values.shape)}")
        with self._autocast():
            feats = self.get_video_features(pixel_values[:, None], temporal_sample_stride=1)[0]
        return BaseModelOutputWithPooling(pooler_output=list(feats.flatten(1, 2))) if return_dict else feats

    def _autocast(self):
        """The autocast of a model prepared for the bfloat16 precision on CPU
        (`storm_vlm.inference.prepare_for_inference`) when its caller set none, else a no-op: the
        model runs under it wherever it is called, generate's encoding of the visuals included."""
        precision = getattr(self, "_storm_precision", None)
        if (precision is not None and precision.autocast is not None
                and not torch.is_autocast_enabled(precision.device_type)):
            return precision.context()
        return contextlib.nullcontext()

    def _items_per_row(self, input_ids: torch.Tensor, token_id: int | None, name: str,
                       item_tokens: list[int]) -> list[int]:
        """How many of the videos (or images), taken in order, each row of input_ids (B, L) holds.

        item_tokens: each video's / image's visual-token count. A row's `token_id` placeholders must
        be the tokens of whole consecutive items: the order `_merge` writes features in. A
        ValueError names the mismatch otherwise.
        """
        if token_id is None:
            raise ValueError(f"config.{name}_token_id is not set, so {name} placeholders cannot be found")
        per_row = (input_ids == token_id).sum(-1).tolist()
        if sum(per_row) != sum(item_tokens):
            raise ValueError(
                f"{name} placeholder mismatch: input_ids hold {sum(per_row)} <{name}> tokens but the "
                f"{name}s give {sum(item_tokens)} visual tokens"
            )
        groups, start = [], 0
        for row, want in enumerate(per_row):
            end, have = start, 0
            while have < want:
                have += item_tokens[end]
                end += 1
            if have != want:
                raise ValueError(
                    f"{name} placeholder mismatch: row {row} of input_ids holds {want} <{name}> tokens, which "
                    f"is not a whole number of {name}s (visual tokens per {name}, in order: {item_tokens})"
                )
            groups.append(end - start)
            start = end
        return groups

    def _merge(self, input_ids, inputs_embeds, token_id, name, features: torch.Tensor,
               item_tokens: list[int] | None) -> torch.Tensor:
        """Write `features` (M, D), the visual tokens of items with `item_tokens` tokens each, into
        the positions of `token_id` in input_ids (B, L), in order over (batch, sequence)
        (`_items_per_row` checks the counts). `item_tokens` None: features generate encoded before
        it split the prompt into chunks, where an item may span chunks; only the total is checked."""
        if item_tokens is not None:
            self._items_per_row(input_ids, token_id, name, item_tokens)
        elif int((input_ids == token_id).sum()) != features.shape[0]:
            raise ValueError(f"{name} placeholder mismatch: input_ids hold {int((input_ids == token_id).sum())} "
                             f"<{name}> tokens but mm_encoder_outputs gives {features.shape[0]} visual tokens")
        positions = input_ids == token_id
        features = features.to(device=inputs_embeds.device, dtype=inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(positions[..., None].to(inputs_embeds.device), features)

    # ---- forward / generate ------------------------------------------------------------------------

    @staticmethod
    def _positions_from_mask(attention_mask, cache, input_ids, inputs_embeds) -> torch.Tensor | None:
        """Positions (B, L) of the new tokens, counted from each row's first real token, from a 2-D
        attention mask over the cached and the new tokens: a padded row gets the positions it has
        alone, in the prefill and in every cached step after it (generate passes position_ids; a
        hand-written decode loop passes only the growing mask). None where the LLM's own positions
        (from the cache's length on) are the same, or the mask does not cover past + new tokens."""
        tokens = input_ids if input_ids is not None else inputs_embeds
        if attention_mask is None or attention_mask.dim() != 2 or tokens is None or tokens.dim() < 2:
            return None
        new = tokens.shape[1]
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask.shape[1] != past + new or (past and bool(attention_mask.all())):
            return None
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -new:]

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, *args, **kwargs):
        """As GenerationMixin's, but the default dynamic cache is a `StormKVCache` (in-place appends)."""
        out = super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get("cache")
        if (type(cache) is DynamicCache and not getattr(cache, "_is_user_defined", False) and not cache.offloading
                and cache.get_seq_length() == 0):
            model_kwargs["cache"] = StormKVCache(config=self.config.get_text_config(decoder=True))
        return out

    def _prefill(self, input_ids, generation_config, model_kwargs: dict, is_first_iteration: bool = True):
        """As GenerationMixin's, once per prompt: for beams or `num_return_sequences` generate repeats
        each row before the prefill (k copies in a row), so here the prefill runs on one copy of each
        and its cache and last logits are repeated k times: the same values for 1/k of the work."""
        copies = max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1)
        cache = model_kwargs.get("cache")
        if (copies == 1 or not is_first_iteration or type(cache) is not StormKVCache or cache.get_seq_length()
                or set(model_kwargs) - _PREFILL_ROW_KWARGS or input_ids.shape[0] % copies
                or generation_config.output_hidden_states or generation_config.output_attentions
                or not torch.equal(input_ids, input_ids[::copies].repeat_interleave(copies, 0))):
            return super()._prefill(input_ids, generation_config, model_kwargs, is_first_iteration)
        one = {k: v[::copies] if k in ("attention_mask", "position_ids") and v is not None else v
               for k, v in model_kwargs.items()}
        if one.get("mm_encoder_outputs"):
            one["mm_encoder_outputs"] = {name: self._first_copies(input_ids, name, output, copies)
                                         for name, output in one["mm_encoder_outputs"].items() if output is not None}
        outputs = super()._prefill(input_ids[::copies], generation_config, one, is_first_iteration)
        outputs.cache.batch_repeat_interleave(copies)
        outputs.logits = outputs.logits.repeat_interleave(copies, 0)
        return outputs

    def _first_copies(self, input_ids, name: str, output: BaseModelOutputWithPooling, copies: int):
        """`output`'s visual tokens (pooler_output: each item's (N_i, D), over the expanded rows of
        input_ids) for rows 0, copies, 2·copies, ...: one (M_row, D) entry per kept row."""
        per_row = (input_ids == getattr(self.config, f"{name}_token_id")).sum(-1).tolist()
        tokens = output.pooler_output
        tokens = torch.cat([t.reshape(-1, t.shape[-1]) for t in tokens]) if isinstance(tokens, (list, tuple)) \
            else tokens.reshape(-1, tokens.shape[-1])
        return BaseModelOutputWithPooling(pooler_output=list(tokens.split(per_row))[::copies])

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
        video_token_layout: torch.Tensor | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Causal-LM forward with visual tokens spliced in.

        input_ids (B, L) with each video's / image's placeholder run (`<video>` / `<image>` token
        repeated exactly as many times as the processor counted); pixel_values_videos
        (V, T, 3, H, W), video_frame_mask (V, T) bool and video_token_layout (V, 4), as the
        processor returns them; pixel_values (I, 3, H, W). Videos and images are in the order their
        placeholder runs appear in the batch (row by row). temporal_sample_stride: only for inputs
        without video_token_layout (else it must match it). mm_encoder_outputs: instead of pixels,
        the visual tokens already encoded ({"video": get_video_features(..., return_dict=True),
        "image": get_image_features(..., return_dict=True)}), as generate passes them: it encodes
        the visuals once, then repeats them for beams or slices them for a chunked prefill (so a
        video can also be encoded once and asked about many times). labels (B, L), -100 = ignored
        (placeholder positions are always ignored). Returns CausalLMOutputWithPast (loss, logits, cache).
        """
        precision = getattr(self, "_storm_precision", None)  # set by storm_vlm.inference.prepare_for_inference
        if precision is not None and precision.autocast is not None and not torch.is_autocast_enabled(
                precision.device_type):
            # a model prepared for the bfloat16 precision on CPU keeps its LLM's linear layers in bf16, which
            # only autocast pairs with the float32 activations: run under it wherever the model is called
            call = {k: v for k, v in locals().items() if k not in ("self", "kwargs", "precision", "__class__")}
            with precision.context():
                return self.forward(**call, **kwargs)
        if "past_key_values" in kwargs and cache is None:
            cache = kwargs.pop("past_key_values")
        if position_ids is None:
            position_ids = self._positions_from_mask(attention_mask, cache, input_ids, inputs_embeds)
        encoded = {k: v for k, v in (mm_encoder_outputs or {}).items() if v is not None}
        if pixel_values_videos is None and pixel_values is None and not encoded and labels is None:
            fast = decode_step(self, input_ids, inputs_embeds, attention_mask, position_ids, cache, use_cache, kwargs)
            if fast is not None:  # one greedy CPU decode step (storm_vlm.model.decode.DecodeStep)
                return fast
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        has_visual = pixel_values_videos is not None or pixel_values is not None
        if has_visual and encoded:
            raise ValueError("pass pixel values or mm_encoder_outputs, not both")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
            if pixel_values_videos is not None:
                feats, out_mask = self.get_video_features(pixel_values_videos, video_frame_mask,
                                                          temporal_sample_stride, video_token_layout)
                tokens = feats[out_mask]
                inputs_embeds = self._merge(
                    input_ids, inputs_embeds, self.config.video_token_id, "video", tokens.flatten(0, 1),
                    (out_mask.sum(-1) * feats.shape[2]).tolist()
                )
            if pixel_values is not None:
                feats = self.get_image_features(pixel_values)
                inputs_embeds = self._merge(
                    input_ids, inputs_embeds, self.config.image_token_id, "image", feats.flatten(0, 2),
                    [feats.shape[2]] * feats.shape[0]
                )
            for name, output in encoded.items():
                if name not in ("video", "image"):
                    raise ValueError(f"mm_encoder_outputs holds {name!r}: this model reads 'video' and 'image'")
                feats = output.pooler_output
                feats = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats]) if isinstance(feats, (list, tuple)) \
                    else feats.reshape(-1, feats.shape[-1])
                inputs_embeds = self._merge(input_ids, inputs_embeds, getattr(self.config, f"{name}_token_id"), name,
                                            feats, None)
        elif has_visual or encoded:
            raise ValueError("visual inputs need input_ids (the placeholders tell where visual tokens go)")

        if labels is not None and input_ids is not None:
            for token_id in (self.config.video_token_id, self.config.image_token_id):
                if token_id is not None:
                    labels = labels.masked_fill(input_ids == token_id, IGNORE_INDEX)

        if cache is None and use_cache:
            cache = StormKVCache(config=self.config.get_text_config(decoder=True))

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
