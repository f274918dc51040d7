"""Where a server listens: refuse a port that is taken (one clear message), warn when the address
is reachable from other machines without a key, the API key of `storm-vlm serve` (`BearerKey`,
vLLM's --api-key), and its uvicorn settings (`uvicorn_config`: connection limits and timeouts)."""

from __future__ import annotations

import hmac
import ipaddress
import json
import socket
import sys

from storm_vlm.errors import StormError
from storm_vlm.utils import check_int

__all__ = ["check_listen", "is_loopback", "warn_if_public", "uvicorn_config", "BearerKey", "KEEP_ALIVE_S",
           "MAX_HEAD_BYTES"]

KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after this many seconds (uvicorn's default)
MAX_HEAD_BYTES = 16 * 1024  # a request head still incomplete past this many bytes is refused (400; h11's default)


def is_loopback(host: str) -> bool:
    """True for addresses only this host can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_listen(host: str, port: int) -> None:
    """StormError when `port` is out of range or `host:port` cannot be bound (taken, no such address)."""
    check_int("--port", port, 0, 65535, error=StormError)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StormError(f"cannot listen on {host}:{port}: unknown host ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # what uvicorn does too
        try:
            sock.bind(address)
        except OSError as exc:
            raise StormError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def warn_if_public(host: str, what: str, keyed: bool = False) -> None:
    if not is_loopback(host):
        how = ("with the API key (sent unencrypted: put TLS in front)" if keyed
               else "(there is no authentication: storm-vlm serve takes --api-key)")
        print(f"warning: {what} listens on {host}: anyone who can reach this host can use it {how}", file=sys.stderr)


class BearerKey:
    """ASGI middleware: a request to a path under /v1 needs `Authorization: Bearer <key>`, as vLLM's
    --api-key asks; without it, 401 with an OpenAI error body (the official client raises
    AuthenticationError). /health, /docs and /openapi.json stay open, and CORS preflights pass.
    The key is compared in constant time."""

    def __init__(self, app, key: str):
        if not key:
            raise StormError("the API key must not be empty")
        self.app, self._expected = app, b"Bearer " + key.encode()

    async def __call__(self, scope, receive, send):
        if (scope["type"] == "http" and scope.get("method") != "OPTIONS"
                and (scope["path"] == "/v1" or scope["path"].startswith("/v1/"))):
            given = next((v for k, v in scope.get("headers", ()) if k == b"authorization"), b"")
            if not hmac.compare_digest(given, self._expected):
                body = json.dumps({"error": {"message": "a valid API key is needed: Authorization: Bearer <key>",
                                             "type": "invalid_request_error", "param": None,
                                             "code": "invalid_api_key"}}).encode()
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def _head_timeout_protocol(timeout_s: float):
    """uvicorn's h11 protocol, closing a connection whose request line and headers have not all
    arrived `timeout_s` after it opened or after its previous response (uvicorn has no such limit:
    a client sending half a header held its connection, a file descriptor and a place under
    --limit-concurrency, for ever)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadTimeoutProtocol(H11Protocol):
        _head_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._await_head()

        def on_response_complete(self) -> None:
            self._await_head()  # before super(): it may start the next (pipelined) request at once
            super().on_response_complete()

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and not self.cycle.response_complete:
                self._head_arrived()

        def handle_websocket_upgrade(self, event) -> None:
            self._head_arrived()  # the connection is the WebSocket protocol's now
            super().handle_websocket_upgrade(event)

        def connection_lost(self, exc) -> None:
            self._head_arrived()
            super().connection_lost(exc)

        def _await_head(self) -> None:
            self._head_arrived()
            self._head_timer = self.loop.call_later(timeout_s, self._head_timeout)

        def _head_arrived(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            if not self.transport.is_closing():
                self.transport.close()

    return HeadTimeoutProtocol


def uvicorn_config(app, host: str, port: int, *, header_timeout_s: float = 30.0,
                   limit_concurrency: int | None = 256, log_level: str = "info"):
    """The uvicorn.Config `storm-vlm serve` runs: h11 with a request-head timeout
    (`header_timeout_s`), a head still incomplete past MAX_HEAD_BYTES refused, idle keep-alive
    connections closed after KEEP_ALIVE_S, and at most `limit_concurrency` connections and requests
    at once (uvicorn answers 503 beyond)."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level=log_level,
                          http=_head_timeout_protocol(header_timeout_s), limit_concurrency=limit_concurrency,
                          timeout_keep_alive=KEEP_ALIVE_S, h11_max_incomplete_event_size=MAX_HEAD_BYTES)
