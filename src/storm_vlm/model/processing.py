"""`StormProcessor`: frames -> pixel values, text -> token ids with expanded visual placeholders.

Each `<video>` / `<image>` placeholder in the text becomes exactly as many placeholder tokens as
the model produces visual tokens for that input, counted by the model's `VisualTokenLayout`
(saved with the processor as `visual_token_layout`). The layout each video was counted with
travels in the batch (`video_token_layout`), so the model applies exactly that: a test-time
sampling stride is named once, to the processor.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature, ProcessorMixin
from transformers.tokenization_utils_base import AddedToken
from transformers.utils.chat_template_utils import render_jinja_template

from storm_vlm.errors import StormError
from storm_vlm.model.compression import VisualTokenLayout
from storm_vlm.utils import IGNORE_INDEX, IMAGE_TOKEN, VIDEO_TOKEN
from storm_vlm.video import load_video

__all__ = ["StormProcessor", "add_placeholder_tokens", "CHATML_VISUAL_TEMPLATE", "LLAMA3_VISUAL_TEMPLATE",
           "default_chat_template"]


def add_placeholder_tokens(tokenizer, video_token: str = VIDEO_TOKEN, image_token: str = IMAGE_TOKEN) -> int:
    """Add the placeholders as special tokens (never split) if missing, and a pad token; returns how many were added."""
    missing = [t for t in (video_token, image_token) if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return len(missing)

# Content items render as: text -> its text; video -> "<video>\n"; image -> "<image>\n".
# Assistant turns are wrapped in {% generation %} so `return_assistant_tokens_mask` works.
_RENDER_CONTENT = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for item in content -%}"
    "{%- if item['type'] == 'video' -%}{{ '<video>\\n' }}"
    "{%- elif item['type'] == 'image' -%}{{ '<image>\\n' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)

CHATML_VISUAL_TEMPLATE = _RENDER_CONTENT + (
    "{%- if messages[0]['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{ render(message['content']) + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{%- else -%}"
    "{{ render(message['content']) + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

LLAMA3_VISUAL_TEMPLATE = _RENDER_CONTENT + (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{ render(message['content']) | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{%- else -%}"
    "{{ render(message['content']) | trim + '<|eot_id|>' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
)


def default_chat_template(tokenizer) -> str:
    """The multimodal chat template matching a tokenizer's conversation format (Llama-3 or ChatML)."""
    vocab = tokenizer.get_vocab()
    if "<|start_header_id|>" in vocab and "<|eot_id|>" in vocab:
        return LLAMA3_VISUAL_TEMPLATE
    return CHATML_VISUAL_TEMPLATE


def _frames_of(video, index: int) -> np.ndarray:
    """A video (array (T, H, W, 3) uint8, a clip with `.frames`, or a list of frames) -> (T, H, W, 3) uint8."""
    frames = getattr(video, "frames", video)
    if isinstance(frames, torch.Tensor):
        frames = frames.cpu().numpy()
    if isinstance(frames, (list, tuple)):
        frames = np.stack([np.asarray(f) for f in frames]) if len(frames) else np.zeros((0, 1, 1, 3), np.uint8)
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise StormError(f"video {index}: expected frames of shape (T, H, W, 3), got {frames.shape}")
    if frames.shape[0] == 0:
        raise StormError(f"video {index}: has no frames")
    if frames.dtype != np.uint8:
        raise StormError(f"video {index}: expected uint8 frames, got {frames.dtype}")
    return frames


def _image_of(image, index: int) -> np.ndarray:
    array = np.asarray(image.convert("RGB")) if hasattr(image, "convert") else np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise StormError(f"image {index}: expected a PIL image or a uint8 array (H, W, 3), got {array.shape} {array.dtype}")
    return array


def _ndim(x) -> int:
    return x.ndim if isinstance(x, (np.ndarray, torch.Tensor)) else -1


def _is_one_video(x) -> bool:
    """A clip with `.frames`, a (T, H, W, 3) array, or a list of (H, W, 3) frames."""
    if hasattr(x, "frames") or _ndim(x) == 4:
        return True
    return isinstance(x, (list, tuple)) and len(x) > 0 and (_ndim(x[0]) == 3 or hasattr(x[0], "convert"))


def _is_one_image(x) -> bool:
    return hasattr(x, "convert") or _ndim(x) == 3


class StormProcessor(ProcessorMixin):
    """SigLIP image processor + tokenizer for STORM.

    Args:
        image_processor: a SigLIP image processor (resizes every frame to the vision tower's size).
        tokenizer: the LLM's tokenizer; `<video>` / `<image>` are added as special tokens if missing.
        chat_template: Jinja template for `apply_chat_template` (content items
            `{"type": "video"}`, `{"type": "image"}`, `{"type": "text", "text": ...}`).
        video_token, image_token: placeholder strings.
        visual_token_layout: the `StormConfig.visual_token_layout` of the model this processor
            feeds, as a dict (`VisualTokenLayout.to_dict()`) or a `VisualTokenLayout`.
        visual_token_config: what 0.1.0 saved instead (image/patch size, downsample ratio, pooling,
            sampling); read when `visual_token_layout` is absent, never written.
        padding_side: default side for batch padding ("left" suits batched generation; the model
            gives the same logits either way).
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        video_token: str = VIDEO_TOKEN,
        image_token: str = IMAGE_TOKEN,
        visual_token_layout: dict | VisualTokenLayout | None = None,
        padding_side: str = "left",
        visual_token_config: dict | None = None,
        **kwargs,
    ):
        if padding_side not in ("left", "right"):
            raise StormError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.padding_side = padding_side
        self.video_token = video_token
        self.image_token = image_token
        if visual_token_layout is None:
            if visual_token_config is None:
                # SigLIP-so400m-patch14-448 with a 2x2 pixel shuffle, no compression
                size = getattr(image_processor, "size", None) or {}
                visual_token_config = {"image_size": int(size.get("height", 448)), "patch_size": 14,
                                       "downsample_ratio": 2}
            visual_token_layout = visual_token_config
        self.layout = visual_token_layout
        if tokenizer is not None:
            add_placeholder_tokens(tokenizer, video_token, image_token)
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.video_token_id = tokenizer.convert_tokens_to_ids(video_token) if tokenizer is not None else None
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token) if tokenizer is not None else None

    # ---- counting ----------------------------------------------------------------------------------

    @property
    def layout(self) -> VisualTokenLayout:
        """The visual-token layout this processor counts with (the model's)."""
        return self._layout

    @layout.setter
    def layout(self, value: dict | VisualTokenLayout) -> None:
        try:
            layout = value if isinstance(value, VisualTokenLayout) else VisualTokenLayout.from_dict(value)
        except (TypeError, ValueError) as exc:
            raise StormError(f"StormProcessor: bad visual_token_layout {value!r} ({exc})") from None
        self._layout = layout
        self.visual_token_layout = layout.to_dict()  # what save_pretrained writes

    @property
    def image_size(self) -> int:
        """The side, in pixels, the image processor resizes every frame to."""
        size = getattr(self.image_processor, "size", None) or {}
        return int(size.get("height") or size.get("shortest_edge") or 448)

    def num_visual_tokens(self, num_frames: int, temporal_sample_stride: int | None = None) -> int:
        """Placeholder tokens for a `num_frames`-frame video (`VisualTokenLayout.num_tokens`)."""
        return self.layout.with_sample_stride(temporal_sample_stride).num_tokens(num_frames)

    # ---- pixels ------------------------------------------------------------------------------------

    def _pixels(self, frames: Sequence[np.ndarray]) -> torch.Tensor:
        """frames: list of (H, W, 3) uint8 -> (F, 3, S, S) float32 normalised by the image processor.

        Frames already at the processor's size skip its per-frame resize: they are rescaled and
        normalised in one tensor operation (what the processor computes for them, much faster)."""
        ip = self.image_processor
        size = self.image_size
        plain = (getattr(ip, "do_rescale", False) and getattr(ip, "do_normalize", False)
                 and not getattr(ip, "do_center_crop", False) and not getattr(ip, "do_pad", False)
                 and getattr(ip, "image_mean", None) is not None and getattr(ip, "image_std", None) is not None)
        if plain and frames and all(f.dtype == np.uint8 and f.shape == (size, size, 3) for f in frames):
            x = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).to(torch.float32) * float(ip.rescale_factor)
            mean = torch.tensor(ip.image_mean, dtype=torch.float32).view(1, -1, 1, 1)
            std = torch.tensor(ip.image_std, dtype=torch.float32).view(1, -1, 1, 1)
            return ((x - mean) / std).contiguous()
        out = ip(images=list(frames), return_tensors="pt")["pixel_values"]
        return out.to(torch.float32)

    def _videos_to_pixels(self, videos: list) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """-> pixel_values_videos (V, T_max, 3, S, S), video_frame_mask (V, T_max) bool, frame counts."""
        per_video = [self._pixels(list(_frames_of(v, i))) for i, v in enumerate(videos)]
        lengths = [p.shape[0] for p in per_video]
        t_max = max(lengths)
        s = per_video[0].shape[-1]
        pixels = torch.zeros(len(videos), t_max, 3, per_video[0].shape[-2], s)
        mask = torch.zeros(len(videos), t_max, dtype=torch.bool)
        for i, p in enumerate(per_video):
            pixels[i, : p.shape[0]] = p
            mask[i, : p.shape[0]] = True
        return pixels, mask, lengths

    # ---- text --------------------------------------------------------------------------------------

    @staticmethod
    def _flatten(x, is_single) -> list:
        """One input, a flat list, or per-sample nested lists -> a flat list in order."""
        if x is None:
            return []
        if is_single(x):
            return [x]
        flat = []
        for item in x:
            if is_single(item):
                flat.append(item)
            else:
                flat.extend(item)
        return flat

    def __call__(
        self,
        text: str | list[str] | None = None,
        videos=None,
        images=None,
        temporal_sample_stride: int | None = None,
        return_tensors: str | None = "pt",
        padding: bool = True,
        padding_side: str | None = None,
        return_offsets_mapping: bool = False,
        **kwargs,
    ) -> BatchFeature:
        """Tokenize `text` and preprocess `videos` / `images`.

        text: one string or a batch; each `<video>` / `<image>` in it is expanded to the visual token
        count of the matching input (videos and images are matched to placeholders in order of
        appearance over the batch). videos: list of (T, H, W, 3) uint8 arrays or `load_video` clips
        (a single one is accepted too); images: list of PIL images or (H, W, 3) uint8 arrays.

        temporal_sample_stride: test-time sampling for every video (None: the layout's default); it is
        recorded per video in `video_token_layout`, which the model reads, so it is named only here.

        Returns a BatchFeature with input_ids (B, L), attention_mask (B, L), and with videos
        pixel_values_videos (V, T_max, 3, S, S), video_frame_mask (V, T_max) bool and
        video_token_layout (V, 4) int64 (`VisualTokenLayout.as_row()` each video was counted with);
        with images pixel_values (I, 3, S, S). Padding side: `padding_side`, else the processor's
        (left by default).
        """
        if text is None:
            raise StormError("StormProcessor needs text (with <video>/<image> placeholders for the visual inputs)")
        texts = [text] if isinstance(text, str) else list(text)
        video_list = self._flatten(videos, _is_one_video)
        image_list = self._flatten(images, _is_one_image)
        n_video_ph = sum(t.count(self.video_token) for t in texts)
        n_image_ph = sum(t.count(self.image_token) for t in texts)
        if n_video_ph != len(video_list):
            raise StormError(f"the text has {n_video_ph} {self.video_token} placeholders but {len(video_list)} videos were given")
        if n_image_ph != len(image_list):
            raise StormError(f"the text has {n_image_ph} {self.image_token} placeholders but {len(image_list)} images were given")

        data: dict = {}
        video_counts: list[int] = []
        if video_list:
            pixels, mask, lengths = self._videos_to_pixels(video_list)
            data["pixel_values_videos"] = pixels
            data["video_frame_mask"] = mask
            layout = self.layout.with_sample_stride(temporal_sample_stride)
            data["video_token_layout"] = [layout.as_row() for _ in lengths]
            video_counts = [layout.num_tokens(t) for t in lengths]
        image_counts: list[int] = []
        if image_list:
            data["pixel_values"] = self._pixels([_image_of(im, i) for i, im in enumerate(image_list)])
            image_counts = [self.num_visual_tokens(1, 1)] * len(image_list)

        add_special = kwargs.get("add_special_tokens")
        if add_special is None:
            # A prompt rendered by a chat template already starts with BOS: don't add a second one.
            bos = self.tokenizer.bos_token
            add_special = not (bos is not None and all(t.startswith(bos) for t in texts))
        enc = self.tokenizer(texts, add_special_tokens=add_special, return_offsets_mapping=return_offsets_mapping)
        ids_batch, offsets_batch = [], []
        vi = ii = 0
        for row, ids in enumerate(enc["input_ids"]):
            offsets = enc["offset_mapping"][row] if return_offsets_mapping else [None] * len(ids)
            new_ids, new_offsets = [], []
            for tok, off in zip(ids, offsets):
                if tok == self.video_token_id:
                    n = video_counts[vi]
                    vi += 1
                elif tok == self.image_token_id:
                    n = image_counts[ii]
                    ii += 1
                else:
                    n = 1
                new_ids.extend([tok] * n)
                new_offsets.extend([off] * n)
            ids_batch.append(new_ids)
            offsets_batch.append(new_offsets)
        if vi != len(video_counts) or ii != len(image_counts):
            raise StormError(
                f"the tokenizer split the {self.video_token}/{self.image_token} placeholders: found {vi} video and "
                f"{ii} image placeholder tokens for {len(video_counts)} videos and {len(image_counts)} images"
            )

        side = padding_side or self.padding_side
        max_len = max(len(x) for x in ids_batch)
        if not padding and len({len(x) for x in ids_batch}) > 1:
            raise StormError("texts tokenize to different lengths; use padding=True")
        pad_id = self.tokenizer.pad_token_id
        input_ids, attention = [], []
        for ids in ids_batch:
            pad = max_len - len(ids)
            if side == "left":
                input_ids.append([pad_id] * pad + ids)
                attention.append([0] * pad + [1] * len(ids))
            else:
                input_ids.append(ids + [pad_id] * pad)
                attention.append([1] * len(ids) + [0] * pad)
        data["input_ids"] = input_ids
        data["attention_mask"] = attention
        if return_offsets_mapping:
            padded = []
            for offs in offsets_batch:
                pad = [(0, 0)] * (max_len - len(offs))
                padded.append(pad + offs if side == "left" else offs + pad)
            data["offset_mapping"] = padded
        return BatchFeature(data=data, tensor_type=return_tensors)

    # ---- chat --------------------------------------------------------------------------------------

    def _collect_visuals(self, conversations: list, num_frames: int) -> tuple[list, list]:
        videos, images = [], []
        for conversation in conversations:
            for message in conversation:
                content = message.get("content")
                if not isinstance(content, list):
                    continue
                for item in content:
                    if not isinstance(item, dict):
                        continue
                    if item.get("type") == "video":
                        source = next((item[k] for k in ("video", "path", "url") if item.get(k) is not None), None)
                        if isinstance(source, str):
                            source = load_video(source, num_frames=item.get("num_frames", num_frames), min_side=self.image_size)
                        if source is not None:
                            videos.append(source)
                    elif item.get("type") == "image":
                        source = next((item[k] for k in ("image", "path", "url") if item.get(k) is not None), None)
                        if isinstance(source, str):
                            with Image.open(source) as im:
                                source = im.convert("RGB")
                        if source is not None:
                            images.append(source)
        return videos, images

    def apply_chat_template(
        self,
        conversation,
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        return_dict: bool = False,
        return_tensors: str | None = "pt",
        return_assistant_tokens_mask: bool = False,
        videos=None,
        images=None,
        temporal_sample_stride: int | None = None,
        num_frames: int = 32,
        **kwargs,
    ):
        """Render a conversation (or a batch of them) with the processor's chat template.

        Content items: `{"type": "text", "text": ...}`, `{"type": "video", "video": frames | clip | path}`,
        `{"type": "image", "image": PIL | array | path}` (paths are loaded; videos with `num_frames`).
        `tokenize=False` returns the prompt string(s). `tokenize=True` returns input_ids, or with
        `return_dict=True` the full BatchFeature (as `__call__`); `return_assistant_tokens_mask=True`
        adds `assistant_masks` (B, L), 1 on the tokens of assistant turns (their end-of-turn token
        included). Explicit `videos=` / `images=` replace the ones found in the content items.
        """
        template = chat_template or self.chat_template or default_chat_template(self.tokenizer)
        if isinstance(conversation, (list, tuple)) and conversation and isinstance(conversation[0], (list, tuple)):
            conversations, batched = [list(c) for c in conversation], True
        else:
            conversations, batched = [list(conversation)], False
        special = {k: v for k, v in self.tokenizer.special_tokens_map.items() if isinstance(v, str)}
        prompts, generation_indices = render_jinja_template(
            conversations=conversations,
            chat_template=template,
            return_assistant_tokens_mask=return_assistant_tokens_mask,
            add_generation_prompt=add_generation_prompt,
            **special,
            **kwargs,
        )
        if not tokenize:
            return prompts if batched else prompts[0]
        found_videos, found_images = self._collect_visuals(conversations, num_frames)
        videos = found_videos if videos is None else videos
        images = found_images if images is None else images
        out = self(
            text=prompts,
            videos=videos or None,
            images=images or None,
            temporal_sample_stride=temporal_sample_stride,
            return_tensors=None,
            return_offsets_mapping=return_assistant_tokens_mask,
        )
        if return_assistant_tokens_mask:
            masks = []
            for offsets, spans in zip(out.pop("offset_mapping"), generation_indices):
                row = [0] * len(offsets)
                for start, end in spans:
                    for pos, (a, b) in enumerate(offsets):
                        if a < end and b > start:
                            row[pos] = 1
                masks.append(row)
            out["assistant_masks"] = masks
        out.convert_to_tensors(tensor_type=return_tensors)
        if return_dict:
            return out
        return out["input_ids"] if batched else out["input_ids"][0]

    def build_training_example(
        self,
        conversation: list[dict],
        videos=None,
        images=None,
        temporal_sample_stride: int | None = None,
        num_frames: int = 32,
    ) -> BatchFeature:
        """One supervised example from a (multi-turn) conversation.

        Returns a BatchFeature (batch of 1, tensors) with input_ids (1, L), attention_mask (1, L),
        labels (1, L) = input_ids on assistant tokens (end-of-turn included) and -100 elsewhere,
        plus pixel_values_videos / video_frame_mask / pixel_values for the visual inputs.
        """
        out = self.apply_chat_template(
            conversation,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
            videos=videos,
            images=images,
            temporal_sample_stride=temporal_sample_stride,
            num_frames=num_frames,
            return_tensors="pt",
        )
        mask = out.pop("assistant_masks").bool()
        out["labels"] = out["input_ids"].masked_fill(~mask, IGNORE_INDEX)
        return out

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values_videos", "video_frame_mask", "video_token_layout",
                "pixel_values"]
