"""``serve_in_thread(config)``: a real server (uvicorn) on a free loopback port, for tests
and for embedding; shut down cleanly when the ``with`` block ends."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import uvicorn

from noisecraft.server.app import create_app
from noisecraft.server.config import ServerConfig


@contextmanager
def serve_in_thread(config: ServerConfig | None = None, timeout: float = 30.0) -> Iterator[str]:
    """Run the app of ``config`` on 127.0.0.1 and a free port in a thread; yields its base
    URL (``http://127.0.0.1:PORT``). ``config.host`` / ``port`` are not used."""
    config = replace(config or ServerConfig(), host="127.0.0.1", port=0)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(config), log_level="warning", lifespan="on"))
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="noisecraft-server", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()


__all__ = ["serve_in_thread"]
