"""The OpenAI-compatible part of the HTTP API: `GET /v1/models` and `POST /v1/chat/completions`.

Request: OpenAI's chat-completions body. Message content is a string or a list of parts:
`{"type": "text", "text": ...}`, `{"type": "video_url", "video_url": {"url": ...}}`,
`{"type": "image_url", "image_url": {"url": ...}}`; a URL is a `data:` URL with base64 bytes, or a
`file:` URL of a path on the server (RFC 8089: file:///path or file://localhost/path,
percent-encoded) when the server allows local paths. Nothing is fetched from the network. An
image is read as a one-frame video (the model's image path computes exactly that). Text is read
as text: a `<video>` or `<image>` typed in it is not a placeholder (`StormEngine.literal`).
Supported: multi-turn messages (system; developer, read as system as OpenAI does; user;
assistant, whose content may be null), `max_tokens` (or `max_completion_tokens`;
default min(256, the server's --max-new-tokens)), `temperature`, `top_p`, `seed`, `stop`,
`stream` (server-sent events of `chat.completion.chunk` objects ending with `data: [DONE]`;
`stream_options.include_usage` adds a usage chunk, and `"usage": null` on the others), `n` = 1.
OpenAI's other fields are accepted with the values that change nothing here, as vLLM accepts them
(`logprobs` false, penalties 0, `response_format` text, no tools, `tool_choice` none or auto);
another value is a 400 naming the field. `store`, `metadata`, `service_tier`, `reasoning_effort`,
`parallel_tool_calls` and `user` are accepted and ignored. STORM's own knobs are extra body fields
(the OpenAI client's `extra_body`): `num_frames`, `temporal_sample_stride`, `fps`.
`usage.prompt_tokens` counts the visual tokens. Errors are OpenAI's error object
`{"error": {"message", "type", "param", "code"}}` with a 4xx status (503 with Retry-After when the
server is busy); `param` names the field (`messages.0.content.1.video_url.url`).
"""

from __future__ import annotations

import base64
import binascii
import json
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
from storm_vlm.media.images import ImageTooLarge, load_image
from storm_vlm.serve.engine import MAX_QUESTION_CHARS, MAX_STOP_CHARS, MAX_STOPS, EngineBusy, StormEngine
from storm_vlm.video import DecodeTimeout

__all__ = ["ChatCompletionRequest", "OpenAIError", "parse_chat_request", "completion_body", "chunk_body",
           "model_body", "models_body", "MAX_VIDEOS"]

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


class _ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")  # e.g. "json_schema"
    type: Literal["text", "json_object", "json_schema"]


_Stop = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
_Stops = _by_json_type("a string or a list of strings", string=_Stop,
                       array=Annotated[list[_Stop], Field(max_length=MAX_STOPS)])
_ToolChoice = _by_json_type("'none', 'auto', 'required' or a named tool",
                            string=Literal["none", "auto", "required"], object=dict[str, Any])


class ChatCompletionRequest(BaseModel):
    """The accepted body of POST /v1/chat/completions."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    messages: list[_Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: _Stops | None = None
    stream: bool | None = False
    stream_options: _StreamOptions | None = None
    n: int | None = Field(1, ge=1)
    # OpenAI's, accepted with the values that change nothing here (`_refuse_unsupported`)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    presence_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = None
    response_format: _ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: _ToolChoice | None = None
    # OpenAI's, accepted and ignored: nothing is stored, there are no tiers, the model does not reason
    parallel_tool_calls: bool | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    reasoning_effort: str | None = None
    user: str | None = None
    # STORM's knobs
    num_frames: int | None = Field(None, ge=1)
    temporal_sample_stride: int | None = Field(None, ge=1, le=64)
    fps: float | None = Field(None, gt=0, le=240, allow_inf_nan=False)


def _pydantic_error(exc: ValidationError) -> OpenAIError:
    """The 400 of the first problem pydantic found; param is the field's path without pydantic's
    union branch tags (`messages.0.content.1.video_url.url`)."""
    first = exc.errors(include_url=False)[0]
    param = ".".join(str(p) for p in first.get("loc", ()) if p not in _BRANCH_TAGS)
    return OpenAIError(400, f"{param}: {first.get('msg')}" if param else str(first.get("msg")), param or None)


def _refuse_unsupported(request: ChatCompletionRequest) -> None:
    """A 400 naming the first of OpenAI's fields whose value asks for what this server does not do
    (their default and null values pass, as vLLM accepts them)."""
    for field, supported, why in (
        ("n", request.n in (None, 1), "one choice per request is generated (n=1)"),
        ("logprobs", not request.logprobs, "log probabilities are not returned"),
        ("top_logprobs", not request.top_logprobs, "log probabilities are not returned"),
        ("presence_penalty", not request.presence_penalty, "penalties are not supported (0 only)"),
        ("frequency_penalty", not request.frequency_penalty, "penalties are not supported (0 only)"),
        ("logit_bias", not request.logit_bias, "logit_bias is not supported"),
        ("response_format", request.response_format is None or request.response_format.type == "text",
         'only {"type": "text"} is supported'),
        ("tools", not request.tools, "tool calls are not supported"),
        ("tool_choice", request.tool_choice in (None, "none", "auto"), "tool calls are not supported"),
        ("stream_options", request.stream_options is None or request.stream, "stream_options needs stream=true"),
    ):
        if not supported:
            raise OpenAIError(400, f"{field}: {why}", field)


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


def _media_bytes(url: str, allow_local_paths: bool, what: str, max_bytes: int) -> bytes | Path:
    scheme = url.partition(":")[0].lower()  # URL schemes are case-insensitive (RFC 3986)
    if scheme == "data":
        header, sep, payload = url.partition(",")
        if not sep or not header.lower().endswith(";base64"):
            raise OpenAIError(400, f"{what}: a data URL must be base64-encoded (data:<type>;base64,<bytes>)", what)
        if len(payload) // 4 * 3 > max_bytes:
            raise OpenAIError(413, f"{what}: larger than the server's limit of {max_bytes} bytes per video or image",
                              what, code="request_too_large")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise OpenAIError(400, f"{what}: the data URL is not valid base64", what) from None
    if scheme == "file":
        if not allow_local_paths:
            raise OpenAIError(403, f"{what}: file:// URLs are disabled on this server (start it with "
                                   "--allow-local-paths); send the bytes as a data: URL", what,
                              code="local_paths_disabled")
        return _file_path(url, what)
    if ":" not in url:
        raise OpenAIError(400, f"{what}: not a URL; send the bytes as a data: URL", what)
    raise OpenAIError(400, f"{what}: {url.split(':', 1)[0][:16]!r} URLs are not fetched by this server; send the "
                           "bytes as a data: URL", what)


def _image_frames(source: bytes | Path, what: str, min_side: int | None = None) -> np.ndarray:
    """(1, H, W, 3) uint8 from image bytes or a path (upright, scaled down to `min_side`, see
    `load_image`); OpenAIError for what PIL cannot read."""
    try:
        return load_image(source, max_pixels=MAX_IMAGE_PIXELS, min_side=min_side)[None]
    except ImageTooLarge as exc:
        raise OpenAIError(400, f"{what}: {exc}") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise OpenAIError(400, f"{what}: not a readable image ({exc})") from None


def parse_chat_request(body: Any, engine: StormEngine, workdir: Path, allow_local_paths: bool, max_bytes: int,
                       cancel=None):
    """Validate a chat-completions body and read its media (blocking: run it in a thread).

    Returns (request, messages in the processor's content format, videos as frame arrays,
    sampling params). Every bound is checked before any media is decoded. `workdir` receives
    uploaded video bytes (under fixed names); a video or image of more than `max_bytes` is
    refused (413); `cancel` (a threading.Event) stops decoding.
    """
    try:
        request = ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        raise _pydantic_error(exc) from None
    _refuse_unsupported(request)
    for field in ("max_completion_tokens", "max_tokens"):  # the one the client sent, by its name
        value = getattr(request, field)
        if value is not None and value > engine.max_new_tokens_limit:
            raise OpenAIError(400, f"{field} must be at most {engine.max_new_tokens_limit} (the server's "
                                   f"--max-new-tokens), got {value}", field)
    max_tokens = request.max_completion_tokens or request.max_tokens or min(256, engine.max_new_tokens_limit)
    num_frames = engine.default_frames if request.num_frames is None else request.num_frames
    if num_frames > engine.max_frames:
        raise OpenAIError(400, f"num_frames must be at most {engine.max_frames}, got {num_frames}", "num_frames")
    temperature, top_p = engine.default_sampling()
    try:
        sampling = engine.check_sampling(max_tokens,
                                         temperature=temperature if request.temperature is None else request.temperature,
                                         top_p=top_p if request.top_p is None else request.top_p,
                                         seed=request.seed, stop=request.stop)
    except StormError as exc:
        raise OpenAIError(400, str(exc)) from None
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
    messages, videos = [], []
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
                if len(videos) == MAX_VIDEOS:
                    raise OpenAIError(400, f"{where}: at most {MAX_VIDEOS} videos or images per request", where)
                try:
                    videos.append(_part_frames(part, engine, workdir / f"video{len(videos)}", allow_local_paths,
                                               where, max_bytes, num_frames, request.fps, cancel))
                except OpenAIError as exc:
                    raise _at(exc, where) from None
                content.append({"type": "video"})
        role = "system" if message.role == "developer" else message.role  # as OpenAI reads it
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "user":
        raise OpenAIError(400, "the last message must be the user's", "messages")
    return request, messages, videos, sampling


def _part_frames(part: _VideoPart | _ImagePart, engine: StormEngine, upload: Path, allow_local_paths: bool,
                 where: str, max_bytes: int, num_frames: int, fps: float | None, cancel) -> np.ndarray:
    """The frames of one video or image part ((T, H, W, 3) uint8); video bytes are written to `upload`."""
    url = part.video_url if isinstance(part, _VideoPart) else part.image_url
    source = _media_bytes(url if isinstance(url, str) else url.url, allow_local_paths, where, max_bytes)
    if isinstance(part, _ImagePart):
        return _image_frames(source, where, engine.processor.image_size)
    path = source
    if isinstance(source, bytes):
        upload.write_bytes(source)
        path = upload
    try:
        return engine.read_video(str(path), num_frames, fps=fps, cancel=cancel).frames
    except DecodeTimeout as exc:
        raise OpenAIError(503, f"{where}: {str(exc).replace(str(path), 'the video')}", where,
                          kind="server_busy", headers={"Retry-After": "10"}) from None
    except StormError as exc:
        raise OpenAIError(400, f"{where}: {str(exc).replace(str(path), 'the video')}", where) from None


def _usage(completion) -> dict:
    return {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
            "total_tokens": completion.prompt_tokens + completion.completion_tokens,
            "prompt_tokens_details": {"visual_tokens": completion.visual_tokens,
                                      "temporal_sample_stride": completion.temporal_sample_stride,
                                      "stride_planned": completion.stride_planned}}


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def completion_body(completion_id: str, model: str, completion) -> dict:
    return {"id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": completion.text},
                         "finish_reason": "length" if completion.finish_reason == "length" else "stop",
                         "logprobs": None}],
            "usage": _usage(completion)}


def chunk_body(completion_id: str, model: str, delta: dict, finish_reason: str | None = None,
               completion=None, usage_only: bool = False, include_usage: bool = False) -> str:
    """One server-sent event of a streamed completion. With `include_usage` (the request's
    stream_options), the usage chunk (`usage_only`, no choices) carries the usage and every other
    chunk `"usage": null`, as OpenAI's stream does."""
    body = {"id": completion_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [] if usage_only else [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                                               "logprobs": None}]}
    if usage_only or include_usage:
        body["usage"] = _usage(completion) if usage_only else None
    return f"data: {json.dumps(body)}\n\n"


def model_body(model: str, created: int) -> dict:
    """OpenAI's model object (GET /v1/models/{model})."""
    return {"id": model, "object": "model", "created": created, "owned_by": "storm-vlm"}


def models_body(model: str, created: int) -> dict:
    return {"object": "list", "data": [model_body(model, created)]}


def busy_error(exc: EngineBusy) -> OpenAIError:
    return OpenAIError(503, str(exc), kind="server_busy", code="queue_full",
                       headers={"Retry-After": str(exc.retry_after)})
