"""Streaming sessions over HTTP: a live video sent in pieces, and questions about it while it comes.

`add_session_routes(app, engine)` adds to a FastAPI app (`storm_vlm.serve.api.create_app` calls it):

    POST   /v1/sessions                 start a session: JSON {fps, temporal_sample_stride,
                                        max_visual_tokens, memory_policy}, all optional -> 201 {id, ...}
    POST   /v1/sessions/{id}/chunks     the next piece of the video: the bytes of a self-contained
                                        segment file (MPEG-TS, MP4, Matroska/WebM, ...) as the body
                                        (any content type but JSON / form) -> frames added, totals, timings
    POST   /v1/sessions/{id}/ask        JSON {question, options, max_new_tokens} -> the answer from
                                        everything received so far
    GET    /v1/sessions/{id}            where the session is (frames, visual tokens, memory)
    DELETE /v1/sessions/{id}            end it (204)

Each session is a `storm_vlm.streaming.StormStream` (needs a model with a causal projector: with a
bidirectional one, creating a session is a 400 naming `projector_bidirectional=False`). Segments
are sampled at the session's fps with times continuing from one segment to the next
(`storm_vlm.streaming.sources.FrameSampler`), encoded once and appended to the session's KV cache;
a question never re-encodes anything.

Bounds: at most `max_sessions` sessions (429 beyond); a segment of at most `max_chunk_bytes`
(413); a body that stalls for `body_timeout_s` (408); a segment that takes longer than the engine's
`decode_timeout_s` (the server's --decode-timeout) to decode and encode keeps the frames added so
far and ends there (503 with Retry-After when none were); a session unused for `idle_timeout_s` is
ended and its memory freed; each session's memory is bounded by its `max_visual_tokens` (at most
the server's `max_visual_tokens`, default the LLM's positions less room for a question). Model
work takes the engine's `model_lock`, so sessions and one-shot requests never compute at the same
time (a segment is fed in pieces of `FEED_FRAMES` frames, releasing the lock between them);
one request per session at a time (a second one waits, in the event loop: no worker thread is
held while waiting). A segment damaged after some frames keeps them (the body's `error` says where
it stopped). A session deleted or expired while requests wait answers them 404 (a segment being
added stops at its next frame). Errors are 4xx with a message naming the cause: 400 a model that
cannot stream, 404 no such session, 422 bad parameters or a segment that cannot be decoded.
"""

from __future__ import annotations

import asyncio
import io
import secrets
import shutil
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from storm_vlm.errors import StormError
from storm_vlm.media.limits import Budget
from storm_vlm.serve.bodies import BodyTooLarge, BodyTooSlow, detail_error, limited
from storm_vlm.serve.engine import MAX_OPTION_CHARS, MAX_OPTIONS, MAX_QUESTION_CHARS
from storm_vlm.video import DecodeCancelled, DecodeTimeout, VideoDecodeError

__all__ = ["add_session_routes", "SessionStore", "CreateSession", "AskSession"]

FEED_FRAMES = 32  # frames encoded per model-lock hold while a segment is added
LOCK_POLL_S = 0.02  # how often a request waiting for its session's turn looks again
_UPLOAD_NAME = "segment"  # a fixed name: the client never chooses how the bytes are read


class CreateSession(BaseModel):
    model_config = ConfigDict(extra="forbid")

    fps: float = Field(1.0, gt=0, le=30, allow_inf_nan=False, description="frames sampled per second of video")
    temporal_sample_stride: int | None = Field(None, ge=1, le=64, description="keep every s-th pooled frame "
                                               "(default: the model's)")
    max_visual_tokens: int | None = Field(None, ge=1, description="memory budget in visual tokens (default and "
                                          "maximum: the server's)")
    memory_policy: str = Field("resample", pattern="^(resample|uniform|window)$",
                               description="what is kept of the past past the budget")


class AskSession(BaseModel):
    model_config = ConfigDict(extra="forbid")

    question: str = Field(min_length=1, max_length=MAX_QUESTION_CHARS)
    options: list[Annotated[str, Field(max_length=MAX_OPTION_CHARS)]] | None = Field(None, max_length=MAX_OPTIONS)
    max_new_tokens: int = Field(64, ge=1)


class _Session:
    def __init__(self, sid: str, stream, sampler, settings: dict):
        self.id = sid
        self.stream = stream
        self.sampler = sampler
        self.settings = settings
        self.lock = threading.Lock()  # held while a request of the session works (see `locked`)
        self.created = self.used = time.monotonic()
        self.busy = 0  # requests inside (holding or waiting for the lock): never reaped while > 0
        self.chunks = 0
        self.ended = threading.Event()  # deleted or expired: requests still waiting or running stop

    def describe(self) -> dict:
        return {"id": self.id, **self.settings, "chunks": self.chunks, "video_seconds": round(self.sampler.end, 3),
                **self.stream.stats(), "memory_bytes": self.stream.memory_bytes()["total"],
                "idle_s": round(time.monotonic() - self.used, 3)}


class SessionStore:
    """The live sessions of one engine, bounded in number and idle time (thread-safe)."""

    def __init__(self, engine, max_sessions: int = 4, idle_timeout_s: float = 600.0,
                 max_visual_tokens: int | None = None):
        self.engine = engine
        self.max_sessions = max_sessions
        self.idle_timeout_s = idle_timeout_s
        self.max_visual_tokens = max_visual_tokens
        self._sessions: dict[str, _Session] = {}
        self._lock = threading.Lock()

    def reap(self) -> int:
        """End sessions idle longer than idle_timeout_s; returns how many."""
        now = time.monotonic()
        with self._lock:
            stale = [sid for sid, s in self._sessions.items()
                     if s.busy == 0 and now - s.used > self.idle_timeout_s]
            for sid in stale:
                self._sessions.pop(sid).ended.set()
        return len(stale)

    def create(self, params: CreateSession) -> _Session:
        from storm_vlm.streaming.sources import FrameSampler
        from storm_vlm.streaming.stream import StormStream, check_streamable

        try:
            check_streamable(self.engine.predictor.model.config)
        except StormError as exc:
            raise _CannotStream(str(exc)) from None
        self.reap()
        cap = self.max_visual_tokens
        if cap is not None and params.max_visual_tokens is not None and params.max_visual_tokens > cap:
            raise StormError(f"max_visual_tokens {params.max_visual_tokens} is above this server's limit of {cap}")
        with self._lock:
            if len(self._sessions) >= self.max_sessions:
                raise _Full(f"{len(self._sessions)} sessions are open, the server's limit; delete one "
                            f"(DELETE /v1/sessions/ID) or wait for an idle one to end ({self.idle_timeout_s:g} s)")
            stream = StormStream(self.engine.predictor, temporal_sample_stride=params.temporal_sample_stride,
                                 max_visual_tokens=params.max_visual_tokens or cap,
                                 memory_policy=params.memory_policy)
            settings = {"fps": params.fps, "temporal_sample_stride": stream.s,
                        "max_visual_tokens": stream.max_visual_tokens, "memory_policy": stream.memory_policy}
            session = _Session(secrets.token_hex(8), stream, FrameSampler(params.fps), settings)
            self._sessions[session.id] = session
        return session

    def get(self, sid: str) -> _Session | None:
        self.reap()
        with self._lock:
            session = self._sessions.get(sid)
            if session is not None:
                session.used = time.monotonic()
            return session

    def delete(self, sid: str) -> bool:
        """End a session: a request of it still waiting is answered 404, a segment being added
        stops at its next frame, and its memory is freed once that request returns."""
        with self._lock:
            session = self._sessions.pop(sid, None)
        if session is None:
            return False
        session.ended.set()
        return True

    def __len__(self) -> int:
        return len(self._sessions)


class _Full(StormError):
    pass


class _CannotStream(StormError):
    """The server's model cannot stream (a bidirectional projector): 400, whatever the parameters."""


class _Ended(StormError):
    """The session was deleted or expired while a request of it waited or ran."""


class _Timed(io.FileIO):
    """A file whose reads stop with DecodeTimeout once `budget`'s deadline has passed: the
    segment's demuxer reads through it, so decoding stops within one read of the deadline even
    between the frames the session keeps."""

    def __init__(self, path: Path, budget: Budget):
        super().__init__(path, "rb")
        self.budget = budget

    def read(self, size: int = -1) -> bytes:
        self.budget.check()
        return super().read(size)


def _add_segment(session: _Session, path: Path, model_lock, timeout_s: float | None) -> tuple[dict, Exception | None]:
    """Decode the segment at `path` at the session's fps and feed its frames, for at most
    `timeout_s` seconds (decoding, encoding and waiting for the model included); the session's
    lock is held. (body, the error that ended the segment early or None)."""
    import numpy as np

    from storm_vlm.streaming.sources import decode_segment

    t0 = time.perf_counter()
    budget = Budget("the chunk", timeout_s, session.ended)  # a deleted session stops decoding
    before = session.stream.frames_seen
    totals = {"encode_s": 0.0, "prefill_s": 0.0, "rebuild_s": 0.0}
    frames: list = []

    def feed():
        with model_lock:
            stats = session.stream.feed(np.stack(frames))
        for key in totals:
            totals[key] += getattr(stats, key)
        frames.clear()

    error = None
    damage: list[str] = []  # damaged stretches skipped (decoding went on): said in the body's "error"
    try:
        try:
            with _Timed(path, budget) as source:
                for _, frame in decode_segment(source, session.sampler, "the chunk",
                                               min_side=session.stream.model.config.vision_config.image_size,
                                               on_damage=lambda exc: damage.append(str(exc))):
                    budget.check()
                    if frames and frames[0].shape != frame.shape:
                        feed()
                    frames.append(frame)
                    if len(frames) >= FEED_FRAMES:
                        feed()
        except (DecodeTimeout, DecodeCancelled):
            raise  # past the deadline, or the session ended: the frames not encoded yet are dropped
        except VideoDecodeError as exc:
            error = exc  # damaged after some frames: those are part of the video, as `storm-vlm watch` keeps them
        if frames:
            feed()
    except StormError as exc:
        error = exc
    added = session.stream.frames_seen - before
    if error is None or added:  # a chunk of which nothing could be read is not one the session holds
        session.chunks += 1
    body = {"frames_added": added, **session.describe(),
            "timings": {**{k: round(v, 4) for k, v in totals.items()}, "total_s": round(time.perf_counter() - t0, 4)}}
    if error is not None or damage:
        body["error"] = "; ".join([*damage, *([] if error is None else [str(error)])])
    return body, error


def _start_reaper(store: SessionStore) -> None:
    """A daemon thread ending idle sessions even when no request comes; it stops with the store."""
    ref = weakref.ref(store)
    period = max(0.05, min(60.0, store.idle_timeout_s / 2))

    def loop():
        while True:
            time.sleep(period)
            live = ref()
            if live is None:
                return
            live.reap()
            del live

    threading.Thread(target=loop, name="storm-session-reaper", daemon=True).start()


def add_session_routes(app: FastAPI, engine, *, max_sessions: int = 4, max_chunk_bytes: int = 64 * 2**20,
                       idle_timeout_s: float = 600.0, body_timeout_s: float = 60.0,
                       max_visual_tokens: int | None = None) -> SessionStore:
    """Add the /v1/sessions routes for `engine` (a `StormEngine`) to `app`; returns their SessionStore."""
    store = SessionStore(engine, max_sessions, idle_timeout_s, max_visual_tokens)
    model_lock = getattr(engine, "model_lock", None) or threading.Lock()
    _start_reaper(store)

    async def json_body(request: Request, model: type[BaseModel], empty_ok: bool = False):
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        try:
            raw = b"".join([c async for c in limited(request, 64 * 1024, body_timeout_s).stream()])
        except BodyTooLarge:
            return detail_error(413, "JSON body larger than 64 KiB")
        except BodyTooSlow:
            return detail_error(408, f"the request body did not arrive within {body_timeout_s:g} s")
        if not raw.strip() and empty_ok:
            return model()
        if content_type != "application/json":
            return detail_error(415, "send the parameters as application/json")
        try:
            return model.model_validate_json(raw)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "body"
            return detail_error(422, f"{where}: {first.get('msg')}")

    def session_or_404(sid: str):
        session = store.get(sid)
        if session is None:
            return None, detail_error(404, f"no session {sid!r} (never made, deleted, or ended after "
                                     f"{idle_timeout_s:g} s idle)")
        return session, None

    async def locked(session: _Session, fn, *args):
        """Run fn(*args) in a worker thread while holding the session's lock; _Ended when the
        session was deleted or expired while the request waited (it does nothing then).

        The lock is waited for in the event loop, polling: a waiting request holds no worker
        thread, so a client queueing many requests on its session cannot take every thread of
        the pool that the other sessions and the one-shot requests need. (Not an asyncio.Lock,
        which belongs to one event loop: a TestClient runs each request in a loop of its own.)
        The worker thread is never abandoned on cancellation, so the lock is released only once
        it has returned."""
        session.busy += 1
        try:
            while not session.lock.acquire(blocking=False):
                await asyncio.sleep(LOCK_POLL_S)
            try:
                if session.ended.is_set():
                    raise _Ended(f"session {session.id!r} was ended while this request waited")
                return await run_in_threadpool(fn, *args)
            finally:
                session.used = time.monotonic()
                session.lock.release()
        finally:
            session.busy -= 1

    @app.post("/v1/sessions", status_code=201, summary="Start a streaming session (needs a causal projector)")
    async def create_session(request: Request):
        params = await json_body(request, CreateSession, empty_ok=True)
        if isinstance(params, Response):
            return params
        try:
            session = store.create(params)
        except _Full as exc:
            return detail_error(429, str(exc), headers={"Retry-After": str(int(min(idle_timeout_s, 3600)))})
        except _CannotStream as exc:
            return detail_error(400, str(exc))
        except StormError as exc:  # parameters this model cannot use (a budget too small or too large)
            return detail_error(422, str(exc))
        return JSONResponse({**session.describe(), "idle_timeout_s": idle_timeout_s,
                             "max_chunk_bytes": max_chunk_bytes}, status_code=201)

    @app.get("/v1/sessions/{sid}", summary="Where a session is: frames, visual tokens, memory")
    async def get_session(sid: str):
        session, error = session_or_404(sid)
        return error or JSONResponse(session.describe())

    @app.delete("/v1/sessions/{sid}", status_code=204, summary="End a session")
    async def delete_session(sid: str):
        if not store.delete(sid):
            return detail_error(404, f"no session {sid!r}")
        return Response(status_code=204)

    @app.post("/v1/sessions/{sid}/chunks", summary="Append the next segment of the video (the file's bytes as the body)")
    async def add_chunk(sid: str, request: Request):
        session, error = session_or_404(sid)
        if error:
            return error
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type in ("application/json", "multipart/form-data", "application/x-www-form-urlencoded"):
            return detail_error(415, "send the segment's bytes as the body (e.g. application/octet-stream or video/mp2t)")
        too_large = f"segment larger than the server's limit of {max_chunk_bytes} bytes"
        try:
            if int(request.headers.get("content-length") or 0) > max_chunk_bytes:
                return detail_error(413, too_large)
        except ValueError:
            return detail_error(400, "invalid Content-Length")
        workdir = Path(tempfile.mkdtemp(prefix="storm-session-"))
        try:
            path = workdir / _UPLOAD_NAME
            size = 0
            try:
                with open(path, "wb") as out:
                    async for piece in limited(request, max_chunk_bytes, body_timeout_s).stream():
                        size += len(piece)
                        out.write(piece)
            except BodyTooLarge:
                return detail_error(413, too_large)
            except BodyTooSlow:
                return detail_error(408, f"the segment did not arrive within {body_timeout_s:g} s")
            if size == 0:
                return detail_error(422, "the chunk is empty: send a segment file's bytes as the body")
            body, error = await locked(session, _add_segment, session, path, model_lock, engine.decode_timeout_s)
        except _Ended as exc:
            return detail_error(404, str(exc))
        finally:
            await asyncio.to_thread(shutil.rmtree, workdir, True)
        if session.ended.is_set():  # deleted while the segment was added: it stopped, and is gone with the session
            return detail_error(404, f"session {session.id!r} was ended while this chunk was added")
        if isinstance(error, DecodeTimeout) and body["frames_added"] == 0:
            return detail_error(503, body["error"], headers={"Retry-After": "10"})
        if error is not None and body["frames_added"] == 0:
            return detail_error(422, body["error"])
        return JSONResponse(body)

    @app.post("/v1/sessions/{sid}/ask", summary="Ask about everything the session has received so far")
    async def ask(sid: str, request: Request):
        session, error = session_or_404(sid)
        if error:
            return error
        params = await json_body(request, AskSession)
        if isinstance(params, Response):
            return params

        def answer():
            from storm_vlm.choices import LETTERS, extract_choice

            question, options, _, _, max_new = engine.check_request(params.question, params.options, 1, None,
                                                                    params.max_new_tokens)
            with model_lock:
                reply = session.stream.ask(engine.prompt(question, options), max_new)  # ask keeps placeholders as text
            choice = extract_choice(reply.text, options) if options else None
            return {"answer": reply.text, "choice": choice, "choice_letter": None if choice is None else LETTERS[choice],
                    "options": options, "frames": session.stream.frames_seen,
                    "video_seconds": round(session.sampler.end, 3), "visual_tokens": reply.visual_tokens,
                    "prompt_tokens": reply.prompt_tokens, "completion_tokens": len(reply.token_ids),
                    "timings": {"prefill_s": reply.prefill_s, "generate_s": reply.generate_s}}

        try:
            return JSONResponse(await locked(session, answer))
        except _Ended as exc:
            return detail_error(404, str(exc))
        except StormError as exc:
            return detail_error(422, str(exc))

    app.state.sessions = store
    return store
