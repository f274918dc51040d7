"""Reading request bodies within bounds, for every route of the HTTP API.

`limited(request, limit, timeout_s)` wraps a request so its body stream stops with BodyTooLarge
past `limit` bytes (bodies without a Content-Length too) and with BodyTooSlow when the next part
of the body takes longer than `timeout_s`; `parse_json` refuses invalid and too deeply nested JSON.
"""

from __future__ import annotations

import asyncio
import json

from fastapi import Request

__all__ = ["BodyTooLarge", "BodyTooSlow", "content_length", "limited", "parse_json"]


class BodyTooLarge(Exception):
    pass


class BodyTooSlow(Exception):
    pass


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


def parse_json(raw: bytes):
    """Parse a JSON body; ValueError (with the cause) for invalid or too deeply nested JSON."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def content_length(request: Request) -> int | None:
    try:
        return int(request.headers["content-length"])
    except (KeyError, ValueError):
        return None
