"""Asking a trained STORM model about a video: load it, build the messages, answer.

Every caller goes through here — `storm-vlm eval`, the lmms-eval plugin, `chat`, `serve`,
`web`, the demo and the profiler:

- `load_model(dir, device, precision)`: the one loader (model + processor, eval mode), which sets
  the model up for the precision (`prepare_for_inference`).
- `build_messages(question, history)`: the one message builder; the video comes first in the
  first user turn, as the model was trained.
- `Predictor`: renders the chat template once and tokenizes once per request, applies the
  precision's autocast, times the prefill, and decodes greedily unless told otherwise: keyword
  arguments go to `generate` (`decoding`: a temperature above 0 samples, 0 is greedy, as in vLLM;
  `stop_strings` end the answer).
- `ChatSession`: a multi-turn conversation about one video, which is encoded once: each turn
  reuses the KV cache of everything said before; what is said is read as text (`as_text`), and a
  turn that would not fit the LLM's context with its answer is refused (StormError).

A Predictor keeps the KV cache of its last request about a video (`reuse_prefix`): the next
request about the same frames (by content: another question about the video, the next turn of a
conversation) runs only what follows their shared start, the video's tokens among it
(`storm_vlm.model.kv_cache.reusable_start`), so a video is encoded and prefilled once for all its
questions. The answers are those of a request from scratch up to float rounding.

Shapes: frames are (T, H, W, 3) uint8 arrays (what `storm_vlm.load_video` returns).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from safetensors import SafetensorError
import torch
from torch import nn
from transformers import AutoModelForImageTextToText, AutoProcessor, LogitsProcessorList, TextStreamer
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import logging as hf_logging

from storm_vlm.errors import StormError
from storm_vlm.huge_pages import place_in_huge_pages
from storm_vlm.model.fast_paths import language_model_of
from storm_vlm.model.kv_cache import GrowingKVLayer, StormKVCache, reusable_start
from storm_vlm.model.processing import StormProcessor
from storm_vlm.precision import Precision, resolve_precision
from storm_vlm.utils import array_key, check_int, check_loaded_weights, check_model_dir, no_custom_code

__all__ = ["EMPTY_ANSWER", "GREEDY", "ChatSession", "Predictor", "PrintStreamer", "Reply", "as_text",
           "build_messages", "decoding", "encode_each_video_once", "load_model", "resolve_device"]

# The decoding every evaluation uses (and the default everywhere): greedy, one beam, and no
# repetition penalty, which a model's generation config may carry from its LLM (Qwen2-Instruct's
# 1.05) and `generate` would otherwise still apply to "greedy" answers.
GREEDY = {"do_sample": False, "num_beams": 1, "repetition_penalty": 1.0}
# What is shown instead of a blank line when the model ends its turn at once.
EMPTY_ANSWER = "(empty answer: the model ended its turn at once)"


def decoding(generation: dict) -> dict:
    """generate's decoding settings: `GREEDY` overridden by `generation`. A `temperature` given
    without `do_sample` decides as in vLLM and the OpenAI API: above 0 samples, 0 is greedy
    (transformers would otherwise ignore it and answer greedily, or refuse 0 when sampling)."""
    kwargs = {**GREEDY, **generation}
    if "temperature" in generation and "do_sample" not in generation:
        t = generation["temperature"]
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t < float("inf"):
            raise StormError(f"temperature must be a number >= 0 (0: greedy), got {t!r}")
        kwargs["do_sample"] = t > 0
        if t == 0:
            del kwargs["temperature"]
    return kwargs


def as_text(processor, text: str) -> str:
    """`text` as the model should read what a user typed: the processor's placeholders in it
    (<video>, <image>) as words (`StormProcessor.literal`), characters that cannot be encoded (lone
    surrogates, from input that was not UTF-8) as U+FFFD."""
    return processor.literal(text.encode("utf-8", "surrogatepass").decode("utf-8", "replace"))


@contextlib.contextmanager
def quiet_transformers():
    """Hide transformers' loading progress bars and notices (e.g. that SigLIP's processor falls back
    to its PIL version without torchvision, or an unused pooling head) while loading."""
    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`device` as a torch.device (default: CUDA if available); StormError for a bad or absent one.

    In a multi-process run (torchrun, accelerate launch: WORLD_SIZE > 1 and LOCAL_RANK set) an
    absent or bare "cuda" device is cuda:LOCAL_RANK, one GPU per process, and becomes the current
    CUDA device (so "cuda" anywhere else in the process means it too); otherwise every rank would
    load its model onto GPU 0."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise StormError(f"invalid device {str(device)!r} ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise StormError(f"device {str(device)!r} asked for, but CUDA is not available")
    local_rank = os.environ.get("LOCAL_RANK")
    if device.type == "cuda" and device.index is None and local_rank is not None \
            and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        device = torch.device("cuda", int(local_rank))
        torch.cuda.set_device(device)
    return device


def load_model(model_dir, device: str | torch.device | None = None, precision: str | Precision = "auto", verbose: bool = False):
    """(model, processor) from a STORM model folder, in eval mode on `device` (default: CUDA if any).

    `precision` is a name of `storm_vlm.precision.PRECISIONS` (or a resolved `Precision`); the
    model is set up for it by `prepare_for_inference`. With `verbose`, one line "loaded DIR in N s"
    goes to stderr instead of transformers' loading progress bars.

    The folder is read as data only: weights from safetensors (never a pickle), no code it names
    (trust_remote_code=False), no file it links to outside itself (`check_model_dir`). A folder that
    does not load completely (weights missing, or not fitting its config.json) is a StormError, never
    a model with random weights.
    """
    path = check_model_dir(model_dir)
    torch_device = resolve_device(device)
    if not isinstance(precision, Precision):
        precision = resolve_precision(precision, torch_device)
    t0 = time.perf_counter()
    try:
        with quiet_transformers(), no_custom_code(path, "model folder"):
            model, info = AutoModelForImageTextToText.from_pretrained(
                path, dtype=precision.weights, local_files_only=True, use_safetensors=True, trust_remote_code=False,
                output_loading_info=True)
            processor = AutoProcessor.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except StormError:
        raise
    # SafetensorError: a weight file cut short or damaged; RuntimeError: weights that do not fit the config
    # (or cannot be allocated); TypeError: a tokenizer.json transformers cannot build
    except (OSError, ValueError, TypeError, RuntimeError, SafetensorError) as exc:
        cause = "its weights do not fit its config.json" if "ignore_mismatched_sizes" in str(exc) else exc
        raise StormError(f"{path}: cannot load the model ({cause})") from None
    check_loaded_weights(path, "model folder", info)
    if not isinstance(processor, StormProcessor):
        raise StormError(f"{path}: processor_config.json makes a {type(processor).__name__}, not a StormProcessor "
                         "(its processor_class was changed)")
    model = prepare_for_inference(model, torch_device, precision)
    if verbose:
        print(f"loaded {path} in {time.perf_counter() - t0:.1f} s ({torch_device}, {precision.describe()})",
              file=sys.stderr)
    return model, processor


def prepare_for_inference(model, device: str | torch.device, precision: Precision):
    """`model` set up for inference with `precision` on `device`, as every command runs it: its weights
    in the precision's dtype, eval mode.

    Under the bfloat16 precision on CPU (bf16 autocast) the LLM's nn.Linear layers (its LM head
    included, wherever the model keeps it: transformers' LLaVA models outside their language model)
    are stored in bfloat16: autocast casts their float32 weights to exactly that at every call, so
    the products are the same, while their memory (most of the model's) halves and a decode step,
    which streams every one of them per token, reads half the bytes (the C decode step widens them
    as it reads). A layer tied to the embedding table stays float32 (the embeddings start the float32
    residual stream), as does every other weight (norms, the vision tower, the projector). The model then runs
    under the precision's autocast wherever it is called (`StormForConditionalGeneration.forward`).
    On CPU the weights go on transparent huge pages where the kernel offers them
    (`place_in_huge_pages`: decode steps stream them faster). A model already set up so is returned
    as it is.
    """
    device = torch.device(device)
    if getattr(model, "_storm_precision", None) == precision and model.device == device:
        return model.eval()
    model = model.to(device=device, dtype=precision.weights).eval()
    if precision.llm_linears is not None:
        lm = language_model_of(model) or model
        embeddings = lm.get_input_embeddings().weight
        for module in [*lm.modules(), model.get_output_embeddings()]:
            if isinstance(module, nn.Linear) and module.weight is not embeddings:
                module.to(precision.llm_linears)
    model._storm_precision = precision
    if device.type == "cpu":
        place_in_huge_pages(model)
    return model


def build_messages(question: str, history: Sequence[tuple[str, str]] = (), system: str | None = None,
                   video: bool = True) -> list[dict]:
    """The conversation for `question` after earlier (question, answer) turns `history`.

    The video goes first in the first user turn (as in training); text-only with video=False.
    """
    messages = [{"role": "system", "content": system}] if system else []
    for i, (asked, answered) in enumerate([*history, (question, None)]):
        content = [{"type": "text", "text": asked}]
        if i == 0 and video:
            content.insert(0, {"type": "video"})
        messages.append({"role": "user", "content": content})
        if answered is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answered}]})
    return messages


@dataclass
class Reply:
    """What one generate call produced. Times in seconds; prefill_s runs from encoding the
    request to the first logits (vision tower, projector, compression, LLM prefill)."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    visual_tokens: int
    prefill_s: float
    generate_s: float


class _FirstLogits:
    """A pass-through logits processor that notes when the first logits (after prefill) arrive."""

    def __init__(self, device: torch.device):
        self.device = device
        self.at: float | None = None

    def __call__(self, input_ids, scores):
        if self.at is None:
            _sync(self.device)
            self.at = time.perf_counter()
        return scores


def _sync(device) -> None:
    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize(device)


class Predictor:
    """Answers from a loaded model + processor pair.

    temporal_sample_stride: test-time sampling for every request (None: the model's default);
    precision: the `Precision` the model was loaded with (its autocast applies), default none;
    reuse_prefix: keep the KV cache of the last request about a video for the next one about the
    same frames (see the module docstring; it holds that one cache between requests).
    """

    def __init__(self, model, processor, *, temporal_sample_stride: int | None = None, max_new_tokens: int = 16,
                 precision: Precision | None = None, reuse_prefix: bool = True):
        self.model = model
        self.processor = processor
        self.temporal_sample_stride = temporal_sample_stride
        self.max_new_tokens = int(max_new_tokens)
        self.precision = precision
        self.reuse_prefix = bool(reuse_prefix)
        self.last_timing: dict = {}
        self._kept: tuple | None = None  # (frames key, the ids its cache holds, the cache) of the last request

    @classmethod
    def from_pretrained(cls, model_dir, device: str | None = None, precision: str = "auto", verbose: bool = False,
                        **kwargs) -> "Predictor":
        device = resolve_device(device)
        resolved = resolve_precision(precision, device)
        model, processor = load_model(model_dir, device, resolved, verbose=verbose)
        return cls(model, processor, precision=resolved, **kwargs)

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def _context(self):
        return self.precision.context() if self.precision is not None else contextlib.nullcontext()

    # ---- one request ----------------------------------------------------------------------------

    def render(self, messages: list[dict]) -> str:
        """The prompt text of `messages` with the assistant turn opened (rendered once per request)."""
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def text_tokens(self, prompt: str) -> int:
        """Tokens of a rendered prompt besides its visual placeholders."""
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        placeholders = {self.processor.video_token_id, self.processor.image_token_id}
        return sum(1 for i in ids if i not in placeholders)

    def visual_tokens(self, num_frames: int, temporal_sample_stride: int | None = None) -> int:
        stride = self.temporal_sample_stride if temporal_sample_stride is None else temporal_sample_stride
        return self.processor.num_visual_tokens(num_frames, stride)

    def encode(self, prompt: str, videos: Sequence[np.ndarray] = (), temporal_sample_stride: int | None = None):
        """Processor inputs for a rendered prompt and its videos, on the model's device and dtype."""
        stride = self.temporal_sample_stride if temporal_sample_stride is None else temporal_sample_stride
        inputs = self.processor(text=prompt, videos=list(videos) or None, temporal_sample_stride=stride,
                                return_tensors="pt")
        return self._on_device(inputs)

    def _budget(self, max_new_tokens: int | None) -> int:
        """The answer's token budget: `max_new_tokens`, or the predictor's when None."""
        if max_new_tokens is None:
            return self.max_new_tokens
        return check_int("max_new_tokens", max_new_tokens, error=StormError)

    def _on_device(self, inputs) -> dict:
        device, dtype = self.model.device, self.model.dtype
        return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}

    def generate(self, inputs: dict, max_new_tokens: int | None = None, streamer=None, started: float | None = None,
                 reuse: tuple | None = None, **generation) -> Reply:
        """Generate from `encode`d inputs (`decoding(generation)`: greedy unless told otherwise). Times count
        from `started` (a `time.perf_counter()` value; default now). `reuse`: the key of the
        request's frames (one row): continue from the last request's KV cache when it was about the
        same frames and shares the prompt's start (see the module docstring)."""
        t0 = time.perf_counter() if started is None else started
        first = _FirstLogits(self.model.device)
        processors = LogitsProcessorList([*generation.pop("logits_processor", []), first])
        kwargs = {**decoding(generation), "max_new_tokens": self._budget(max_new_tokens)}
        placeholders = {self.processor.video_token_id, self.processor.image_token_id} - {None}
        ids = inputs["input_ids"][0].tolist()
        cache = None
        one_row = len(inputs["input_ids"]) == 1 and kwargs.get("num_beams", 1) == kwargs.get("num_return_sequences", 1) == 1
        own_cache = kwargs.get("cache_implementation", self.model.generation_config.cache_implementation) is not None
        if reuse is not None and one_row and not own_cache:  # (a static cache cannot be handed over)
            kept, self._kept = self._kept, None  # the cache changes below: kept again once generate returns
            keep = reusable_start(ids, kept[1], placeholders) if kept is not None and kept[0] == reuse else 0
            if keep and not all(type(layer) is GrowingKVLayer for layer in kept[2].layers):
                keep = 0  # a sliding-window layer cannot be cut back to the shared start
            if keep:
                cache = kept[2]
                cache.crop(keep - cache.get_seq_length())  # a negative count: tokens to drop
                inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
            else:
                cache = StormKVCache(config=self.model.config.get_text_config(decoder=True))
        with torch.inference_mode(), self._context():
            out = self.model.generate(**inputs, logits_processor=processors, streamer=streamer,
                                      tokenizer=self.tokenizer,  # what stop_strings are read with
                                      **({} if cache is None else {"cache": cache}), **kwargs)
        _sync(self.model.device)
        end = time.perf_counter()
        sequence = getattr(out, "sequences", out)[0].tolist()
        if cache is not None:
            self._kept = (reuse, sequence[: cache.get_seq_length()], cache)
        new = sequence[len(ids):]
        reply = Reply(text=self.tokenizer.decode(new, skip_special_tokens=True).strip(), token_ids=new,
                      prompt_tokens=len(ids), visual_tokens=sum(t in placeholders for t in ids),
                      prefill_s=round((first.at or end) - t0, 4), generate_s=round(end - t0, 4))
        self.last_timing = {"prefill_s": reply.prefill_s, "generate_s": reply.generate_s}
        return reply

    # ---- one-turn conveniences (evaluation) -------------------------------------------------------

    def reply(self, prompt: str, frames: np.ndarray, max_new_tokens: int | None = None, **generation) -> str:
        """The model's reply to `prompt` about `frames` (T, H, W, 3) uint8; greedy unless told otherwise."""
        t0 = time.perf_counter()
        inputs = self.encode(self.render(build_messages(prompt)), [frames])
        key = (array_key(frames), self.temporal_sample_stride) if self.reuse_prefix else None
        return self.generate(inputs, max_new_tokens, started=t0, reuse=key, **generation).text

    def reply_batch(self, prompts: Sequence[str], videos: Sequence[np.ndarray], max_new_tokens: int | None = None,
                    **generation) -> list[str]:
        """`reply` for several (prompt, frames) pairs as one batch: prompts left-padded, videos of
        different lengths padded with a frame mask, so each row is answered as it would be alone.
        A frames array given for several rows (a video's questions) is encoded once."""
        if len(prompts) != len(videos):
            raise StormError(f"{len(prompts)} prompts but {len(videos)} videos")
        texts = [self.render(build_messages(p)) for p in prompts]
        inputs = self._on_device(self.processor(text=texts, videos=list(videos), padding_side="left",
                                                temporal_sample_stride=self.temporal_sample_stride,
                                                return_tensors="pt"))
        kwargs = {**decoding(generation), "max_new_tokens": self._budget(max_new_tokens)}
        pad = self.model.generation_config.pad_token_id
        with torch.inference_mode(), self._context():
            inputs = encode_each_video_once(self.model, inputs, [id(v) for v in videos])
            out = self.model.generate(**inputs, pad_token_id=self.tokenizer.pad_token_id if pad is None else pad,
                                      tokenizer=self.tokenizer, **kwargs)
        new = out[:, inputs["input_ids"].shape[1]:]
        return [text.strip() for text in self.tokenizer.batch_decode(new, skip_special_tokens=True)]

    def loglikelihood(self, prompt: str, continuation: str, frames: np.ndarray) -> tuple[float, bool]:
        """(log P(continuation | video, prompt), whether greedy decoding would produce it).

        The continuation follows the assistant-turn opening of the chat template, tokenized
        on its own (no special tokens)."""
        inputs = self.encode(self.render(build_messages(prompt)), [frames])
        cont = self.tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"]
        cont = cont.to(self.model.device)
        n = cont.shape[1]
        if n == 0:
            return 0.0, True
        batch = {**inputs, "input_ids": torch.cat([inputs["input_ids"], cont], dim=1),
                 "attention_mask": torch.cat([inputs["attention_mask"], torch.ones_like(cont)], dim=1)}
        with torch.inference_mode(), self._context():
            logits = self.model(**batch).logits
        logp = logits[0, -n - 1:-1].float().log_softmax(-1)
        target = cont[0]
        return float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


def encode_each_video_once(model, inputs: dict, keys: Sequence, cache=None) -> dict:
    """Processor `inputs` with their videos as visual tokens (generate's `mm_encoder_outputs`), each
    distinct video encoded once: `keys` names the videos, in order (the same key: the same video,
    e.g. the copies of a request with n choices, or one video's questions in a batch); `cache`
    (get(key) / put(key, tokens), e.g. `storm_vlm.serve.caches.VideoTokenCache`) gives videos an
    earlier batch encoded and keeps the new ones. Run it under the model's inference context."""
    if not keys:
        return inputs
    tokens, todo = {}, []
    for i, key in enumerate(keys):
        if key not in tokens:
            tokens[key] = None if cache is None else cache.get(key)
            if tokens[key] is None:
                todo.append(i)
    inputs = dict(inputs)
    pixels, mask, layout = (inputs.pop(k, None) for k in ("pixel_values_videos", "video_frame_mask",
                                                           "video_token_layout"))
    if todo:
        pick = torch.tensor(todo, device=pixels.device)
        encoded = model.get_video_features(pixels[pick], None if mask is None else mask[pick],
                                           video_token_layout=None if layout is None else layout[pick],
                                           return_dict=True)
        for i, video_tokens in zip(todo, encoded.pooler_output):
            tokens[keys[i]] = video_tokens
            if cache is not None:
                cache.put(keys[i], video_tokens)
    inputs["mm_encoder_outputs"] = {"video": BaseModelOutputWithPooling(pooler_output=[tokens[k] for k in keys])}
    return inputs


class PrintStreamer(TextStreamer):
    """Prints an answer to `file` as it is generated (a `generate` streamer), and `EMPTY_ANSWER`
    when it is empty, never a blank line."""

    def __init__(self, tokenizer, file=None):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.file = file if file is not None else sys.stdout
        self.printed = False

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.printed = self.printed or bool(text.strip())
        print(text.rstrip("\n") if stream_end else text, end="", file=self.file, flush=True)
        if stream_end:
            print("" if self.printed else EMPTY_ANSWER, file=self.file, flush=True)


class ChatSession:
    """A multi-turn conversation about one video (or none), for `storm-vlm chat`.

    The video goes through the vision tower and the projector once: each turn renders the whole
    conversation and the predictor continues from the previous turn's KV cache for the longest
    start whose tokens did not change (the system prompt and the video's visual tokens among
    them; `Predictor.generate`'s `reuse`). `reset()` forgets the questions and answers, and the
    next turn still starts after the video; `set_video` starts over with another video.
    """

    def __init__(self, predictor: Predictor, frames: np.ndarray | None = None,
                 temporal_sample_stride: int | None = None, system: str | None = None):
        self.predictor = predictor
        self.stride = temporal_sample_stride
        self.system = system
        self.history: list[tuple[str, str]] = []
        self.set_video(frames)

    def set_video(self, frames: np.ndarray | None) -> None:
        self.frames = frames
        self.history = []
        self._key = (None if frames is None else array_key(frames), self.stride)

    def reset(self) -> None:
        self.history = []

    def ask(self, question: str, max_new_tokens: int = 256, streamer=None, **generation) -> Reply:
        """Answer `question` after the turns so far (`decoding(generation)`: greedy unless told
        otherwise). The turns are read as text (`as_text`: a typed "<video>" is a word, not another
        video); StormError, the conversation unchanged, when they and an answer of `max_new_tokens`
        do not fit the LLM's positions (the model would answer past its context)."""
        p = self.predictor
        budget = p._budget(max_new_tokens)
        history = [(as_text(p.processor, asked), as_text(p.processor, answered)) for asked, answered in self.history]
        prompt = p.render(build_messages(as_text(p.processor, question), history, self.system,
                                         video=self.frames is not None))
        inputs = p.encode(prompt, [] if self.frames is None else [self.frames], self.stride)
        limit = getattr(p.model.config.get_text_config(), "max_position_embeddings", None)
        used = inputs["input_ids"].shape[1]
        if limit and used + budget > limit:
            visual = 0 if self.frames is None else p.visual_tokens(len(self.frames), self.stride)
            raise StormError(f"the conversation ({used} tokens, {visual} of them the video's) and an answer of up to "
                             f"{budget} tokens do not fit the LLM's {limit} positions: ask a shorter question or start "
                             "over (reset), ask for fewer new tokens, or use fewer frames or a larger temporal "
                             "sampling stride")
        reply = p.generate(inputs, budget, streamer, reuse=self._key, **generation)
        self.history.append((question, reply.text))
        return reply
