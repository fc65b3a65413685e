"""The HTTP server: AUTOMATIC1111's ``/sdapi/v1`` API (and the web page) over the public API
(docs/server.md). ``noisecraft serve`` runs it; :func:`create_app` builds the ASGI app;
:func:`noisecraft.server.testing.serve_in_thread` runs one in a thread.

Needs the ``server`` extra (FastAPI, uvicorn): ``pip install noisecraft[server]``.
"""

from noisecraft.server.app import create_app
from noisecraft.server.config import ServerConfig

__all__ = ["ServerConfig", "create_app"]
