"""The server's settings: one frozen :class:`ServerConfig`, checked when it is made.

Every limit a request meets is here, next to the engine's own
(:class:`~noisecraft.api.limits.Limits`: pixels per image, images per call, memory), so the
command line (``noisecraft serve``), tests and embedding applications build the same object.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from noisecraft.api.limits import DEFAULT_MAX_PIXELS
from noisecraft.api.shipped import DEFAULT_MODEL
from noisecraft.errors import ConfigError

#: A1111's largest steps slider value.
DEFAULT_MAX_STEPS = 150
#: Images per request (batch_size x n_iter); A1111's sliders allow 8 x 100, far more than a
#: shared server should take in one request.
DEFAULT_MAX_IMAGES = 16
#: Bytes of one request body (a few base64 images of the largest size fit).
DEFAULT_MAX_BODY_BYTES = 64 * 2**20
#: Decoded bytes of one base64 image (init image, mask, PNG of png-info).
DEFAULT_MAX_IMAGE_BYTES = 16 * 2**20
#: Requests waiting behind the one that runs.
DEFAULT_QUEUE_SIZE = 8


@dataclass(frozen=True)
class ServerConfig:
    """What ``noisecraft serve`` runs (docs/server.md):

    * ``model``: the model loaded first (a shipped name or a name found in ``models_dir``);
      ``models_dir``: a folder of checkpoint files / diffusers folders offered by name;
    * ``host`` / ``port``: where to listen (``127.0.0.1``: this machine only);
    * ``outputs_dir``: every image made is also written there as a PNG with its parameters;
    * ``device``, ``lora_dir``, ``embedding_dir``, ``controlnet_dir``: the loading options
      of every model (ControlNets are offered by name: the shipped ones and this folder's);
    * ``api_auth``: ``(user, password)`` pairs for HTTP basic auth; ``api_token``: a bearer
      token accepted as well (either turns authentication on);
    * ``cors_allow_origins``: origins allowed cross-site (none: CORS off);
    * limits: ``max_pixels`` per image, ``max_images`` per request, ``max_steps``,
      ``max_body_bytes`` per request, ``max_image_bytes`` per decoded image, ``queue_size``
      requests waiting (a full queue answers 429);
    * ``preload``: load the model when the server starts (else on the first request).
    """

    model: str = DEFAULT_MODEL
    models_dir: Path | None = None
    host: str = "127.0.0.1"
    port: int = 7860
    outputs_dir: Path = Path("outputs/server")
    device: str = "cpu"
    lora_dir: Path | None = None
    embedding_dir: Path | None = None
    controlnet_dir: Path | None = None
    api_auth: tuple[tuple[str, str], ...] = ()
    api_token: str | None = None
    cors_allow_origins: tuple[str, ...] = ()
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_images: int = DEFAULT_MAX_IMAGES
    max_steps: int = DEFAULT_MAX_STEPS
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    queue_size: int = DEFAULT_QUEUE_SIZE
    preload: bool = False

    def __post_init__(self) -> None:
        for name in ("models_dir", "lora_dir", "embedding_dir", "controlnet_dir"):
            value = getattr(self, name)
            if value is None:
                continue
            object.__setattr__(self, name, Path(value))
            if not Path(value).is_dir():
                raise ConfigError(f"@{name} {value} is not a folder", settings=[name])
        object.__setattr__(self, "outputs_dir", Path(self.outputs_dir))
        if isinstance(self.api_auth, str):
            object.__setattr__(self, "api_auth", parse_api_auth(self.api_auth))
        object.__setattr__(self, "api_auth", tuple(tuple(p) for p in self.api_auth))
        object.__setattr__(self, "cors_allow_origins", tuple(self.cors_allow_origins))
        if self.api_token is not None and not self.api_token:
            raise ConfigError("@api_token must not be empty", settings=["api_token"])
        for name in (
            "max_pixels",
            "max_images",
            "max_steps",
            "max_body_bytes",
            "max_image_bytes",
            "queue_size",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(
                    f"@{name} must be a positive integer, got {value!r}", settings=[name]
                )
        if isinstance(self.port, bool) or not isinstance(self.port, int):
            raise ConfigError(f"@port must be 0..65535, got {self.port!r}", settings=["port"])
        if self.port < 0 or self.port > 65535:
            raise ConfigError(f"@port must be 0..65535, got {self.port!r}", settings=["port"])

    @property
    def auth_required(self) -> bool:
        return bool(self.api_auth) or self.api_token is not None


def parse_api_auth(text: str) -> tuple[tuple[str, str], ...]:
    """A1111's ``--api-auth``: ``user:pass`` pairs separated by commas."""
    pairs = []
    for item in text.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise ConfigError(
                f"@api_auth must be user:password (comma-separated pairs), got {item!r}",
                settings=["api_auth"],
            )
        pairs.append((user, password))
    return tuple(pairs)


__all__ = ["ServerConfig", "parse_api_auth"]
