"""The models that ship inside the package, by name.

``"mnist"`` is the class-conditional pixel model, ``"mnist-text"`` the mini Stable Diffusion
(README "The shipped ... model"); ``mnist-text`` also ships a TAESD-like tiny decoder
(configs/mnist_tiny_decoder.toml). A path that exists always wins over a shipped name.
"""

from __future__ import annotations

import os
from pathlib import Path

from noisecraft.errors import ConfigError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
SHIPPED_MODELS = {
    "mnist": ASSETS / "mnist.safetensors",  # class-conditional pixel model
    "mnist-text": ASSETS / "mnist_text.safetensors",  # text-to-image latent model (mini SD)
    "mnist-text-lcm": ASSETS / "mnist_text.safetensors",  # ... with its LCM student U-Net
}
#: The LCM student U-Net a shipped model name loads in place of its U-Net
#: (configs/mnist_text_lcm.toml; sampled with the LCM sampler, 4 steps, CFG 1).
SHIPPED_LCM_UNETS = {"mnist-text-lcm": ASSETS / "mnist_text_lcm_unet.safetensors"}
#: The tiny decoder fast decoding uses for a shipped model when none is given.
SHIPPED_TINY_DECODERS = {
    "mnist-text": ASSETS / "mnist_text_tiny_decoder.safetensors",
    "mnist-text-lcm": ASSETS / "mnist_text_tiny_decoder.safetensors",
}
#: LoRAs that ship with the package (``<lora:mnist_tiny>`` finds them without a LoRA folder;
#: a file of the same name in the user's folder wins).
SHIPPED_LORA_DIR = ASSETS / "loras"
#: ControlNets for the shipped text model (``mnist_canny``: configs/mnist_controlnet.toml),
#: found by name like the files of a ``controlnet_dir`` (a file of the same name there wins).
SHIPPED_CONTROLNET_DIR = ASSETS / "controlnets"
#: Textual-inversion embeddings for the shipped text model (``lucky``), known to it by name.
SHIPPED_EMBEDDING_DIR = ASSETS / "embeddings"
#: The model ``noisecraft.load()`` loads when given none.
DEFAULT_MODEL = "mnist-text"


def is_shipped(name: str | os.PathLike) -> bool:
    """Whether ``name`` names a shipped model (and no file or folder of that name exists)."""
    return str(name) in SHIPPED_MODELS and not Path(name).exists()


def resolve_model(name: str | os.PathLike) -> Path:
    """A checkpoint path, or the name of a shipped model (``mnist``, ``mnist-text``)."""
    if is_shipped(name):
        path = SHIPPED_MODELS[str(name)]
        if not path.is_file():
            raise ConfigError(
                f"the shipped model '{name}' is not in this install ({path} is missing); give "
                "@model the path of a model you trained (e.g. runs/mnist_text/model.safetensors)",
                settings=["model"],
            )
        return path
    return Path(name)


def shipped_lcm_unet(name: str | os.PathLike) -> Path | None:
    """The LCM student U-Net shipped for the model name ``name``, or None."""
    return SHIPPED_LCM_UNETS.get(str(name)) if is_shipped(name) else None


def shipped_tiny_decoder(name: str | os.PathLike) -> Path | None:
    """The tiny decoder shipped for the model ``name``, or None."""
    return SHIPPED_TINY_DECODERS.get(str(name)) if is_shipped(name) else None


__all__ = [
    "ASSETS",
    "DEFAULT_MODEL",
    "SHIPPED_CONTROLNET_DIR",
    "SHIPPED_EMBEDDING_DIR",
    "SHIPPED_LCM_UNETS",
    "SHIPPED_LORA_DIR",
    "SHIPPED_MODELS",
    "SHIPPED_TINY_DECODERS",
    "is_shipped",
    "resolve_model",
    "shipped_lcm_unet",
    "shipped_tiny_decoder",
]
