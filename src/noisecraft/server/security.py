"""Authentication and the request-body limit, as plain ASGI middleware (before any route).

* ``api_auth`` (A1111's ``--api-auth user:pass[,user2:pass2]``): HTTP basic; ``api_token``:
  ``Authorization: Bearer <token>`` as well. With either, every path (API, docs, web page)
  needs it; a request without answers 401 with ``WWW-Authenticate: Basic``. Credentials are
  compared in constant time.
* ``max_body_bytes``: a body whose ``Content-Length`` is over it answers 413 before it is
  read; a chunked body is counted as it arrives and cut off with 413 at the limit.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.exceptions import HTTPException

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


async def _answer(
    send: Send, status: int, message: str, headers: list[tuple[bytes, bytes]] = ()
) -> None:
    kind = {401: "Unauthorized", 413: "BodyTooLarge"}.get(status, "HTTPException")
    body = json.dumps({"error": kind, "detail": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value
    return None


def credentials_ok(
    authorization: bytes | None, users: tuple[tuple[str, str], ...], token: str | None
) -> bool:
    """Whether an ``Authorization`` header carries one of ``users`` (basic) or ``token``
    (bearer)."""
    if authorization is None:
        return False
    scheme, _, value = authorization.decode("latin-1").partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer" and token is not None:
        return hmac.compare_digest(value.encode(), token.encode())
    if scheme.lower() != "basic" or not users:
        return False
    try:
        user, sep, password = base64.b64decode(value, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return False
    if not sep:
        return False
    ok = False
    for u, p in users:  # no early exit: the time does not tell which user matched
        ok |= hmac.compare_digest(user.encode(), u.encode()) & hmac.compare_digest(
            password.encode(), p.encode()
        )
    return ok


class AuthMiddleware:
    """HTTP basic / bearer authentication for every HTTP request (module docstring)."""

    def __init__(self, app: ASGIApp, users: tuple[tuple[str, str], ...], token: str | None):
        self.app, self.users, self.token = app, users, token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not credentials_ok(
            _header(scope, b"authorization"), self.users, self.token
        ):
            await _answer(
                send,
                401,
                "authentication needed: HTTP basic (user:password) or a bearer token",
                [(b"www-authenticate", b'Basic realm="noisecraft"')],
            )
            return
        await self.app(scope, receive, send)


class BodyTooLarge(HTTPException):  # noqa: N818
    """Raised while the body is read (a route answers it as 413)."""


class BodyLimitMiddleware:
    """413 for a request body over ``max_bytes`` (module docstring)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _message(self) -> str:
        return f"the request body is over {self.max_bytes:,} bytes; send less (smaller images)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _header(scope, b"content-length")
        if length is not None:
            try:
                too_large = int(length) > self.max_bytes
            except ValueError:
                too_large = False
            if too_large:
                await _answer(send, 413, self._message())
                return
        seen = 0
        started = False

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(413, self._message())
            return message

        async def tracked_send(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted, tracked_send)
        except BodyTooLarge:
            if not started:
                await _answer(send, 413, self._message())


__all__ = ["AuthMiddleware", "BodyLimitMiddleware", "credentials_ok"]
