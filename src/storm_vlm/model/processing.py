"""`StormProcessor`: frames -> pixel values, text -> token ids with expanded visual placeholders.

Each `<video>` / `<image>` placeholder in the text becomes exactly as many placeholder tokens as
the model produces visual tokens for that input, counted by the model's `VisualTokenLayout`
(saved with the processor as `visual_token_layout`). The layout each video was counted with
travels in the batch (`video_token_layout`), so the model applies exactly that: a test-time
sampling stride is named once, to the processor.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature, ProcessorMixin
from transformers.tokenization_utils_base import AddedToken
from transformers.utils.chat_template_utils import _compile_jinja_template, render_jinja_template

from storm_vlm.errors import StormError
from storm_vlm.media.images import load_image, pil_rgb
from storm_vlm.model.compression import VisualTokenLayout
from storm_vlm.utils import IGNORE_INDEX, IMAGE_TOKEN, VIDEO_TOKEN, base64_bytes, check_int
from storm_vlm.video import load_video, uniform_indices

__all__ = ["StormProcessor", "add_placeholder_tokens", "CHATML_VISUAL_TEMPLATE", "LLAMA3_VISUAL_TEMPLATE",
           "default_chat_template", "DEFAULT_NUM_FRAMES"]

# Frames read from a video file when the call does not say (`load_video`'s default).
DEFAULT_NUM_FRAMES = 32

# A URL (http://, s3://, ...): never fetched.
_URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://")


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


def _check_padding_side(side) -> None:
    if side not in ("left", "right"):
        raise StormError(f"padding_side must be 'left' or 'right', got {side!r}")


def default_chat_template(tokenizer) -> str:
    """The multimodal chat template matching a tokenizer's conversation format (Llama-3 or ChatML)."""
    vocab = tokenizer.get_vocab()
    if "<|start_header_id|>" in vocab and "<|eot_id|>" in vocab:
        return LLAMA3_VISUAL_TEMPLATE
    return CHATML_VISUAL_TEMPLATE


def _as_array(x) -> np.ndarray:
    """A numpy array, a torch tensor (any device; bf16 read as float32) or a PIL image -> np.ndarray.

    A PIL image becomes RGB as `load_image` makes a file's picture (transparent pixels over white, as
    transformers' image processors show them too), so a picture gives the same pixels as its path."""
    if isinstance(x, Image.Image):
        return pil_rgb(x)
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.float() if x.is_floating_point() else x).numpy()
    return np.asarray(x)


def _rgb_uint8(pixels: np.ndarray, what: str, shape: str) -> np.ndarray:
    """An image (H, W, 3) or frames (T, H, W, 3), given channels-last or channels-first, as
    channels-last uint8.

    Channels are read as transformers' `infer_channel_dimension_format` reads them (3 on the last
    or the channel-first axis), except that where both axes are 3 (a frame 3 pixels tall) they are
    taken as last, the documented layout, so frames `load_video` returns are never misread. Floats
    must be in [0, 1]: they are scaled by 255 and rounded, as transformers rescales them to 8 bits.
    """
    first = pixels.ndim - 3
    if pixels.shape[-1] != 3 and pixels.shape[first] == 3:
        pixels = np.moveaxis(pixels, first, -1)
    elif pixels.shape[-1] != 3:
        raise StormError(f"{what}: expected {shape} (or channels first), got {pixels.shape}")
    expected = f"{what}: expected uint8 pixels or floats in [0, 1], got {pixels.dtype}"
    if np.issubdtype(pixels.dtype, np.floating):
        lo, hi = (float(pixels.min()), float(pixels.max())) if pixels.size else (0.0, 0.0)
        if not (0.0 <= lo and hi <= 1.0):  # NaN fails too
            raise StormError(f"{expected} values in [{lo:g}, {hi:g}]")
        return np.rint(pixels * 255).astype(np.uint8)
    if pixels.dtype != np.uint8:
        raise StormError(expected)
    return pixels


def _frames_of(video, index: int) -> np.ndarray:
    """A video (a (T, H, W, 3) array or tensor, a clip with `.frames`, or a list of frames) -> (T, H, W, 3) uint8."""
    what = f"video {index}"
    frames = getattr(video, "frames", video)
    if isinstance(frames, (list, tuple)):
        if not frames:
            raise StormError(f"{what}: has no frames")
        arrays = [_as_array(f) for f in frames]
        if len({a.shape for a in arrays}) > 1:
            raise StormError(f"{what}: frames of different sizes {sorted({a.shape for a in arrays})}")
        frames = np.stack(arrays)
    frames = _as_array(frames)
    if frames.ndim != 4:
        raise StormError(f"{what}: expected frames of shape (T, H, W, 3), got {frames.shape}")
    if frames.shape[0] == 0:
        raise StormError(f"{what}: has no frames")
    return _rgb_uint8(frames, what, "frames of shape (T, H, W, 3)")


def _decode_base64(text: str, what: str) -> bytes:
    """`utils.base64_bytes`, a StormError naming `what` when the text is not base64."""
    try:
        return base64_bytes(text)
    except ValueError:
        raise StormError(f"{what}: not valid base64") from None


def _image_of(image, index: int) -> np.ndarray:
    """An image (a path, a `data:` URL, a file's bytes, a PIL image, an (H, W, 3) array or tensor,
    or (H, W) grey) -> (H, W, 3) uint8.

    A data URL ("data:image/png;base64,...") is decoded as transformers' `load_image` decodes one;
    other URLs are not fetched (as `load_video` does not fetch them)."""
    what = f"image {index}"
    if isinstance(image, str) and image[:5].lower() == "data:":
        header, _, payload = image.partition(",")
        if not header.lower().endswith(";base64"):
            raise StormError(f"{what}: a data URL must be base64-encoded (data:<type>;base64,<bytes>)")
        image = _decode_base64(payload, what)
    if _is_path(image) or isinstance(image, bytes):
        name = "its bytes" if isinstance(image, bytes) else os.fspath(image)
        try:
            array = load_image(image)
        except OSError as exc:  # a missing file, or one PIL cannot read (as load_video's VideoDecodeError says)
            if _URL.match(name):
                raise StormError(f"{what}: {name}: URLs are not fetched; download the image and give its "
                                 "path") from None
            raise StormError(f"{what}: cannot read {name}: {exc}") from None
    else:
        array = _as_array(image)
    if array.ndim == 2:  # grey, as PIL's convert("RGB") widens it
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3:
        raise StormError(f"{what}: expected a PIL image, a path or an (H, W, 3) array, got shape {array.shape}")
    return _rgb_uint8(array, what, "an (H, W, 3) array")


def _ndim(x) -> int:
    return x.ndim if isinstance(x, (np.ndarray, torch.Tensor)) else -1


def _is_path(x) -> bool:
    return isinstance(x, (str, os.PathLike))


def _is_one_video(x) -> bool:
    """A file path, a clip with `.frames`, a (T, H, W, 3) array, or a list of (H, W, 3) frames."""
    if _is_path(x) or hasattr(x, "frames") or _ndim(x) == 4:
        return True
    return isinstance(x, (list, tuple)) and len(x) > 0 and (_ndim(x[0]) == 3 or isinstance(x[0], Image.Image))


def _is_one_image(x) -> bool:
    """A file path or data URL, a file's bytes, a PIL image, or an (H, W, 3) / (H, W) array."""
    return _is_path(x) or isinstance(x, (bytes, Image.Image)) or _ndim(x) in (2, 3)


_ONE_VIDEO = "a video (a file path, a (T, H, W, 3) array, a clip with .frames or a list of frames)"
_ONE_IMAGE = "an image (a file path, a data: URL, a file's bytes, a PIL image or an (H, W, 3) array)"


@functools.lru_cache(maxsize=8)
def _template_variables(template: str) -> frozenset[str]:
    """The names a chat template reads from its context. transformers' ProcessorMixin.apply_chat_template
    sends a keyword argument to the template if the template reads it, else to the processor call;
    this is its test (`_get_template_variables`, which early 5.x releases lack)."""
    from jinja2 import meta

    return frozenset(meta.find_undeclared_variables(_compile_jinja_template(template).environment.parse(template)))


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
            gives the same logits either way). It is the tokenizer's `padding_side` (one setting, as in
            transformers' processors): setting either sets both.

    Any other keyword is a TypeError (as `ProcessorMixin` makes it), never silently dropped.
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
        _check_padding_side(padding_side)
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
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        if tokenizer is not None:
            self.padding_side = padding_side
        self.video_token_id = tokenizer.convert_tokens_to_ids(video_token) if tokenizer is not None else None
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token) if tokenizer is not None else None

    @property
    def padding_side(self) -> str:
        """The side `__call__` pads batches on unless told: the tokenizer's `padding_side`."""
        return self.tokenizer.padding_side

    @padding_side.setter
    def padding_side(self, value: str) -> None:
        _check_padding_side(value)
        self.tokenizer.padding_side = value

    def to_dict(self) -> dict:
        """ProcessorMixin's, with `padding_side` (kept on the tokenizer, so not among the attributes it saves)."""
        return {**super().to_dict(), "padding_side": self.padding_side}

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

    def literal(self, text: str) -> str:
        """`text` with the placeholders (<video>, <image>) it holds broken by a word joiner (U+2060,
        invisible), so they tokenize as text: typed by a user ("what does the HTML <video> tag
        do?"), they would otherwise be read as a video or an image that is not there."""
        for token in (self.video_token, self.image_token):
            text = text.replace(token, token[:1] + "\u2060" + token[1:])
        return text

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
        # channels_last: a frame 1 or 3 pixels tall would otherwise be guessed channels-first
        out = ip(images=list(frames), return_tensors="pt", input_data_format="channels_last")["pixel_values"]
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
    def _flatten(x, is_single, one: str, name: str) -> tuple[list, list[int] | None]:
        """One input, a flat list, or per-sample nested lists -> (a flat list in order, how many each
        nested list held: None unless every item of `x` is a nested list).

        `one` describes a single input for the error that anything else gets (a bare string is one
        path, never a sequence of characters)."""
        if x is None:
            return [], None
        if is_single(x):
            return [x], None
        if not isinstance(x, (list, tuple, np.ndarray, torch.Tensor)):
            raise StormError(f"{name} must be {one} or a list of them, got {type(x).__name__}")
        flat, nested = [], []
        for item in x:
            if is_single(item):
                flat.append(item)
            elif isinstance(item, (list, tuple)):
                flat.extend(item)
                nested.append(len(item))
            else:
                raise StormError(f"{name} must be {one} or a list of them; an item is a {type(item).__name__}")
        return flat, nested if nested and len(nested) == len(x) else None

    @staticmethod
    def _check_placeholders(texts: list[str], token: str, items: list, per_text: list[int] | None, name: str) -> None:
        """StormError unless the texts hold one `token` per item; with the items given per text
        (`per_text`, one nested list per text), each text must hold its own: the placeholders
        are matched to the items in order over the batch, so a text with a neighbour's video would
        silently read that video."""
        counts = [t.count(token) for t in texts]
        if sum(counts) != len(items):
            raise StormError(f"the text has {sum(counts)} {token} placeholders but {len(items)} {name} were given")
        if per_text is not None and len(per_text) == len(texts) and per_text != counts:
            row = next(i for i, (want, have) in enumerate(zip(counts, per_text)) if want != have)
            raise StormError(f"text {row} has {counts[row]} {token} placeholders but {per_text[row]} {name} were "
                             f"given for it ({token} placeholders per text: {counts}; {name} per text: {per_text})")

    def _load_video(self, path, num_frames: int, fps: float | None):
        """A video file's clip, its frames scaled while decoding to no less than the processor's size."""
        return load_video(path, num_frames=num_frames, fps=fps, min_side=self.image_size)

    def _sample_video(self, video, index: int, num_frames: int | None, fps: float | None):
        """Video `index` with the frames a call's `num_frames` / `fps` ask for.

        A file is read with `load_video` (num_frames None: DEFAULT_NUM_FRAMES). Frames already in
        memory are resampled to `num_frames` by `load_video`'s own rule (`uniform_indices`: evenly
        spread, repeated evenly when there are fewer), so a path and its decoded frames give the
        same count; None keeps them all. They carry no frame rate, so `fps` for them is an error:
        a sampling keyword is applied or refused, never ignored.
        """
        if _is_path(video):
            return self._load_video(video, DEFAULT_NUM_FRAMES if num_frames is None else num_frames, fps)
        if fps is not None:
            raise StormError(f"video {index}: fps={fps!r} samples a video file by its frame rate, but this video is "
                             "frames already (no frame rate): pass its path, or num_frames")
        if num_frames is None:
            return video
        check_int("num_frames", num_frames, error=StormError)
        frames = _frames_of(video, index)
        return frames[uniform_indices(len(frames), num_frames)[0]]

    def _truncate(self, ids_batch: list, offsets_batch: list, max_length: int) -> None:
        """Cut rows (visual tokens counted) to `max_length` from the tokenizer's `truncation_side`, in place.

        A cut that would take a visual placeholder is a StormError: the row's pixel values would
        no longer match its placeholders."""
        left = self.tokenizer.truncation_side == "left"
        visual = {self.video_token_id, self.image_token_id}
        for row, ids in enumerate(ids_batch):
            extra = len(ids) - max_length
            if extra <= 0:
                continue
            keep = slice(extra, None) if left else slice(None, max_length)
            cut = ids[:extra] if left else ids[max_length:]
            if any(t in visual for t in cut):
                raise StormError(
                    f"truncation to max_length={max_length} would cut visual placeholders from row {row} "
                    f"({len(ids)} tokens with its visual tokens; the tokenizer truncates on the "
                    f"{self.tokenizer.truncation_side}): raise max_length, or give fewer frames or a larger "
                    "temporal_sample_stride")
            ids_batch[row], offsets_batch[row] = ids[keep], offsets_batch[row][keep]

    def __call__(
        self,
        text: str | list[str] | None = None,
        videos=None,
        images=None,
        temporal_sample_stride: int | None = None,
        return_tensors: str | None = "pt",
        padding: bool | str = True,
        padding_side: str | None = None,
        return_offsets_mapping: bool = False,
        num_frames: int | None = None,
        fps: float | None = None,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        return_attention_mask: bool | None = None,
        add_special_tokens: bool | None = None,
    ) -> BatchFeature:
        """Tokenize `text` and preprocess `videos` / `images`.

        text: one string or a batch; each `<video>` / `<image>` in it is expanded to the visual token
        count of the matching input (videos and images are matched to placeholders in order of
        appearance over the batch; given as one list per text, each text must hold its own).
        videos: one video or a list of them (flat, or one list per text): file paths (read with
        `load_video(num_frames=num_frames, fps=fps)`; num_frames None: DEFAULT_NUM_FRAMES),
        `load_video` clips, (T, H, W, 3) arrays or tensors, or lists of frames (resampled to
        `num_frames` if given, by load_video's rule; `fps` needs a file). images: one or a list of
        file paths, `data:` URLs, files' bytes, PIL images or (H, W, 3) arrays. Arrays may also be
        channels-first ((T, 3, H, W), (3, H, W)); pixels are uint8, or floats in [0, 1].

        temporal_sample_stride: test-time sampling for every video (None: the layout's default); it is
        recorded per video in `video_token_layout`, which the model reads, so it is named only here.

        Tokenizer options, with the tokenizer's meaning, on the rows with their visual tokens:
        padding (True / "longest", "max_length" with max_length, False / "do_not_pad"),
        pad_to_multiple_of, padding_side (default: the processor's, which is the tokenizer's),
        truncation with max_length (default the tokenizer's model_max_length; cutting a visual
        placeholder is an error), return_attention_mask, add_special_tokens (default: added unless
        every text already starts with BOS), return_offsets_mapping. Other keywords are a TypeError.

        Returns a BatchFeature with input_ids (B, L), attention_mask (B, L), and with videos
        pixel_values_videos (V, T_max, 3, S, S), video_frame_mask (V, T_max) bool and
        video_token_layout (V, 4) int64 (`VisualTokenLayout.as_row()` each video was counted with);
        with images pixel_values (I, 3, S, S).
        """
        if text is None:
            raise StormError("StormProcessor needs text (with <video>/<image> placeholders for the visual inputs)")
        texts = [text] if isinstance(text, str) else list(text) if isinstance(text, (list, tuple)) else None
        if not texts or not all(isinstance(t, str) for t in texts):
            # transformers' processors take images first: processor(image, prompt) lands here
            bad = text if texts is None else next((t for t in texts if not isinstance(t, str)), [])
            raise StormError(f"text must be a string or a non-empty list of strings, got {type(bad).__name__} "
                             "(StormProcessor's arguments are text, videos, images: pass videos= and images= by name)")
        if temporal_sample_stride is not None:
            check_int("temporal_sample_stride", temporal_sample_stride, error=StormError)
        side = padding_side or self.padding_side
        _check_padding_side(side)
        video_list, videos_per_text = self._flatten(videos, _is_one_video, _ONE_VIDEO, "videos")
        image_list, images_per_text = self._flatten(images, _is_one_image, _ONE_IMAGE, "images")
        self._check_placeholders(texts, self.video_token, video_list, videos_per_text, "videos")
        self._check_placeholders(texts, self.image_token, image_list, images_per_text, "images")

        data: dict = {}
        video_counts: list[int] = []
        if video_list:
            video_list = [self._sample_video(v, i, num_frames, fps) for i, v in enumerate(video_list)]
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

        if add_special_tokens is None:
            # A prompt rendered by a chat template already starts with BOS: don't add a second one.
            bos = self.tokenizer.bos_token
            add_special_tokens = not (bos is not None and all(t.startswith(bos) for t in texts))
        enc = self.tokenizer(texts, add_special_tokens=add_special_tokens,
                             return_offsets_mapping=return_offsets_mapping)
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

        truncation = getattr(truncation, "value", truncation)  # transformers' TruncationStrategy
        if truncation in (True, "longest_first", "only_first"):
            self._truncate(ids_batch, offsets_batch,
                           max_length if max_length is not None else self.tokenizer.model_max_length)
        elif truncation not in (None, False, "do_not_truncate"):
            raise StormError(f"truncation must be True, False, 'longest_first', 'only_first' or 'do_not_truncate', "
                             f"got {truncation!r}")
        padding = getattr(padding, "value", padding)  # transformers' PaddingStrategy
        if padding in (True, "longest"):
            target = max(len(x) for x in ids_batch)
        elif padding == "max_length":
            if max_length is None:
                raise StormError("padding='max_length' needs max_length")
            target = max_length
        elif padding in (False, None, "do_not_pad"):
            target = 0
        else:
            raise StormError(f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}")
        if target and pad_to_multiple_of:
            target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
        if return_tensors is not None and len({max(len(x), target) for x in ids_batch}) > 1:
            raise StormError("texts tokenize to different lengths; use padding=True (or truncation with max_length)")

        pad_id = self.tokenizer.pad_token_id
        input_ids, attention, offsets_out = [], [], []
        for ids, offs in zip(ids_batch, offsets_batch):
            pad = max(target - len(ids), 0)
            mask = [1] * len(ids)
            if side == "left":
                input_ids.append([pad_id] * pad + ids)
                attention.append([0] * pad + mask)
                offsets_out.append([(0, 0)] * pad + offs)
            else:
                input_ids.append(ids + [pad_id] * pad)
                attention.append(mask + [0] * pad)
                offsets_out.append(offs + [(0, 0)] * pad)
        data["input_ids"] = input_ids
        if return_attention_mask is not False:
            data["attention_mask"] = attention
        if return_offsets_mapping:
            data["offset_mapping"] = offsets_out
        return BatchFeature(data=data, tensor_type=return_tensors)

    # ---- chat --------------------------------------------------------------------------------------

    def _collect_visuals(self, conversations: list, num_frames: int | None, fps: float | None,
                         read_videos: bool = True) -> tuple[list, list]:
        """The videos and images of the conversations' content items, in order. Videos are sampled
        here (`_sample_video`), with the item's own "num_frames" / "fps" if it has them, else the
        call's; image paths are read by `__call__`. read_videos=False skips the video items (the
        call gave its own videos: those files are not read). An image item's source is its "image",
        "path" or "url" (a data URL too), or its "base64" text: the keys transformers reads."""
        videos, images = [], []
        for conversation in conversations:
            for message in conversation:
                content = message.get("content")
                if not isinstance(content, list):
                    continue
                for item in content:
                    if not isinstance(item, dict):
                        continue
                    if item.get("type") == "video" and read_videos:
                        source = next((item[k] for k in ("video", "path", "url") if item.get(k) is not None), None)
                        if source is not None:
                            videos.append(self._sample_video(source, len(videos), item.get("num_frames", num_frames),
                                                             item.get("fps", fps)))
                    elif item.get("type") == "image":
                        source = next((item[k] for k in ("image", "path", "url") if item.get(k) is not None), None)
                        if source is None and item.get("base64") is not None:
                            source = _decode_base64(item["base64"], f"image {len(images)}")
                        if source is not None:
                            images.append(source)
        return videos, images

    def apply_chat_template(
        self,
        conversation,
        chat_template: str | None = None,
        tools: list | None = None,
        documents: list | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        tokenize: bool = False,
        return_dict: bool = False,
        return_tensors: str | None = "pt",
        return_assistant_tokens_mask: bool = False,
        processor_kwargs: dict | None = None,
        videos=None,
        images=None,
        **kwargs,
    ):
        """Render a conversation (or a batch of them) with the processor's chat template.

        Content items: `{"type": "text", "text": ...}`, `{"type": "video", "video" | "path": frames |
        clip | path}` (sampled with the item's own "num_frames" / "fps", else the call's, as `__call__`
        samples: a path is read with them, frames are resampled to num_frames, fps needs a path),
        `{"type": "image", "image" | "path" | "url" | "base64": PIL | array | path | data URL | base64
        text}`. `tokenize=False` returns the prompt string(s). `tokenize=True` returns input_ids
        (B, L) (B = 1 for one conversation), or with `return_dict=True` the full BatchFeature (as
        `__call__`); `return_assistant_tokens_mask=True` adds `assistant_masks` (B, L), 1 on the
        tokens of assistant turns (their end-of-turn token included). Explicit `videos=` / `images=`
        replace the ones found in the content items.
        `continue_final_message=True` leaves the last (assistant) message open for the model to
        continue; as in transformers, it cannot be combined with `add_generation_prompt` or
        `return_assistant_tokens_mask` (a StormError).

        Other keyword arguments are routed as transformers' `ProcessorMixin.apply_chat_template`
        routes them: those the template reads are template variables; the others, and
        `processor_kwargs`, go to `__call__` (padding_side, truncation, max_length,
        temporal_sample_stride, num_frames, fps, ...), where an unknown one is a TypeError.
        """
        if continue_final_message and (add_generation_prompt or return_assistant_tokens_mask):
            other = "add_generation_prompt" if add_generation_prompt else "return_assistant_tokens_mask"
            raise StormError(f"continue_final_message continues the last message, so it cannot be combined with "
                             f"{other} (a new assistant turn / the mask of finished assistant turns)")
        template = chat_template or self.chat_template or default_chat_template(self.tokenizer)
        if isinstance(conversation, (list, tuple)) and conversation and isinstance(conversation[0], (list, tuple)):
            conversations, batched = [list(c) for c in conversation], True
        else:
            conversations, batched = [list(conversation)], False
        variables = _template_variables(template)
        template_kwargs = {k: v for k, v in self.tokenizer.special_tokens_map.items() if isinstance(v, str)}
        template_kwargs.update((k, v) for k, v in kwargs.items() if k in variables)
        call_kwargs = {**(processor_kwargs or {}), **{k: v for k, v in kwargs.items() if k not in variables}}
        prompts, generation_indices = render_jinja_template(
            conversations=conversations,
            tools=tools,
            documents=documents,
            chat_template=template,
            return_assistant_tokens_mask=return_assistant_tokens_mask,
            continue_final_message=continue_final_message,
            add_generation_prompt=add_generation_prompt,
            **template_kwargs,
        )
        if not tokenize:
            return prompts if batched else prompts[0]
        return_tensors = call_kwargs.pop("return_tensors", return_tensors)
        videos, images = call_kwargs.pop("videos", videos), call_kwargs.pop("images", images)
        # the content items' videos are sampled here; explicit videos by `__call__`
        sampling = {k: call_kwargs.pop(k, None) for k in ("num_frames", "fps")}
        found_videos = found_images = None
        if videos is None or images is None:  # (explicit ones replace them: their files are not read)
            found_videos, found_images = self._collect_visuals(conversations, **sampling, read_videos=videos is None)
        out = self(
            text=prompts,
            videos=(found_videos or None) if videos is None else videos,
            images=(found_images or None) if images is None else images,
            return_tensors=None,
            return_offsets_mapping=return_assistant_tokens_mask,
            **(sampling if videos is not None else {}),
            **call_kwargs,
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
        return out if return_dict else out["input_ids"]

    def build_training_example(
        self,
        conversation: list[dict],
        videos=None,
        images=None,
        temporal_sample_stride: int | None = None,
        num_frames: int | None = None,
    ) -> BatchFeature:
        """One supervised example from a (multi-turn) conversation.

        Returns a BatchFeature (batch of 1, tensors) with input_ids (1, L), attention_mask (1, L),
        labels (1, L) = input_ids on assistant tokens (end-of-turn included) and -100 elsewhere,
        plus pixel_values_videos / video_frame_mask / pixel_values for the visual inputs.
        num_frames: frames per video, sampled as `__call__` samples them (None: a file gives
        DEFAULT_NUM_FRAMES, frames in memory are kept as they are).
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
