"""The HTTP API (FastAPI): `create_app(engine, ...)`.

    GET  /health                model folder, device, precision, compression settings, limits (HEAD too)
    GET  /v1/models             OpenAI's model list (the one model served; HEAD too), and
         /v1/models/{model}     that model (OpenAI's models.retrieve)
    POST /v1/chat/completions   OpenAI's chat completions, streaming too (see `storm_vlm.serve.openai_api`)
    POST /v1/completions        OpenAI's text completions: a raw prompt, no chat template, no media
    POST /v1/answer             a question about a video:
        multipart/form-data: video (the file), question, options (repeat the field, or one
            JSON array), frames, temporal_sample_stride, max_new_tokens, start, end
        application/json: the same fields plus video_path (a file on the server) -- only
            when the app was created with allow_local_paths=True or allowed_local_media_path
            (never by default)

Status codes of /v1/answer: 200 the answer (see `StormEngine.answer`); 403 local paths not
allowed; 408 the body did not arrive in time; 413 upload larger than max_upload_mb (a JSON body:
over 1 MB, or of too many values); 415 another content type; 422 bad parameters (each refused
input shown only when a short scalar) or a video that cannot be decoded (the message names the
cause, never a traceback); 503 the queue is full, or `max_concurrent_bodies` bodies are being read
already (with Retry-After). Every input is bounded and checked before any work (option count and
length, finite numbers in range, JSON nesting, text that is not Unicode, NUL in paths);
rendering, tokenizing and the parsing of large bodies run in worker threads, never on the event
loop; uploads are written under a fixed name to a private temporary folder deleted when the
request ends; a request whose client hangs up stops generating. An unknown path (404) or method
(405) is answered with OpenAI's error object, as vLLM's server answers it. The OpenAPI schema is at
/openapi.json, the interactive docs at /docs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import shutil
import tempfile
import threading
import time
from http import HTTPStatus
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

import storm_vlm
from storm_vlm.errors import StormError
from storm_vlm.serve import openai_api as oai
from storm_vlm.serve.bodies import (BodiesBusy, BodySlots, BodyTooLarge, BodyTooSlow, TooManyValues, content_length,
                                    detail_error, limited, parse_json, validation_errors)
from storm_vlm.serve.engine import MAX_OPTION_CHARS, MAX_OPTIONS, MAX_QUESTION_CHARS, EngineBusy, RequestError
from storm_vlm.serve.network import BearerKey
from storm_vlm.serve.sessions import add_session_routes
from storm_vlm.utils import check_int
from storm_vlm.video import DecodeCancelled, DecodeTimeout

__all__ = ["create_app", "AnswerParams", "LocalAnswerRequest", "AnswerResponse"]

log = logging.getLogger("storm_vlm.serve")

_FORM_SLACK = 64 * 1024  # multipart boundaries and the small text fields next to the video
_JSON_LIMIT = 1024 * 1024
# JSON values a chat body may hold: room for its longest texts (whose commas and brackets count too)
_CHAT_JSON_VALUES = 2 * oai.MAX_TOTAL_TEXT_CHARS
_ANSWER_JSON_VALUES = 2 * (MAX_QUESTION_CHARS + MAX_OPTIONS * MAX_OPTION_CHARS)  # likewise, for /v1/answer's
_MAX_SECONDS = 10**7  # start / end beyond ~4 months of video are refused before any work
_UPLOAD_NAME = "upload"  # a fixed name: the client's file name never chooses how the bytes are read
_Option = Annotated[str, Field(max_length=MAX_OPTION_CHARS)]


class AnswerParams(BaseModel):
    """The question and how to read the video (the video itself comes separately)."""

    model_config = ConfigDict(extra="forbid")

    question: str = Field(min_length=1, max_length=MAX_QUESTION_CHARS, description="the question about the video")
    options: list[_Option] | None = Field(None, max_length=MAX_OPTIONS, description="multiple-choice options "
                                          "(2-26); the reply is read as one of them (choice, choice_letter)")
    frames: int | None = Field(None, ge=1, description="frames sampled uniformly (default: the server's --frames)")
    temporal_sample_stride: int | None = Field(None, ge=1, le=64, description="test-time temporal sampling: keep "
                                               "every s-th frame's tokens (default: the model's)")
    max_new_tokens: int = Field(64, ge=1, description="answer length limit")
    start: float | None = Field(None, ge=0, le=_MAX_SECONDS, allow_inf_nan=False,
                                description="read the video from this second")
    end: float | None = Field(None, gt=0, le=_MAX_SECONDS, allow_inf_nan=False,
                              description="read the video up to this second")


def _no_nul(path: str) -> str:
    if "\x00" in path:
        raise ValueError("the path holds a NUL character")
    return path


class LocalAnswerRequest(AnswerParams):
    """JSON body naming a video file on the server (needs --allow-local-paths)."""

    video_path: Annotated[str, AfterValidator(_no_nul)] = Field(min_length=1, description="path of a video file on "
                                                                "the server")


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
    stride_planned: bool = Field(False, description="the frames did not fit the LLM at the stride asked for: "
                                 "temporal_sample_stride is the smallest larger one that fits")
    text_tokens: int
    video: dict
    timings: AnswerTimings


@contextlib.asynccontextmanager
async def on_disconnect(request: Request, act):
    """Inside: `act()` is called once if the client disconnects first, checked every 0.5 s however
    busy the work inside keeps the event loop's other tasks (tokens streaming in, a decode)."""
    async def watch():
        while not await request.is_disconnected():
            await asyncio.sleep(0.5)
        act()

    watcher = asyncio.create_task(watch())
    try:
        yield
    finally:
        watcher.cancel()


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
            options = parse_json(options[0])
        except ValueError as exc:
            raise RequestValidationError([{"type": "json_invalid", "loc": ["body", "options"],
                                           "msg": f"options is not a valid JSON array ({exc})",
                                           "input": options[0][:100]}]) from None
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


def create_app(engine, *, max_upload_mb: float = 200, allow_local_paths: bool = False,
               allowed_local_media_path: str | Path | None = None, model_name: str | None = None,
               body_timeout_s: float = 60.0, max_sessions: int = 4, session_idle_s: float = 600.0,
               max_concurrent_bodies: int = 4, api_key: str | None = None) -> FastAPI:
    """A FastAPI app serving `engine` (a `StormEngine`). Files on the server (file: URLs,
    /v1/answer's video_path) are read only with `allow_local_paths` (any file) or inside the folder
    `allowed_local_media_path` (vLLM's --allowed-local-media-path; see `openai_api.LocalMedia`).
    `model_name`: the id /v1/models reports and
    completions accept (default: the model folder's name); `body_timeout_s`: the longest wait
    for the next part of a request body; `max_sessions`, `session_idle_s`: live-video sessions open
    at once at most, and how long one may stay idle (see `storm_vlm.serve.sessions`);
    `max_concurrent_bodies`: chat-completion and /v1/answer bodies read and parsed at once at
    most (`BodySlots`: each costs several times its size in memory); a request that finds no slot
    free within 10 s is answered 503 with Retry-After (`app.state.body_slots`). `api_key`: requests
    under /v1 must carry it as a bearer token (`storm_vlm.serve.network.BearerKey`)."""
    if not 0 < max_upload_mb < math.inf:
        raise StormError(f"max_upload_mb must be a finite number > 0, got {max_upload_mb!r}")
    max_upload = int(max_upload_mb * 1024 * 1024)
    local = oai.LocalMedia(allow_local_paths, allowed_local_media_path)
    # a chat-completions body carries its media base64-encoded (4 bytes per 3)
    chat_limit = max_upload * 4 // 3 + _JSON_LIMIT
    model_name = model_name or engine.model_dir.name
    started = int(time.time())
    app = FastAPI(title="storm-vlm", summary="Ask a STORM video-LLM questions about videos.",
                  version=storm_vlm.__version__)
    app.state.body_slots = body_slots = BodySlots(check_int("max_concurrent_bodies", max_concurrent_bodies,
                                                            error=StormError))
    if api_key is not None:
        app.add_middleware(BearerKey, key=api_key)

    @app.exception_handler(oai.OpenAIError)
    async def openai_error(request: Request, exc: oai.OpenAIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError):
        """FastAPI's 422 for /v1/answer's parameters, with each refused input shown only when it is
        a short scalar (`validation_errors`): never the whole body, NaN or lone surrogates."""
        return detail_error(422, validation_errors(exc.errors()))

    @app.exception_handler(HTTPException)
    async def route_error(request: Request, exc: HTTPException):
        """A path this server does not have (404) or a method its route does not take (405, with
        Allow): OpenAI's error object, shaped as vLLM's server answers HTTP errors (type: the
        status's phrase, code: the status), so OpenAI clients show the message; other HTTP errors
        keep FastAPI's form."""
        if exc.status_code not in (404, 405):
            return await http_exception_handler(request, exc)
        where = f"{request.method} {request.url.path[:200]}"
        message = (f"{where}: no such route on this server (see /docs)" if exc.status_code == 404 else
                   f"{where}: method not allowed; this route takes {(exc.headers or {}).get('Allow', '?')}")
        error = {"message": message, "type": HTTPStatus(exc.status_code).phrase, "param": None,
                 "code": exc.status_code}
        return JSONResponse({"error": error}, status_code=exc.status_code, headers=exc.headers)

    @app.head("/health", include_in_schema=False)
    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", **engine.info(),
                "server": {"model_name": model_name, "max_upload_mb": max_upload_mb,
                           "allow_local_paths": allow_local_paths,
                           "allowed_local_media_path": None if local.root is None else str(local.root),
                           "max_concurrent_bodies": max_concurrent_bodies}}

    @app.head("/v1/models", include_in_schema=False)
    @app.get("/v1/models", summary="The model this server answers with (OpenAI's model list)")
    def models() -> dict:
        return oai.models_body(model_name, started)

    @app.head("/v1/models/{model:path}", include_in_schema=False)
    @app.get("/v1/models/{model:path}", summary="The served model (OpenAI's models.retrieve); 404 for another name")
    def model(model: str) -> dict:
        if model != model_name:
            raise oai.OpenAIError(404, f"The model {model!r} does not exist; this server serves {model_name!r}",
                                  "model", code="model_not_found")
        return oai.model_body(model_name, started)

    async def read_body(request: Request, limit: int) -> bytes:
        if (content_length(request) or 0) > limit:
            raise BodyTooLarge
        chunks = []
        async for chunk in limited(request, limit, body_timeout_s).stream():
            chunks.append(chunk)
        return b"".join(chunks)

    async def until_disconnect(request: Request, fn, *args, **kwargs):
        """fn(*args, cancel=event, **kwargs) in a worker thread; the event is set when the client
        disconnects first (decoding stops there)."""
        cancel = threading.Event()
        async with on_disconnect(request, cancel.set):
            return await run_in_threadpool(fn, *args, cancel=cancel, **kwargs)

    async def wait_or_cancel(request: Request, handles: list) -> list:
        """The Completions of queued requests (the first error raised); all are cancelled when the
        client disconnects first."""
        async def outcome(handle):
            async for kind, payload in handle.aevents():
                if kind == "error":
                    raise payload
                if kind == "done":
                    return payload

        def cancel_all():
            for handle in handles:
                handle.cancel()

        async with on_disconnect(request, cancel_all):
            return [await outcome(handle) for handle in handles]

    @contextlib.asynccontextmanager
    async def openai_body_slot():
        """One of the body slots while a (chat) completion's body is read and built; OpenAI's 503
        with Retry-After when none comes free in time."""
        try:
            async with body_slots.take():
                yield
        except BodiesBusy as exc:
            raise oai.OpenAIError(503, str(exc), kind="server_busy", code="bodies_full",
                                  headers={"Retry-After": str(exc.retry_after)}) from None

    async def openai_body(request: Request):
        """The parsed JSON body of a (chat) completion, a dict (OpenAIError for a body that is not
        JSON, too large, too slow or naming another model); parsed in a worker thread (a body may be
        hundreds of MB of base64). A request without a Content-Type is read as JSON, as FastAPI's
        (and so vLLM's) routes read it."""
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type not in ("", "application/json"):
            raise oai.OpenAIError(415, "send the request as application/json")
        try:
            body = await run_in_threadpool(parse_json, await read_body(request, chat_limit), _CHAT_JSON_VALUES)
        except BodyTooLarge:
            raise oai.OpenAIError(413, f"request body larger than the server's limit ({max_upload_mb:g} MB of "
                                       "media, base64-encoded)", code="request_too_large") from None
        except BodyTooSlow:
            raise oai.OpenAIError(408, f"the request body did not arrive within {body_timeout_s:g} s") from None
        except TooManyValues as exc:
            raise oai.OpenAIError(413, str(exc), code="request_too_large") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise oai.OpenAIError(400, f"the body is not valid JSON ({exc})") from None
        if not isinstance(body, dict):
            raise oai.OpenAIError(400, "the body must be a JSON object")
        model = body.get("model")
        if isinstance(model, str) and model != model_name:  # another type is the validation's 400
            raise oai.OpenAIError(404, f"model {model[:200]!r} is not served here; this server serves "
                                       f"{model_name!r}", "model", code="model_not_found")
        return body

    def build_chat(body, cancel=None):
        """(prepared, videos, stream, include_usage, n) of a chat-completions body: validated, its
        media read, rendered and tokenized (blocking: run in a worker thread)."""
        workdir = Path(tempfile.mkdtemp(prefix="storm-serve-"))
        try:
            parsed, prepared, videos = oai.parse_chat_request(body, engine, workdir, local, max_upload, cancel=cancel)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        include_usage = bool(parsed.stream_options and parsed.stream_options.include_usage)
        return prepared, videos, bool(parsed.stream), include_usage, parsed.n or 1

    def handle_error(exc: Exception) -> oai.OpenAIError:
        """A queued request's error: 400 when its own inputs could not be built, else the server's 503."""
        if isinstance(exc, RequestError):
            return oai.OpenAIError(400, str(exc))
        return oai.OpenAIError(503, str(exc), kind="server_error")

    def submit_choices(prepared, videos, n: int) -> list:
        """Queue `n` copies of a built request (a seeded one's copy i with seed + i, so the choices
        differ and repeat), all or none: EngineBusy or a StormError cancels those queued."""
        handles = []
        try:
            for i in range(n):
                sampling = prepared.sampling
                if i and sampling.seed is not None:
                    sampling = dataclasses.replace(sampling, seed=(sampling.seed + i) % 2**63)
                handles.append(engine.submit(dataclasses.replace(prepared, sampling=sampling), videos,
                                             loop=asyncio.get_running_loop()))
        except EngineBusy as exc:
            raise oai.busy_error(exc) from None
        except StormError as exc:
            raise oai.OpenAIError(503, str(exc), kind="server_error") from None
        finally:
            if len(handles) < n:
                for handle in handles:
                    handle.cancel()
        return handles

    async def respond(request: Request, prepared, videos, reply: oai.Reply, stream: bool, echo: str = ""):
        """Queue a built request (`reply.n` choices) and answer it with `reply`: one JSON body, or
        server-sent events ending with `data: [DONE]` (an error after the stream started is one
        event with OpenAI's error object, and ends every choice)."""
        handles = submit_choices(prepared, videos, reply.n)
        if not stream:
            try:
                completions = await wait_or_cancel(request, handles)
            except StormError as exc:
                raise handle_error(exc) from None
            finally:
                for handle in handles:
                    handle.cancel()  # a no-op for those done
            return JSONResponse(reply.body(completions, echo))

        async def events():
            merged: asyncio.Queue = asyncio.Queue()

            async def forward(index, handle):
                async for kind, payload in handle.aevents():
                    await merged.put((index, kind, payload))

            tasks = [asyncio.create_task(forward(i, handle)) for i, handle in enumerate(handles)]
            try:
                if reply.chat or echo:
                    for index in range(reply.n):
                        yield reply.chunk(echo, first=True, index=index)
                done = {}
                while len(done) < reply.n:
                    index, kind, payload = await merged.get()
                    if kind == "delta":
                        yield reply.chunk(payload, index=index)
                    elif kind == "error":
                        yield f"data: {json.dumps(handle_error(payload).body())}\n\n"
                        break
                    else:
                        done[index] = payload
                        yield reply.chunk("", completion=payload, index=index)
                else:
                    if reply.include_usage:
                        yield reply.usage_chunk([done[i] for i in range(reply.n)])
                yield "data: [DONE]\n\n"
            finally:  # the client went away (the response task is cancelled) or the stream ended
                for handle, task in zip(handles, tasks):
                    handle.cancel()
                    task.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions", summary="OpenAI-compatible chat completions about videos and images",
              response_model=None,
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": oai.ChatCompletionRequest.model_json_schema()}}}})
    async def chat_completions(request: Request):
        try:
            async with openai_body_slot():
                body = await openai_body(request)
                prepared, videos, stream, include_usage, n = await until_disconnect(request, build_chat, body)
                del body  # its media (base64) is not kept while the request waits and generates
        except DecodeCancelled:
            return JSONResponse({}, status_code=499)  # the client is gone; nobody reads this
        return await respond(request, prepared, videos, oai.Reply(model_name, True, include_usage, n), stream)

    @app.post("/v1/completions", summary="OpenAI-compatible text completions (a raw prompt, no chat template)",
              response_model=None,
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": oai.CompletionRequest.model_json_schema()}}}})
    async def completions(request: Request):
        async with openai_body_slot():
            body = await openai_body(request)
            parsed, prepared = await run_in_threadpool(oai.parse_completion_request, body, engine)
        include_usage = bool(parsed.stream_options and parsed.stream_options.include_usage)
        echo = (parsed.prompt if isinstance(parsed.prompt, str) else parsed.prompt[0]) if parsed.echo else ""
        return await respond(request, prepared, [], oai.Reply(model_name, False, include_usage, parsed.n or 1),
                             bool(parsed.stream), echo)

    async def run_answer(request: Request, video_path, params: AnswerParams, shown_as: str | None = None):
        started = time.perf_counter()
        try:
            prepared, options, frames = await run_in_threadpool(
                engine.prepare_question, params.question, params.options, params.frames,
                params.temporal_sample_stride, params.max_new_tokens)
            clip = await until_disconnect(request, engine.read_video, video_path, frames, params.start, params.end)
            handle = engine.submit(prepared, [clip.frames], loop=asyncio.get_running_loop())
            (completion,) = await wait_or_cancel(request, [handle])
        except EngineBusy as exc:
            return detail_error(503, str(exc), headers={"Retry-After": str(exc.retry_after)})
        except DecodeCancelled:
            return detail_error(499, "the client disconnected")  # nobody reads this
        except DecodeTimeout as exc:
            message = str(exc) if shown_as is None else str(exc).replace(str(video_path), shown_as)
            return detail_error(503, message, headers={"Retry-After": "10"})
        except StormError as exc:  # VideoDecodeError included: the message names the file and the cause
            message = str(exc)
            if shown_as is not None:
                message = message.replace(str(video_path), shown_as)
            return detail_error(422, message)
        return JSONResponse(engine.answer_body(completion, clip, options, prepared, started))

    @app.post(
        "/v1/answer",
        summary="Answer a question about a video",
        response_model=None,
        responses={200: {"model": AnswerResponse}, 403: {"description": "local paths are not allowed"},
                   408: {"description": "the body did not arrive in time"},
                   413: {"description": "upload too large"}, 415: {"description": "unsupported content type"},
                   422: {"description": "bad parameters, or the video cannot be decoded"},
                   503: {"description": "the request queue is full (see Retry-After)"}},
        openapi_extra={"requestBody": {"required": True, "content": {
            "multipart/form-data": {"schema": _MULTIPART_SCHEMA},
            "application/json": {"schema": LocalAnswerRequest.model_json_schema()},
        }}},
    )
    async def answer(request: Request):
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type == "application/json":
            if not local.enabled:
                return detail_error(403, "local video paths are disabled on this server (start it with "
                                   "--allowed-local-media-path DIR or --allow-local-paths); upload the video as "
                                   "multipart/form-data instead")
            try:
                async with body_slots.take():
                    raw = await read_body(request, _JSON_LIMIT)
                    body = await run_in_threadpool(parse_json, raw, _ANSWER_JSON_VALUES)
            except BodiesBusy as exc:
                return detail_error(503, str(exc), headers={"Retry-After": str(exc.retry_after)})
            except BodyTooLarge:
                return detail_error(413, f"JSON body larger than {_JSON_LIMIT} bytes")
            except TooManyValues as exc:
                return detail_error(413, str(exc))
            except BodyTooSlow:
                return detail_error(408, f"the request body did not arrive within {body_timeout_s:g} s")
            except (ValueError, UnicodeDecodeError) as exc:
                return detail_error(422, f"body is not valid JSON ({exc})")
            params = _validate(LocalAnswerRequest, body)
            try:
                video_path = str(local.check(params.video_path, "video_path"))
            except oai.OpenAIError as exc:
                return detail_error(exc.status, exc.message)
            return await run_answer(request, video_path, params, shown_as=params.video_path)
        if content_type != "multipart/form-data":
            return detail_error(415, "send the video as multipart/form-data (field 'video') with a 'question' field")

        too_large = f"upload larger than the server's limit of {max_upload_mb:g} MB"
        if (content_length(request) or 0) > max_upload + _FORM_SLACK:
            return detail_error(413, too_large)
        form = None
        try:
            async with body_slots.take():
                form = await limited(request, max_upload + _FORM_SLACK, body_timeout_s).form(max_files=1,
                                                                                               max_fields=64)
        except BodiesBusy as exc:
            return detail_error(503, str(exc), headers={"Retry-After": str(exc.retry_after)})
        except BodyTooLarge:
            return detail_error(413, too_large)
        except BodyTooSlow:
            return detail_error(408, f"the request body did not arrive within {body_timeout_s:g} s")
        workdir = None
        try:
            video = form.get("video")
            if not isinstance(video, UploadFile):
                raise RequestValidationError([{"type": "missing", "loc": ["body", "video"],
                                               "msg": "Field required: the video file", "input": None}])
            params = _form_params(form)
            if video.size is not None and video.size > max_upload:
                return detail_error(413, too_large)
            shown_as = Path(video.filename or "upload").name or "upload"
            workdir = Path(tempfile.mkdtemp(prefix="storm-serve-"))
            path = workdir / _UPLOAD_NAME
            await run_in_threadpool(_copy, video.file, path)
            return await run_answer(request, path, params, shown_as=shown_as)
        finally:
            await form.close()
            if workdir is not None:
                shutil.rmtree(workdir, ignore_errors=True)

    add_session_routes(app, engine, max_sessions=max_sessions, max_chunk_bytes=max_upload,
                       idle_timeout_s=session_idle_s, body_timeout_s=body_timeout_s)
    return app


def _copy(src, dst: Path) -> None:
    src.seek(0)
    with open(dst, "wb") as out:
        shutil.copyfileobj(src, out, length=1024 * 1024)
