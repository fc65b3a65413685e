"""``create_app(config) -> FastAPI``: AUTOMATIC1111's ``/sdapi/v1`` API over the engine, and
the web page (``static/``, mounted at ``/`` after the API).

A thin shell (docs/server.md): requests are translated (:mod:`noisecraft.server.a1111`),
queued to the device's worker (:mod:`noisecraft.server.jobs`), run by the engine
(:class:`noisecraft.api.Pipeline`) and saved (:mod:`noisecraft.server.outputs`). A user's
mistake is the engine's one-line :class:`~noisecraft.errors.NoisecraftError`, answered 422
as ``{"error": <kind>, "detail": <message>}``; an image over the byte limit 413; a full
queue 429 with ``Retry-After``. The OpenAPI schema is at ``/openapi.json``, its page at
``/docs``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

from noisecraft._version import __version__
from noisecraft.errors import NoisecraftError
from noisecraft.server import routes_generate, routes_info
from noisecraft.server.config import ServerConfig
from noisecraft.server.images import ImageTooLargeError
from noisecraft.server.jobs import QueueFullError
from noisecraft.server.security import AuthMiddleware, BodyLimitMiddleware, BodyTooLarge
from noisecraft.server.state import ServerState

#: The web page's files (written by the web page's own module; index.html at least).
STATIC_DIR = Path(__file__).resolve().parent / "static"


def _error(kind: str, message: str, status: int, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": kind, "detail": message}, status_code=status, headers=headers)


async def _noisecraft_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, NoisecraftError)
    if isinstance(exc, QueueFullError):
        return _error(
            "QueueFullError", str(exc), 429, headers={"Retry-After": str(exc.retry_after)}
        )
    status = 413 if isinstance(exc, ImageTooLargeError) else 422
    return _error(type(exc).__name__, str(exc), status)


async def _body_too_large(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, BodyTooLarge)
    return _error("BodyTooLarge", str(exc.detail), 413)


def create_app(config: ServerConfig | None = None) -> FastAPI:
    """The server's ASGI app for ``config`` (default: :class:`ServerConfig`'s defaults).
    The model is loaded by the first job (at start-up with ``preload``); the worker stops
    when the app shuts down."""
    config = config or ServerConfig()
    state = ServerState.create(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if config.preload:
            state.jobs.submit("load model", lambda job: state.host.use())
        try:
            yield
        finally:
            state.jobs.stop()

    app = FastAPI(
        title="noisecraft",
        version=__version__,
        description="AUTOMATIC1111-compatible /sdapi/v1 API over noisecraft (docs/server.md)",
        lifespan=lifespan,
    )
    app.state.noisecraft = state
    app.add_exception_handler(NoisecraftError, _noisecraft_error)
    app.add_exception_handler(BodyTooLarge, _body_too_large)
    app.include_router(routes_generate.router)
    app.include_router(routes_info.router)
    if config.cors_allow_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.cors_allow_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
            allow_credentials=config.auth_required,
        )
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes)
    if config.auth_required:  # outermost: nothing runs for a request without credentials
        app.add_middleware(AuthMiddleware, users=config.api_auth, token=config.api_token)
    app.mount("/", StaticFiles(directory=STATIC_DIR, html=True), name="static")
    return app


__all__ = ["STATIC_DIR", "create_app"]
