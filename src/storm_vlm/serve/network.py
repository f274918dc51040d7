"""Where a server listens: refuse a port that is taken (one clear message) and warn when the
address is reachable from other machines (neither server has authentication)."""

from __future__ import annotations

import ipaddress
import socket
import sys

from storm_vlm.errors import StormError
from storm_vlm.utils import check_int

__all__ = ["check_listen", "is_loopback", "warn_if_public"]


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


def warn_if_public(host: str, what: str) -> None:
    if not is_loopback(host):
        print(f"warning: {what} listens on {host}: anyone who can reach this host can use it "
              "(there is no authentication)", file=sys.stderr)
