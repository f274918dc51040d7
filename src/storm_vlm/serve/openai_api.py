"""The OpenAI-compatible part of the HTTP API: `GET /v1/models` and `POST /v1/chat/completions`.

Request: OpenAI's chat-completions body. Message content is a string or a list of parts:
`{"type": "text", "text": ...}`, `{"type": "video_url", "video_url": {"url": ...}}`,
`{"type": "image_url", "image_url": {"url": ...}}`; a URL is a `data:` URL with base64 bytes, or a
`file://` path on the server when the server allows local paths. Nothing is fetched from the
network. An image is read as a one-frame video (the model's image path computes exactly that).
Supported: multi-turn messages (system / user / assistant), `max_tokens` (or
`max_completion_tokens`), `temperature`, `top_p`, `seed`, `stop`, `stream` (server-sent events of
`chat.completion.chunk` objects ending with `data: [DONE]`; `stream_options.include_usage` adds a
usage chunk), `n` = 1. STORM's own knobs are extra body fields (the OpenAI client's `extra_body`):
`num_frames`, `temporal_sample_stride`, `fps`. `usage.prompt_tokens` counts the visual tokens.
Errors are OpenAI's error object `{"error": {"message", "type", "param", "code"}}` with a 4xx
status (503 with Retry-After when the queue is full).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import time
import uuid
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from storm_vlm.errors import StormError
from storm_vlm.serve.engine import EngineBusy, MAX_QUESTION_CHARS, StormEngine
from storm_vlm.video import DecodeTimeout

__all__ = ["ChatCompletionRequest", "OpenAIError", "parse_chat_request", "completion_body", "chunk_body",
           "models_body", "MAX_VIDEOS"]

MAX_VIDEOS = 4
MAX_MESSAGES = 64
MAX_TEXT_CHARS = 4 * MAX_QUESTION_CHARS
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


class _Url(BaseModel):
    model_config = ConfigDict(extra="ignore")
    url: str = Field(max_length=512 * 1024 * 1024)


class _TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str = Field(max_length=MAX_TEXT_CHARS)


class _VideoPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["video_url"]
    video_url: _Url | str


class _ImagePart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["image_url"]
    image_url: _Url | str


_Part = Annotated[_TextPart | _VideoPart | _ImagePart, Field(discriminator="type")]


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")  # e.g. "name"
    role: Literal["system", "user", "assistant"]
    content: str | list[_Part] = Field(max_length=MAX_TEXT_CHARS)


class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


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
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: _StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)
    user: str | None = None
    # STORM's knobs
    num_frames: int | None = Field(None, ge=1)
    temporal_sample_stride: int | None = Field(None, ge=1, le=64)
    fps: float | None = Field(None, gt=0, le=240, allow_inf_nan=False)


def _pydantic_error(exc: ValidationError) -> OpenAIError:
    first = exc.errors(include_url=False)[0]
    param = ".".join(str(p) for p in first.get("loc", ()))
    return OpenAIError(400, f"{param}: {first.get('msg')}" if param else str(first.get("msg")), param or None)


def _media_bytes(url: str, allow_local_paths: bool, what: str, max_bytes: int) -> bytes | Path:
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or not header.endswith(";base64"):
            raise OpenAIError(400, f"{what}: a data URL must be base64-encoded (data:<type>;base64,<bytes>)")
        if len(payload) // 4 * 3 > max_bytes:
            raise OpenAIError(413, f"{what}: larger than the server's limit of {max_bytes} bytes per video or image",
                              code="request_too_large")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise OpenAIError(400, f"{what}: the data URL is not valid base64") from None
    if url.startswith("file://"):
        if not allow_local_paths:
            raise OpenAIError(403, f"{what}: file:// URLs are disabled on this server (start it with "
                                   "--allow-local-paths); send the bytes as a data: URL", code="local_paths_disabled")
        return Path(url[len("file://"):])
    scheme = url.split(":", 1)[0][:16]
    raise OpenAIError(400, f"{what}: {scheme!r} URLs are not fetched by this server; send the bytes as a data: URL")


def _image_frames(source: bytes | Path, what: str) -> np.ndarray:
    """(1, H, W, 3) uint8 from image bytes or a path; OpenAIError for what PIL cannot read."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise OpenAIError(400, f"{what}: {im.width}x{im.height} is larger than {MAX_IMAGE_PIXELS} pixels")
            return np.asarray(im.convert("RGB"), dtype=np.uint8)[None]
    except OpenAIError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise OpenAIError(400, f"{what}: not a readable image ({exc})") from None


def parse_chat_request(body: Any, engine: StormEngine, workdir: Path, allow_local_paths: bool, max_bytes: int,
                       cancel=None):
    """Validate a chat-completions body and read its media (blocking: run it in a thread).

    Returns (request, messages in the processor's content format, videos as frame arrays,
    sampling params). `workdir` receives uploaded video bytes (under fixed names); a video or
    image of more than `max_bytes` is refused (413); `cancel` (a threading.Event) stops decoding.
    """
    try:
        request = ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        raise _pydantic_error(exc) from None
    max_tokens = request.max_completion_tokens or request.max_tokens or min(256, engine.max_new_tokens_limit)
    temperature, top_p = engine.default_sampling()
    try:
        sampling = engine.check_sampling(max_tokens,
                                         temperature=temperature if request.temperature is None else request.temperature,
                                         top_p=top_p if request.top_p is None else request.top_p,
                                         seed=request.seed, stop=request.stop)
        num_frames = engine.default_frames if request.num_frames is None else request.num_frames
        if num_frames > engine.max_frames:
            raise StormError(f"num_frames must be at most {engine.max_frames}, got {num_frames}")
    except StormError as exc:
        raise OpenAIError(400, str(exc)) from None
    messages, videos = [], []
    for m, message in enumerate(request.messages):
        parts = [_TextPart(type="text", text=message.content)] if isinstance(message.content, str) else message.content
        content = []
        for p, part in enumerate(parts):
            where = f"messages.{m}.content.{p}"
            if isinstance(part, _TextPart):
                content.append({"type": "text", "text": part.text})
                continue
            if message.role != "user":
                raise OpenAIError(400, f"{where}: only user messages may hold videos or images", where)
            if len(videos) == MAX_VIDEOS:
                raise OpenAIError(400, f"{where}: at most {MAX_VIDEOS} videos or images per request", where)
            url = part.video_url if isinstance(part, _VideoPart) else part.image_url
            source = _media_bytes(url if isinstance(url, str) else url.url, allow_local_paths, where, max_bytes)
            if isinstance(part, _ImagePart):
                videos.append(_image_frames(source, where))
            else:
                path = source
                if isinstance(source, bytes):
                    path = workdir / f"video{len(videos)}"
                    path.write_bytes(source)
                try:
                    clip = engine.read_video(str(path), num_frames, fps=request.fps, cancel=cancel)
                except DecodeTimeout as exc:
                    raise OpenAIError(503, f"{where}: {str(exc).replace(str(path), 'the video')}", where,
                                      kind="server_busy", headers={"Retry-After": "10"}) from None
                except StormError as exc:
                    raise OpenAIError(400, f"{where}: {str(exc).replace(str(path), 'the video')}", where) from None
                videos.append(clip.frames)
            content.append({"type": "video"})
        messages.append({"role": message.role, "content": content})
    if messages[-1]["role"] != "user":
        raise OpenAIError(400, "the last message must be the user's", "messages")
    return request, messages, videos, sampling


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
               completion=None, usage_only: bool = False) -> str:
    """One server-sent event of a streamed completion."""
    body = {"id": completion_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [] if usage_only else [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                                               "logprobs": None}]}
    if usage_only:
        body["usage"] = _usage(completion)
    return f"data: {json.dumps(body)}\n\n"


def models_body(model: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "storm-vlm"}]}


def busy_error(exc: EngineBusy) -> OpenAIError:
    return OpenAIError(503, str(exc), kind="server_busy", code="queue_full",
                       headers={"Retry-After": str(exc.retry_after)})
