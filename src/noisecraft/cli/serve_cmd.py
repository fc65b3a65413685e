"""`noisecraft serve`: the HTTP server (AUTOMATIC1111's /sdapi/v1 API and the web page).

A thin shell: each option is a field of :class:`noisecraft.server.ServerConfig` of the same
name; the server itself is :mod:`noisecraft.server` (docs/server.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from noisecraft.cli import options as o
from noisecraft.errors import ConfigError


def serve_command(
    models_dir: Annotated[
        Path | None,
        typer.Option(metavar="DIR", help="folder of checkpoint files / diffusers folders"),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(help="the model loaded first, by name (default: mnist-text)"),
    ] = None,
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 7860,
    listen: Annotated[
        bool, typer.Option(help="bind 0.0.0.0 (every network interface), as A1111's --listen")
    ] = False,
    api_auth: Annotated[
        str | None,
        typer.Option(metavar="USER:PASS", help="HTTP basic auth (comma-separated pairs)"),
    ] = None,
    api_token: Annotated[
        str | None, typer.Option(help="accept this bearer token (Authorization: Bearer ...)")
    ] = None,
    cors_allow_origins: Annotated[
        str | None,
        typer.Option(metavar="ORIGINS", help="origins allowed cross-site, comma-separated"),
    ] = None,
    outputs_dir: Annotated[
        Path, typer.Option(metavar="DIR", help="every image is also saved here")
    ] = Path("outputs/server"),
    device: o.Device = "cpu",
    lora_dir: o.LoraDir = None,
    embedding_dir: o.EmbeddingDir = None,
    controlnet_dir: o.ControlnetDir = None,
    max_pixels: o.MaxPixels = None,
    max_images: Annotated[
        int | None, typer.Option(help="most images per request (default 16)")
    ] = None,
    max_steps: Annotated[int | None, typer.Option(help="most steps (default 150)")] = None,
    queue_size: Annotated[
        int | None, typer.Option(help="requests that may wait (default 8; more get 429)")
    ] = None,
) -> None:
    """Serve the AUTOMATIC1111-compatible HTTP API (/sdapi/v1, /docs) and the web page."""
    try:
        import uvicorn

        from noisecraft.server import ServerConfig, create_app
    except ImportError as e:
        raise ConfigError(
            f"the server needs the 'server' extra ({e.name} is missing): "
            "pip install 'noisecraft[server]'"
        ) from None
    from noisecraft.api.shipped import DEFAULT_MODEL

    if listen and host != "127.0.0.1":
        raise ConfigError("give --listen or --host, not both")
    limits = {
        k: v
        for k, v in (
            ("max_pixels", max_pixels),
            ("max_images", max_images),
            ("max_steps", max_steps),
            ("queue_size", queue_size),
        )
        if v is not None
    }
    config = ServerConfig(
        model=model or DEFAULT_MODEL,
        models_dir=models_dir,
        host="0.0.0.0" if listen else host,
        port=port,
        outputs_dir=outputs_dir,
        device=device,
        lora_dir=lora_dir,
        embedding_dir=embedding_dir,
        controlnet_dir=controlnet_dir,
        api_auth=api_auth or (),
        api_token=api_token,
        cors_allow_origins=tuple(
            s.strip() for s in (cors_allow_origins or "").split(",") if s.strip()
        ),
        preload=True,
        **limits,
    )
    app = create_app(config)
    shown = "localhost" if config.host == "127.0.0.1" else config.host
    typer.echo(f"noisecraft serve: http://{shown}:{config.port}/ (API docs: /docs)")
    uvicorn.run(app, host=config.host, port=config.port, log_level="info")
