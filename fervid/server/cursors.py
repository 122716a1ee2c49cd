"""Opaque page cursors: a position signed with HMAC-SHA256, bound to the query it pages, so that a client can
neither forge one nor carry it to another job or filter."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os

from fervid.errors import FervidError


class BadCursor(FervidError):
    pass


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def _unb64(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


class Cursors:
    def __init__(self, secret: str = "") -> None:
        self._key = secret.encode() if secret else os.urandom(32)

    def _sign(self, body: str) -> str:
        return _b64(hmac.new(self._key, body.encode(), hashlib.sha256).digest()[:18])

    def dump(self, query: dict, position: list) -> str:
        body = _b64(json.dumps({"q": query, "p": position}, separators=(",", ":"), sort_keys=True).encode())
        return f"{body}.{self._sign(body)}"

    def load(self, cursor: str, query: dict) -> list:
        """The position in `cursor`, or BadCursor when it was not made here, or for another query."""
        body, _, sig = cursor.partition(".")
        if not sig or not hmac.compare_digest(sig, self._sign(body)):
            raise BadCursor("invalid cursor: it was not issued by this server (or has been altered)")
        try:
            doc = json.loads(_unb64(body))
        except (ValueError, binascii.Error):
            raise BadCursor("invalid cursor") from None
        if doc.get("q") != json.loads(json.dumps(query, sort_keys=True)):
            raise BadCursor("this cursor belongs to another query: keep the filters of the page it came from")
        return doc["p"]
