"""The HTTP API (FastAPI): `create_app(engine, ...)`.

    GET  /health      model folder, device, precision, compression settings, limits
    POST /v1/answer   a question about a video:
        multipart/form-data: video (the file), question, options (repeat the field, or one
            JSON array), frames, temporal_sample_stride, max_new_tokens, start, end
        application/json: the same fields plus video_path (a file on the server) -- only
            when the app was created with allow_local_paths=True (never by default)

Status codes: 200 the answer (see `StormEngine.answer`); 403 local paths not allowed;
413 upload larger than max_upload_mb; 415 another content type; 422 bad parameters or a
video that cannot be decoded (the message names the cause, never a traceback). Uploads are
written to a private temporary folder that is deleted when the request ends. The OpenAPI
schema is at /openapi.json, the interactive docs at /docs.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

import storm_vlm
from storm_vlm.errors import StormError

__all__ = ["create_app", "AnswerParams", "LocalAnswerRequest", "AnswerResponse"]

log = logging.getLogger("storm_vlm.serve")

_FORM_SLACK = 64 * 1024  # multipart boundaries and the small text fields next to the video
_JSON_LIMIT = 1024 * 1024
_SAFE_SUFFIX = re.compile(r"^\.[A-Za-z0-9]{1,8}$")


class AnswerParams(BaseModel):
    """The question and how to read the video (the video itself comes separately)."""

    model_config = ConfigDict(extra="forbid")

    question: str = Field(min_length=1, description="the question about the video")
    options: list[str] | None = Field(None, description="multiple-choice options (2-26); the reply is read "
                                      "as one of them (choice, choice_letter)")
    frames: int | None = Field(None, ge=1, description="frames sampled uniformly (default: the server's --frames)")
    temporal_sample_stride: int | None = Field(None, ge=1, description="test-time temporal sampling: keep every "
                                               "s-th frame's tokens (default: the model's)")
    max_new_tokens: int = Field(64, ge=1, description="answer length limit")
    start: float | None = Field(None, ge=0, description="read the video from this second")
    end: float | None = Field(None, gt=0, description="read the video up to this second")


class LocalAnswerRequest(AnswerParams):
    """JSON body naming a video file on the server (needs --allow-local-paths)."""

    video_path: str = Field(min_length=1, description="path of a video file on the server")


class AnswerTimings(BaseModel):
    decode_s: float
    wait_s: float
    prefill_s: float | None
    generate_s: float | None
    total_s: float


class AnswerResponse(BaseModel):
    answer: str
    choice: int | None = Field(description="0-based option the answer names (None: none, or no options)")
    choice_letter: str | None
    options: list[str] | None
    visual_tokens: int = Field(description="visual tokens the LLM read")
    frames: int = Field(description="frames decoded from the video (T)")
    visual_frames: int = Field(description="frames left after temporal pooling and sampling (T')")
    temporal_sample_stride: int
    text_tokens: int
    video: dict
    timings: AnswerTimings


class _TooLarge(Exception):
    pass


def _error(status: int, detail) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


def _limited(request: Request, limit: int) -> Request:
    """The same request, whose body stream raises _TooLarge once more than `limit` bytes arrive
    (bodies sent without a Content-Length are stopped too)."""
    received = 0

    async def receive():
        nonlocal received
        message = await request.receive()
        if message.get("type") == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise _TooLarge
        return message

    return Request(request.scope, receive)


def _content_length(request: Request) -> int | None:
    try:
        return int(request.headers["content-length"])
    except (KeyError, ValueError):
        return None


def _validate(model: type[BaseModel], data) -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None


def _form_params(form) -> AnswerParams:
    data: dict = {}
    for key, value in form.multi_items():
        if key in ("video", "options") or isinstance(value, UploadFile):
            continue
        if value != "":  # HTML forms and Swagger UI send empty optional fields
            data[key] = value
    options = [o for o in form.getlist("options") if isinstance(o, str) and o != ""]
    if len(options) == 1 and options[0].lstrip().startswith("["):
        try:
            options = json.loads(options[0])
        except ValueError:
            raise RequestValidationError([{"type": "json_invalid", "loc": ["body", "options"],
                                           "msg": "options is not a valid JSON array", "input": options[0]}])
    if options:
        data["options"] = options
    return _validate(AnswerParams, data)


_MULTIPART_SCHEMA = {
    "type": "object",
    "required": ["video", "question"],
    "properties": {
        "video": {"type": "string", "format": "binary", "description": "the video file (or a still image)"},
        "question": {"type": "string"},
        "options": {"type": "array", "items": {"type": "string"},
                    "description": "repeat the field once per option, or send one JSON array"},
        "frames": {"type": "integer", "minimum": 1},
        "temporal_sample_stride": {"type": "integer", "minimum": 1},
        "max_new_tokens": {"type": "integer", "minimum": 1, "default": 64},
        "start": {"type": "number", "minimum": 0},
        "end": {"type": "number", "exclusiveMinimum": 0},
    },
}


def create_app(engine, *, max_upload_mb: float = 200, allow_local_paths: bool = False) -> FastAPI:
    """A FastAPI app answering questions with `engine` (a `StormEngine`, or anything with its
    `answer(...)`, `info()` and `model_dir`)."""
    if not max_upload_mb > 0:
        raise StormError(f"max_upload_mb must be > 0, got {max_upload_mb!r}")
    max_upload = int(max_upload_mb * 1024 * 1024)
    app = FastAPI(title="storm-vlm", summary="Ask a STORM video-LLM questions about videos.",
                  version=_version())

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", **engine.info(),
                "server": {"max_upload_mb": max_upload_mb, "allow_local_paths": allow_local_paths}}

    async def run_answer(video_path, params: AnswerParams, shown_as: str | None = None) -> JSONResponse:
        try:
            result = await run_in_threadpool(
                engine.answer, video_path, params.question, options=params.options, num_frames=params.frames,
                temporal_sample_stride=params.temporal_sample_stride, max_new_tokens=params.max_new_tokens,
                start=params.start, end=params.end)
        except StormError as exc:  # VideoDecodeError included: the message names the file and the cause
            message = str(exc)
            if shown_as is not None:
                message = message.replace(str(video_path), shown_as)
            return _error(422, message)
        return JSONResponse(result)

    @app.post(
        "/v1/answer",
        summary="Answer a question about a video",
        response_model=None,
        responses={200: {"model": AnswerResponse}, 403: {"description": "local paths are not allowed"},
                   413: {"description": "upload too large"}, 415: {"description": "unsupported content type"},
                   422: {"description": "bad parameters, or the video cannot be decoded"}},
        openapi_extra={"requestBody": {"required": True, "content": {
            "multipart/form-data": {"schema": _MULTIPART_SCHEMA},
            "application/json": {"schema": LocalAnswerRequest.model_json_schema()},
        }}},
    )
    async def answer(request: Request):
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type == "application/json":
            if not allow_local_paths:
                return _error(403, "local video paths are disabled on this server (start it with "
                                   "--allow-local-paths); upload the video as multipart/form-data instead")
            if (_content_length(request) or 0) > _JSON_LIMIT:
                return _error(413, f"JSON body larger than {_JSON_LIMIT} bytes")
            try:
                body = await _limited(request, _JSON_LIMIT).json()
            except _TooLarge:
                return _error(413, f"JSON body larger than {_JSON_LIMIT} bytes")
            except ValueError as exc:
                return _error(422, f"body is not valid JSON ({exc})")
            params = _validate(LocalAnswerRequest, body)
            return await run_answer(params.video_path, params)
        if content_type != "multipart/form-data":
            return _error(415, "send the video as multipart/form-data (field 'video') with a 'question' field")

        too_large = f"upload larger than the server's limit of {max_upload_mb:g} MB"
        if (_content_length(request) or 0) > max_upload + _FORM_SLACK:
            return _error(413, too_large)
        try:
            form = await _limited(request, max_upload + _FORM_SLACK).form(max_files=1, max_fields=64)
        except _TooLarge:
            return _error(413, too_large)
        workdir = None
        try:
            video = form.get("video")
            if not isinstance(video, UploadFile):
                raise RequestValidationError([{"type": "missing", "loc": ["body", "video"],
                                               "msg": "Field required: the video file", "input": None}])
            params = _form_params(form)
            if video.size is not None and video.size > max_upload:
                return _error(413, too_large)
            shown_as = Path(video.filename or "upload").name or "upload"
            suffix = Path(shown_as).suffix
            workdir = Path(tempfile.mkdtemp(prefix="storm-serve-"))
            path = workdir / ("upload" + (suffix if _SAFE_SUFFIX.match(suffix) else ""))
            await run_in_threadpool(_copy, video.file, path)
            return await run_answer(path, params, shown_as=shown_as)
        finally:
            await form.close()
            if workdir is not None:
                shutil.rmtree(workdir, ignore_errors=True)

    return app


def _copy(src, dst: Path) -> None:
    src.seek(0)
    with open(dst, "wb") as out:
        shutil.copyfileobj(src, out, length=1024 * 1024)


def _version() -> str:
    return storm_vlm.__version__
