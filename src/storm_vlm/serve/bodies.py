"""Reading request bodies within bounds, for every route of the HTTP API.

`limited(request, limit, timeout_s)` wraps a request so its body stream stops with BodyTooLarge
past `limit` bytes (bodies without a Content-Length too) and with BodyTooSlow when the next part
of the body takes longer than `timeout_s`; `parse_json` refuses invalid and too deeply nested JSON
and strings that are not text (lone UTF-16 surrogates); `BodySlots` bounds the bodies read and
parsed at once; `detail_error` is the error response of the routes that answer in FastAPI's
`{"detail": ...}` form, and `validation_errors` the list it holds for a body pydantic refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import time

from fastapi import Request
from fastapi.responses import JSONResponse

__all__ = ["BodyTooLarge", "BodyTooSlow", "BodiesBusy", "BodySlots", "TooManyValues", "as_text", "content_length",
           "detail_error", "limited", "parse_json", "validation_errors"]

_SURROGATE = re.compile("[\ud800-\udfff]")
_SHOWN_INPUT_CHARS = 200  # of a refused string, in a validation error


class BodyTooLarge(Exception):
    pass


class BodyTooSlow(Exception):
    pass


class TooManyValues(ValueError):
    """A JSON body holds more values than its `max_values` (`parse_json`)."""


class BodiesBusy(Exception):
    """No body slot came free in time; try again after `retry_after` seconds."""

    retry_after = 2


class BodySlots:
    """At most `limit` requests reading and parsing their bodies at once: a body costs several
    times its size in memory while it is parsed (a chat completion's base64 media: the bytes, the
    JSON string, the decoded video), so the requests in flight bound the server's memory. `take()`
    waits up to `wait_s` for a slot (a waiting request has not read its body yet, so it costs no
    memory), then refuses with BodiesBusy. Used on the event loop only: a counter is enough."""

    def __init__(self, limit: int, wait_s: float = 10.0):
        self.limit = limit
        self.wait_s = wait_s
        self.busy = 0

    @contextlib.asynccontextmanager
    async def take(self):
        deadline = time.monotonic() + self.wait_s
        while self.busy >= self.limit:
            if time.monotonic() >= deadline:
                raise BodiesBusy(f"{self.busy} request bodies are being read already, this server's limit "
                                 f"(--max-concurrent-bodies), for {self.wait_s:g} s; try again shortly")
            await asyncio.sleep(0.05)
        self.busy += 1
        try:
            yield
        finally:
            self.busy -= 1


def limited(request: Request, limit: int, timeout_s: float) -> Request:
    """The same request, whose body stream raises BodyTooLarge once more than `limit` bytes arrive
    (bodies sent without a Content-Length are stopped too) and BodyTooSlow when the next part of the
    body takes longer than `timeout_s`."""
    received = 0

    async def receive():
        nonlocal received
        try:
            message = await asyncio.wait_for(request.receive(), timeout_s)
        except asyncio.TimeoutError:
            raise BodyTooSlow from None
        if message.get("type") == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise BodyTooLarge
        return message

    return Request(request.scope, receive)


def parse_json(raw: bytes, max_values: int | None = None):
    """Parse a JSON body; ValueError (with the cause) for invalid or too deeply nested JSON, and for
    a string holding a lone UTF-16 surrogate ("\\ud800": valid JSON, but not a character; no
    tokenizer, file name or UTF-8 encoder takes it). `max_values` bounds the arrays, objects and
    their items (counted before parsing, from the bytes that open or separate them; those inside
    strings count too, so the bound must leave room for the longest texts): a parsed value costs
    up to ~25 times its bytes ("{}," is a 64-byte dict), so a large body of small values would cost
    far more memory than its size, while its strings (base64 media) cost about their size."""
    if max_values is not None and sum(map(raw.count, (b"[", b"{", b","))) > max_values:
        raise TooManyValues(f"the body holds more than {max_values} JSON values (arrays, objects and their items)")
    try:
        data = json.loads(raw)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str) and not item.isascii() and _SURROGATE.search(item):
            raise ValueError(f"a string holds a lone UTF-16 surrogate ({item[:40]!r}), which is not a character")
    return data


def content_length(request: Request) -> int | None:
    try:
        return int(request.headers["content-length"])
    except (KeyError, ValueError):
        return None


def as_text(value: str) -> str:
    """`value` with each lone UTF-16 surrogate as U+FFFD: text a UTF-8 response can carry (a
    multipart field, file name or path decoded from bytes that were not UTF-8 may hold them)."""
    return value if value.isascii() else _SURROGATE.sub("\ufffd", value)


def validation_errors(errors: list[dict]) -> list[dict]:
    """pydantic's errors as a JSON response can carry them: type, loc, msg and the input when it is
    a short scalar. The input pydantic keeps may be the whole body (a missing field's), a float
    that JSON has no spelling for (NaN, Infinity) or a string holding lone surrogates: echoed
    as they are, the first costs the body's size again and the others fail to render (a 500)."""
    shown = []
    for error in errors:
        loc = [as_text(p) if isinstance(p, str) else p for p in error.get("loc", ())]
        item = {"type": error.get("type"), "loc": loc, "msg": as_text(str(error.get("msg", "")))}
        value = error.get("input")
        if isinstance(value, str):
            item["input"] = as_text(value[:_SHOWN_INPUT_CHARS])
        elif value is None or isinstance(value, (bool, int)) or (isinstance(value, float) and math.isfinite(value)):
            item["input"] = value
        shown.append(item)
    return shown


def detail_error(status: int, detail, headers: dict | None = None) -> JSONResponse:
    """An error answered as FastAPI answers its own: `{"detail": detail}` with `status` (a text
    detail with lone surrogates, which UTF-8 cannot carry, has them as U+FFFD)."""
    return JSONResponse({"detail": as_text(detail) if isinstance(detail, str) else detail}, status_code=status,
                        headers=headers)
