"""The OpenAI-compatible part of the HTTP API: `GET /v1/models`, `POST /v1/chat/completions` and
`POST /v1/completions`.

Chat request: OpenAI's chat-completions body. Message content is a string or a list of parts:
`{"type": "text", "text": ...}`, `{"type": "video_url", "video_url": {"url": ...}}`,
`{"type": "image_url", "image_url": {"url": ...}}`; a URL is a `data:` URL with base64 bytes (line
breaks allowed), or a `file:` URL of a path on the server (RFC 8089: file:///path or
file://localhost/path, percent-encoded) when the server allows local paths (any, or only inside
one folder: `LocalMedia`). Nothing is fetched from the network. An image is read as a one-frame
video (the model's image path computes exactly that). Text is read as text: a `<video>` or
`<image>` typed in it is not a placeholder (`StormEngine.literal`). Supported: multi-turn
messages (system; developer, read as system as OpenAI does; user; assistant, whose content may be
null), `max_tokens` (or `max_completion_tokens`; default min(256, the server's
--max-new-tokens), cut to the positions the prompt leaves), `temperature`, `top_p`, `seed`,
`stop`, `stream` (server-sent events of `chat.completion.chunk` objects ending with
`data: [DONE]`; `stream_options.include_usage` adds a usage chunk, and `"usage": null` on the
others), `n` (choices; at most the server's --max-batch-size, answered together in one batch; a
seeded request's choice i with seed + i, so the choices differ and repeat, one after another).
STORM's own knobs are extra body fields (the OpenAI client's `extra_body`): `num_frames`,
`temporal_sample_stride`, `fps`.

Text-completion request (`CompletionRequest`): `prompt` (one string, or a list of one), read raw
(no chat template) and as text; the same sampling fields, `max_tokens` defaulting to 16 as
OpenAI's and vLLM's do (cut likewise), and `echo`.

Both: fields are typed strictly, as OpenAI's API types them (`"max_tokens": "3"` and `"stream":
"yes"` are 400s, not 3 and true). OpenAI's other fields and vLLM's sampling fields (`top_k`,
`min_p`, `repetition_penalty`, `best_of`, ...) are accepted with the values that change nothing
here (`logprobs` false or null, penalties 0, `repetition_penalty` 1, `top_k` -1 or 0,
`response_format` text, no tools, `tool_choice` none or auto); another value is a 400 naming the
field, as is any other field. `store`, `metadata`, `service_tier`, `reasoning_effort`,
`parallel_tool_calls`, `user`, `safety_identifier` and `prompt_cache_key` are accepted and
ignored. `cache_salt` (vLLM's) keeps a request's cached work (`StormEngine`'s video and prefix
caches) apart from requests with another salt or none. `usage.prompt_tokens` counts the visual
tokens. Errors are OpenAI's error object `{"error": {"message", "type", "param", "code"}}` with a
4xx status (503 with Retry-After when the server is busy); `param` names the field
(`messages.0.content.1.video_url.url`); a request too long for the model's context has code
`context_length_exceeded` (`prepare_error`), found before its media are decoded when the frames
they give at least already do not fit (`parse_chat_request`).
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError

from storm_vlm.errors import StormError
from storm_vlm.media.container import check_file
from storm_vlm.media.images import ImageTooLarge, load_image
from storm_vlm.serve.bodies import as_text
from storm_vlm.serve.engine import (MAX_QUESTION_CHARS, MAX_STOP_CHARS, MAX_STOPS, ContextTooLong, EngineBusy,
                                    StormEngine)
from storm_vlm.utils import base64_bytes
from storm_vlm.video import DecodeTimeout

__all__ = ["ChatCompletionRequest", "CompletionRequest", "LocalMedia", "OpenAIError", "Reply", "parse_chat_request",
           "parse_completion_request", "prepare_error", "model_body", "models_body", "MAX_VIDEOS"]

MAX_VIDEOS = 4
MAX_MESSAGES = 64
MAX_PARTS = 64  # content parts of one message
MAX_TEXT_CHARS = 4 * MAX_QUESTION_CHARS  # one text
MAX_TOTAL_TEXT_CHARS = 4 * MAX_TEXT_CHARS  # all the texts of a request (rendering and tokenizing them is bounded)
MAX_IMAGE_PIXELS = 4096 * 4096


class OpenAIError(Exception):
    """An error answered as OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None, headers: dict | None = None):
        message = as_text(message)  # a path or file name decoded from bytes that were not UTF-8 holds surrogates
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


_JSON_TYPES = {"string": str, "array": list, "object": dict}
_PART_TAGS = {"text": "text part", "video_url": "video_url part", "image_url": "image_url part"}
_BRANCH_TAGS = {*_JSON_TYPES, *_PART_TAGS.values()}  # in pydantic's error locations, never field names


def _by_json_type(expected: str, **branches):
    """A union whose branch is picked by the input's JSON type (string, array or object): a bad
    input gets its own branch's errors only, not one per branch (pydantic's default for unions,
    whose first error is then "Input should be a valid string" whatever the cause)."""
    def kind(value):
        return next((tag for tag in branches if isinstance(value, _JSON_TYPES[tag])), None)

    return Annotated[Union[tuple(Annotated[t, Tag(tag)] for tag, t in branches.items())],
                     Discriminator(kind, custom_error_type="invalid_type",
                                   custom_error_message=f"Input should be {expected}")]


class _Url(BaseModel):
    model_config = ConfigDict(extra="ignore")  # e.g. "detail"
    url: str = Field(max_length=512 * 1024 * 1024)


_UrlField = _by_json_type("a URL string or an object with a url", string=str, object=_Url)


class _TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str = Field(max_length=MAX_TEXT_CHARS)


class _VideoPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["video_url"]
    video_url: _UrlField


class _ImagePart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["image_url"]
    image_url: _UrlField


def _part_kind(value) -> str | None:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return _PART_TAGS.get(kind) if isinstance(kind, str) else None


_PART_MODELS = {"text": _TextPart, "video_url": _VideoPart, "image_url": _ImagePart}
_Part = Annotated[Union[tuple(Annotated[model, Tag(_PART_TAGS[kind])] for kind, model in _PART_MODELS.items())],
                  Discriminator(_part_kind, custom_error_type="invalid_part", custom_error_message=(
                      "Input should be a content part of type 'text', 'video_url' or 'image_url'"))]
_Content = _by_json_type("a string or a list of content parts",
                         string=Annotated[str, Field(max_length=MAX_TEXT_CHARS)],
                         array=Annotated[list[_Part], Field(max_length=MAX_PARTS)])


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")  # e.g. "name", an assistant's "tool_calls"
    role: Literal["system", "developer", "user", "assistant"]
    content: _Content | None = None


class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False  # vLLM's: usage on every chunk (refused when true)


class _ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")  # e.g. "json_schema"
    type: Literal["text", "json_object", "json_schema"]


_Stop = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
_Stops = _by_json_type("a string or a list of strings", string=_Stop,
                       array=Annotated[list[_Stop], Field(max_length=MAX_STOPS)])
_ToolChoice = _by_json_type("'none', 'auto', 'required' or a named tool",
                            string=Literal["none", "auto", "required"], object=dict[str, Any])
_Prompt = _by_json_type("a string or a list of one string",
                        string=Annotated[str, Field(min_length=1, max_length=MAX_TOTAL_TEXT_CHARS)],
                        array=Annotated[list[Annotated[str, Field(min_length=1, max_length=MAX_TOTAL_TEXT_CHARS)]],
                                        Field(min_length=1, max_length=1)])


class _SamplingRequest(BaseModel):
    """The fields chat and text completions share: OpenAI's sampling fields and vLLM's extra ones."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: _Stops | None = None
    stream: bool | None = False
    stream_options: _StreamOptions | None = None
    n: int | None = Field(1, ge=1)
    # OpenAI's, accepted with the values that change nothing here (`_refuse_unsupported`)
    presence_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = None
    # vLLM's sampling fields, accepted with the values that change nothing here
    best_of: int | None = Field(None, ge=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    repetition_penalty: float | None = Field(None, gt=0, allow_inf_nan=False)
    min_tokens: int | None = Field(None, ge=0)
    ignore_eos: bool | None = None
    use_beam_search: bool | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    # vLLM's: only requests with the same salt share cached work (the engine's prefix and video caches)
    cache_salt: str | None = Field(None, min_length=1, max_length=256)
    # accepted and ignored: who asks, and OpenAI's hint for its own prompt cache
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None

    @property
    def budget_chosen(self) -> bool:
        """Whether the client chose the answer's token budget (max_tokens, max_completion_tokens);
        a default budget is cut to the positions the prompt leaves (`StormEngine.prepare`'s
        fit_answer), as vLLM's default is the rest of the context."""
        return self.max_tokens is not None or getattr(self, "max_completion_tokens", None) is not None


class ChatCompletionRequest(_SamplingRequest):
    """The accepted body of POST /v1/chat/completions."""

    messages: list[_Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1)
    # OpenAI's, accepted with the values that change nothing here (`_refuse_unsupported`)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: _ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: _ToolChoice | None = None
    # OpenAI's, accepted and ignored: nothing is stored, there are no tiers, the model does not reason
    parallel_tool_calls: bool | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    reasoning_effort: str | None = None
    # STORM's knobs
    num_frames: int | None = Field(None, ge=1)
    temporal_sample_stride: int | None = Field(None, ge=1, le=64)
    fps: float | None = Field(None, gt=0, le=240, allow_inf_nan=False)


class CompletionRequest(_SamplingRequest):
    """The accepted body of POST /v1/completions (OpenAI's legacy text completions): a raw prompt,
    no chat template, no media."""

    prompt: _Prompt
    echo: bool | None = False
    suffix: str | None = None
    logprobs: int | None = Field(None, ge=0, le=20)  # a count here, not a flag


def _pydantic_error(exc: ValidationError) -> OpenAIError:
    """The 400 of the first problem pydantic found; param is the field's path without pydantic's
    union branch tags (`messages.0.content.1.video_url.url`)."""
    first = exc.errors(include_url=False)[0]
    param = ".".join(str(p) for p in first.get("loc", ()) if p not in _BRANCH_TAGS)
    return OpenAIError(400, f"{param}: {first.get('msg')}" if param else str(first.get("msg")), param or None)


def _validate(model: type[BaseModel], body: Any):
    """`body` as `model`, strictly typed as OpenAI's API is: "3" is not an integer, true is not 1
    and "yes" is not true (pydantic's lax mode would read them so and answer something the client
    did not ask for); OpenAIError (400) naming the first bad field."""
    try:
        return model.model_validate(body, strict=True)
    except ValidationError as exc:
        raise _pydantic_error(exc) from None


def _refuse_unsupported(request: _SamplingRequest) -> None:
    """A 400 naming the first field whose value asks for what this server does not do (their
    default and null values pass, as vLLM accepts them)."""
    chat = isinstance(request, ChatCompletionRequest)

    def get(field):  # a field of one of the two requests only
        return getattr(request, field, None)

    for field, supported, why in (
        ("best_of", request.best_of in (None, 1), "one candidate per request is generated (best_of=1)"),
        ("use_beam_search", not request.use_beam_search, "beam search is not supported"),
        ("logprobs", not request.logprobs if chat else request.logprobs is None, "log probabilities are not returned"),
        ("top_logprobs", not get("top_logprobs"), "log probabilities are not returned"),
        ("presence_penalty", not request.presence_penalty, "penalties are not supported (0 only)"),
        ("frequency_penalty", not request.frequency_penalty, "penalties are not supported (0 only)"),
        ("repetition_penalty", request.repetition_penalty in (None, 1), "penalties are not supported (1 only)"),
        ("logit_bias", not request.logit_bias, "logit_bias is not supported"),
        ("top_k", request.top_k in (None, -1, 0), "top_k is not supported (-1 or 0: all tokens)"),
        ("min_p", not request.min_p, "min_p is not supported (0 only)"),
        ("min_tokens", not request.min_tokens, "min_tokens is not supported (0 only)"),
        ("ignore_eos", not request.ignore_eos, "ignore_eos is not supported"),
        ("include_stop_str_in_output", not request.include_stop_str_in_output, "stop strings are left out"),
        ("skip_special_tokens", request.skip_special_tokens in (None, True), "special tokens are always skipped"),
        ("response_format", get("response_format") is None or get("response_format").type == "text",
         'only {"type": "text"} is supported'),
        ("tools", not get("tools"), "tool calls are not supported"),
        ("tool_choice", get("tool_choice") in (None, "none", "auto"), "tool calls are not supported"),
        ("suffix", get("suffix") is None, "suffix (insertion) is not supported"),
        ("stream_options", request.stream_options is None or request.stream, "stream_options needs stream=true"),
        ("stream_options.continuous_usage_stats",
         request.stream_options is None or not request.stream_options.continuous_usage_stats,
         "usage comes in one last chunk (include_usage), not on every chunk"),
    ):
        if not supported:
            raise OpenAIError(400, f"{field}: {why}", field)


def _sampling(request: _SamplingRequest, engine: StormEngine, default_max_tokens: int):
    """The request's SamplingParams: max_completion_tokens (chat) or max_tokens, else
    `default_max_tokens` (at most the server's --max-new-tokens); temperature and top_p default to
    the model's generation config, as vLLM's do. OpenAIError (400) for a value out of range."""
    most = min(engine.max_batch_size, engine.max_queue)  # the choices run as one batch, queued all at once
    if request.n is not None and request.n > most:
        raise OpenAIError(400, f"n: at most {most} choices per request (the server's --max-batch-size and "
                               f"--max-queue), got {request.n}", "n")
    limit = engine.max_new_tokens_limit
    for field in ("max_completion_tokens", "max_tokens"):  # the one the client sent, by its name
        value = getattr(request, field, None)
        if value is not None and value > limit:
            raise OpenAIError(400, f"{field} must be at most {limit} (the server's --max-new-tokens), got {value}",
                              field)
    max_tokens = getattr(request, "max_completion_tokens", None) or request.max_tokens or min(default_max_tokens, limit)
    temperature, top_p = engine.default_sampling()
    try:
        return engine.check_sampling(max_tokens, temperature=temperature if request.temperature is None
                                     else request.temperature, top_p=top_p if request.top_p is None else request.top_p,
                                     seed=request.seed, stop=request.stop)
    except StormError as exc:
        raise OpenAIError(400, str(exc)) from None


def parse_completion_request(body: Any, engine: StormEngine):
    """Validate a text-completions body and render its prompt (blocking: run it in a thread):
    (request, prepared). The prompt is read as text (a `<video>` in it is not a placeholder);
    max_tokens defaults to 16, OpenAI's and vLLM's default here."""
    request = _validate(CompletionRequest, body)
    _refuse_unsupported(request)
    sampling = _sampling(request, engine, 16)
    prompt = request.prompt if isinstance(request.prompt, str) else request.prompt[0]
    try:
        prepared = engine.prepare_text(prompt, sampling, fit_answer=not request.budget_chosen)
    except StormError as exc:
        raise prepare_error(exc, "prompt") from None
    prepared.cache_salt = request.cache_salt
    return request, prepared


def prepare_error(exc: StormError, param: str) -> OpenAIError:
    """The 400 of a request the engine could not prepare; one that does not fit the model's context
    has OpenAI's (and vLLM's) code context_length_exceeded and message ("This model's maximum
    context length is N tokens"), which clients match to shorten a conversation and ask again."""
    code = "context_length_exceeded" if isinstance(exc, ContextTooLong) else None
    return OpenAIError(400, str(exc), param, code=code)


_OBJECT_REPR = re.compile(r"\s*<[\w.]+ object at 0x[0-9a-fA-F]+>")


def _at(exc: OpenAIError, where: str) -> OpenAIError:
    """`exc` naming the content part `where` as its param, without Python object reprs in its
    message (PIL names the BytesIO it could not read)."""
    exc.param = exc.param or where
    exc.message = _OBJECT_REPR.sub("", exc.message)
    return exc


def _file_path(url: str, what: str) -> Path:
    """The path of a file: URL (RFC 8089): file:///path, file://localhost/path or file:/path,
    percent-encoded (%20 is a space; bytes that are not UTF-8 are kept as the file system's)."""
    rest = url[len("file:"):]
    if rest.startswith("//"):
        host, slash, rest = rest[2:].partition("/")
        if host.lower() not in ("", "localhost"):
            raise OpenAIError(400, f"{what}: a file URL names a path on this server (file:///path or "
                                   f"file://localhost/path), not on host {host[:64]!r}", what)
        rest = slash + rest
    if not rest.startswith("/"):
        raise OpenAIError(400, f"{what}: a file URL names an absolute path (file:///path)", what)
    if "?" in rest or "#" in rest:
        raise OpenAIError(400, f"{what}: percent-encode '?' and '#' in a file URL's path (%3F, %23)", what)
    path = urllib.parse.unquote(rest, errors="surrogateescape")
    if "\x00" in path:
        raise OpenAIError(400, f"{what}: the file URL's path holds a NUL character", what)
    return Path(path)


class LocalMedia:
    """Which files on the server a request may name (file: URLs; /v1/answer's video_path): none (the
    default), any file this process can read (`allow_any`: --allow-local-paths), or only the files
    inside the folder `root` (vLLM's --allowed-local-media-path), symbolic links and `..` resolved
    before the check so neither leads out of it."""

    def __init__(self, allow_any: bool = False, root: str | Path | None = None):
        self.allow_any = bool(allow_any)
        self.root = None if root is None else Path(os.path.realpath(root))
        if self.root is not None and not self.root.is_dir():
            raise StormError(f"the allowed local media path {str(root)!r} is not a folder")

    @property
    def enabled(self) -> bool:
        return self.allow_any or self.root is not None

    def check(self, path: str | Path, what: str) -> Path:
        """The path to open (resolved when confined to `root`); OpenAIError 403 when not allowed."""
        if not self.enabled:
            raise OpenAIError(403, f"{what}: file:// URLs are disabled on this server (start it with "
                                   "--allowed-local-media-path DIR or --allow-local-paths); send the bytes as a "
                                   "data: URL", what,
                              code="local_paths_disabled")
        if self.root is None:
            return Path(path)
        resolved = Path(os.path.realpath(path))
        if not resolved.is_relative_to(self.root):
            raise OpenAIError(403, f"{what}: only files inside the server's allowed media folder may be read",
                              what, code="local_path_not_allowed")
        return resolved


def _media_bytes(url: str, local: LocalMedia, what: str, max_bytes: int) -> bytes | Path:
    scheme = url.partition(":")[0].lower()  # URL schemes are case-insensitive (RFC 3986)
    if scheme == "data":
        header, sep, payload = url.partition(",")
        if not sep or not header.lower().endswith(";base64"):
            raise OpenAIError(400, f"{what}: a data URL must be base64-encoded (data:<type>;base64,<bytes>)", what)
        if len(payload) // 4 * 3 > max_bytes:
            raise OpenAIError(413, f"{what}: larger than the server's limit of {max_bytes} bytes per video or image",
                              what, code="request_too_large")
        try:
            return base64_bytes(payload)
        except ValueError:
            raise OpenAIError(400, f"{what}: the data URL is not valid base64", what) from None
    if scheme == "file":
        return local.check(_file_path(url, what), what)
    if ":" not in url:
        raise OpenAIError(400, f"{what}: not a URL; send the bytes as a data: URL", what)
    raise OpenAIError(400, f"{what}: {url.split(':', 1)[0][:16]!r} URLs are not fetched by this server; send the "
                           "bytes as a data: URL", what)


def _image_frames(source: bytes | Path, what: str, min_side: int | None = None) -> np.ndarray:
    """(1, H, W, 3) uint8 from image bytes or a path (upright, scaled down to `min_side`, see
    `load_image`); OpenAIError for what PIL cannot read, and for a path that is not a non-empty
    regular file (opening a FIFO would block the worker, and the request's body slot, for ever)."""
    if isinstance(source, Path):
        try:
            check_file(str(source))
        except StormError as exc:
            raise OpenAIError(400, f"{what}: {str(exc).replace(str(source), 'the image')}") from None
    try:
        return load_image(source, max_pixels=MAX_IMAGE_PIXELS, min_side=min_side)[None]
    except ImageTooLarge as exc:
        raise OpenAIError(400, f"{what}: {exc}") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise OpenAIError(400, f"{what}: not a readable image ({exc})") from None


def parse_chat_request(body: Any, engine: StormEngine, workdir: Path, local: LocalMedia, max_bytes: int,
                       cancel=None):
    """Validate a chat-completions body, read its media and prepare it (blocking: run it in a thread).

    Returns (request, prepared: `StormEngine.prepare`'s, videos as frame arrays). Every bound is
    checked before any media is decoded, the context and the queue too: from the frames each video
    or image gives at least (`_least_frames`), a request that cannot fit the model's context is
    refused (400, context_length_exceeded) and one the queue cannot take now is 503, before
    decoding; once decoded, the frames are checked again, exactly. `workdir` receives uploaded
    video bytes (under fixed names); `local` says which files on the server file: URLs may name; a
    video or image of more than `max_bytes` is refused (413); `cancel` (a threading.Event) stops
    decoding.
    """
    request = _validate(ChatCompletionRequest, body)
    _refuse_unsupported(request)
    sampling = _sampling(request, engine, 256)
    num_frames = engine.default_frames if request.num_frames is None else request.num_frames
    if num_frames > engine.max_frames:
        raise OpenAIError(400, f"num_frames must be at most {engine.max_frames}, got {num_frames}", "num_frames")
    total = 0
    for m, message in enumerate(request.messages):
        if message.content is None and message.role != "assistant":
            raise OpenAIError(400, f"messages.{m}.content: a {message.role} message needs content",
                              f"messages.{m}.content")
        parts = message.content if isinstance(message.content, list) else [message.content or ""]
        total += sum(len(p) if isinstance(p, str) else len(p.text) for p in parts
                     if isinstance(p, (str, _TextPart)))
    if total > MAX_TOTAL_TEXT_CHARS:
        raise OpenAIError(400, f"messages: the texts of a request may hold {MAX_TOTAL_TEXT_CHARS} characters "
                               f"together, these hold {total}", "messages")
    messages, media = [], []  # media: (where, part) of each video or image, in order
    for m, message in enumerate(request.messages):
        if not isinstance(message.content, list):
            content = [{"type": "text", "text": message.content or ""}]
        else:
            content = []
            for p, part in enumerate(message.content):
                where = f"messages.{m}.content.{p}"
                if isinstance(part, _TextPart):
                    content.append({"type": "text", "text": part.text})
                    continue
                if message.role != "user":
                    raise OpenAIError(400, f"{where}: only user messages may hold videos or images", where)
                if len(media) == MAX_VIDEOS:
                    raise OpenAIError(400, f"{where}: at most {MAX_VIDEOS} videos or images per request", where)
                media.append((where, part))
                content.append({"type": "video"})
        role = "system" if message.role == "developer" else message.role  # as OpenAI reads it
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "user":
        raise OpenAIError(400, "the last message must be the user's", "messages")
    sources = []
    for i, (where, part) in enumerate(media):
        try:
            sources.append(_part_source(part, workdir / f"video{i}", local, where, max_bytes))
        except OpenAIError as exc:
            raise _at(exc, where) from None
    least = [_least_frames(part, source, num_frames, request.fps) for (_, part), source in zip(media, sources)]
    prepared = _prepare(engine, request, messages, least, sampling)
    if media:
        try:
            engine.check_room(sum(least), request.n or 1)
        except EngineBusy as exc:
            raise busy_error(exc) from None
    videos = []
    for (where, part), source in zip(media, sources):
        try:
            videos.append(_part_frames(part, source, engine, where, num_frames, request.fps, cancel))
        except OpenAIError as exc:
            raise _at(exc, where) from None
    if [len(v) for v in videos] != least:
        prepared = _prepare(engine, request, messages, [len(v) for v in videos], sampling)
    return request, prepared, videos


def _prepare(engine: StormEngine, request: ChatCompletionRequest, messages: list, frame_counts: list, sampling):
    """`engine.prepare` of the request's messages with videos of `frame_counts` frames; its errors as 400s."""
    try:
        prepared = engine.prepare(messages, frame_counts, sampling, request.temporal_sample_stride,
                                  fit_answer=not request.budget_chosen)
    except StormError as exc:
        raise prepare_error(exc, "messages") from None
    prepared.cache_salt = request.cache_salt
    return prepared


# The first bytes of the containers read as videos, never as one still image: ISO BMFF (MP4, MOV,
# 3GP; a top-level box type at byte 4), Matroska / WebM (EBML) and AVI (RIFF).
_ISO_BOXES = (b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide")


def _least_frames(part: _VideoPart | _ImagePart, source: bytes | Path, num_frames: int, fps: float | None) -> int:
    """The frames a video or image part gives at least, known before it is decoded: an image one; a
    video `num_frames` (uniform sampling repeats frames of a shorter one) when its first bytes name
    a video container and no fps is asked for (fps sampling gives fewer from a short clip), else one
    (a video_url may hold a still image)."""
    if isinstance(part, _ImagePart) or fps is not None or not os.path.isfile(source):
        return 1  # not a regular file (a pipe would block a read): decoding names the cause
    try:
        with open(source, "rb") as f:
            head = f.read(12)
    except OSError:
        return 1  # decoding names the cause
    video = (head[4:8] in _ISO_BOXES or head[:4] == b"\x1a\x45\xdf\xa3"
             or (head[:4] == b"RIFF" and head[8:12] == b"AVI "))
    return num_frames if video else 1


def _part_source(part: _VideoPart | _ImagePart, upload: Path, local: LocalMedia, where: str,
                 max_bytes: int) -> bytes | Path:
    """Where a video or image part's bytes are, read but not decoded: an image's data URL bytes, or
    a path (a video's data URL bytes are written to `upload`)."""
    url = part.video_url if isinstance(part, _VideoPart) else part.image_url
    source = _media_bytes(url if isinstance(url, str) else url.url, local, where, max_bytes)
    if isinstance(part, _VideoPart) and isinstance(source, bytes):
        upload.write_bytes(source)
        return upload
    return source


def _part_frames(part: _VideoPart | _ImagePart, source: bytes | Path, engine: StormEngine, where: str,
                 num_frames: int, fps: float | None, cancel) -> np.ndarray:
    """The frames of one video or image part ((T, H, W, 3) uint8) from its `_part_source`."""
    if isinstance(part, _ImagePart):
        return _image_frames(source, where, engine.processor.image_size)
    try:
        return engine.read_video(str(source), num_frames, fps=fps, cancel=cancel).frames
    except DecodeTimeout as exc:
        raise OpenAIError(503, f"{where}: {str(exc).replace(str(source), 'the video')}", where,
                          kind="server_busy", headers={"Retry-After": "10"}) from None
    except StormError as exc:
        raise OpenAIError(400, f"{where}: {str(exc).replace(str(source), 'the video')}", where) from None


def _usage(completions: list) -> dict:
    """OpenAI's usage of a request's choices: the prompt counted once, the completions' tokens summed."""
    first = completions[0]
    completion_tokens = sum(c.completion_tokens for c in completions)
    return {"prompt_tokens": first.prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": first.prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": first.cached_tokens, "visual_tokens": first.visual_tokens,
                                      "temporal_sample_stride": first.temporal_sample_stride,
                                      "stride_planned": first.stride_planned}}


class Reply:
    """The response of one completion, whole or streamed: `chat` (chat.completion, choices with a
    message / a delta) or text (text_completion, choices with a text). Every chunk of a stream
    shares the id and `created` of the request, as OpenAI's and vLLM's do; with `include_usage`
    (the request's stream_options) the last chunk (no choices) carries the usage and every other
    chunk `"usage": null`. `n`: the choices (indexed 0..n-1; a stream interleaves their chunks)."""

    def __init__(self, model: str, chat: bool = True, include_usage: bool = False, n: int = 1):
        self.model, self.chat, self.include_usage, self.n = model, chat, include_usage, n
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _head(self, kind: str | None = None) -> dict:
        kind = kind or ("chat.completion.chunk" if self.chat else "text_completion")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def body(self, completions: list, echo: str = "") -> dict:
        """The whole response, a choice per completion; `echo`: the prompt, put before each text
        (text completions' echo)."""
        choices = []
        for index, completion in enumerate(completions):
            if self.chat:
                choice = {"message": {"role": "assistant", "content": completion.text}}
            else:
                choice = {"text": echo + completion.text}
            choices.append({"index": index, **choice, "finish_reason": _finish(completion), "logprobs": None})
        kind = "chat.completion" if self.chat else "text_completion"
        return {**self._head(kind), "choices": choices, "usage": _usage(completions)}

    def chunk(self, text: str, completion=None, first: bool = False, index: int = 0) -> str:
        """One server-sent event of choice `index`: `text` (a chat's `first` chunk names the role
        too), or with `completion` that choice's last chunk, which gives its finish_reason."""
        if not self.chat:
            choice = {"text": text}
        elif completion is not None:
            choice = {"delta": {}}
        else:
            choice = {"delta": {"role": "assistant", "content": text} if first else {"content": text}}
        finish = None if completion is None else _finish(completion)
        body = {**self._head(), "choices": [{"index": index, **choice, "finish_reason": finish, "logprobs": None}]}
        if self.include_usage:
            body["usage"] = None
        return f"data: {json.dumps(body)}\n\n"

    def usage_chunk(self, completions: list) -> str:
        return f"data: {json.dumps({**self._head(), 'choices': [], 'usage': _usage(completions)})}\n\n"


def _finish(completion) -> str:
    """OpenAI's finish_reason: "length" (the token budget ran out) or "stop" (end of turn, a stop
    string; a cancelled request's client is gone)."""
    return "length" if completion.finish_reason == "length" else "stop"


def model_body(model: str, created: int) -> dict:
    """OpenAI's model object (GET /v1/models/{model})."""
    return {"id": model, "object": "model", "created": created, "owned_by": "storm-vlm"}


def models_body(model: str, created: int) -> dict:
    return {"object": "list", "data": [model_body(model, created)]}


def busy_error(exc: EngineBusy) -> OpenAIError:
    return OpenAIError(503, str(exc), kind="server_busy", code="queue_full",
                       headers={"Retry-After": str(exc.retry_after)})
