"""Bearer tokens (FERVID_API_TOKENS). Without tokens the server is open, so it may only listen on loopback."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import socket

from fervid.errors import FervidError


class Unauthorized(FervidError):
    pass


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        addrs = {a[4][0] for a in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)


def check_listen(host: str, tokens: tuple[str, ...]) -> None:
    if not tokens and not is_loopback(host):
        raise FervidError(f"refusing to listen on {host} without API tokens: set FERVID_API_TOKENS (comma-separated) "
                          "or listen on 127.0.0.1")  # fmt: skip


def caller(authorization: str | None, tokens: tuple[str, ...]) -> str:
    """Who is calling, as a hash of their token (scopes idempotency keys); raises Unauthorized."""
    if not tokens:
        return "open"
    if not authorization:
        raise Unauthorized("missing bearer token: send 'Authorization: Bearer TOKEN'")
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    # Every token is compared (in constant time each), so the answer's timing does not say which one was close.
    ok = [hmac.compare_digest(token.encode(), t.encode()) for t in tokens]
    if scheme.lower() != "bearer" or not any(ok):
        raise Unauthorized("invalid bearer token")
    return hashlib.sha256(token.encode()).hexdigest()[:32]
