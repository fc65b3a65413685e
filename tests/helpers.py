"""Helpers shared by the test modules (import as ``from helpers import jitter``)."""

from __future__ import annotations

import torch


def jitter(
    module: torch.nn.Module, seed: int = 0, std: float = 0.05, *, freeze: bool = True
) -> torch.nn.Module:
    """Add ``std``-scaled Gaussian noise to every parameter (seeded), so zero-initialised
    layers (output convs, biases) take part and swapped or miswired weights show in outputs.
    ``freeze``: return the module in eval mode without gradients (parity tests)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return module.eval().requires_grad_(False) if freeze else module


def narrow_sd15_model(seed: int = 0, image_size: int = 64):
    """SD 1.5's layout (U-Net levels, 16 cross-attention modules with 8 heads, SD's VAE
    and CLIP text encoder shapes) made narrow, with random weights: for shape and format
    checks of what runs on SD 1.5, fast."""
    import dataclasses

    from noisecraft.diffusion import NoiseSchedule
    from noisecraft.models.latent_diffusion import LatentDiffusion
    from noisecraft.models.text_encoder import CLIPTextEncoder, TextEncoderConfig
    from noisecraft.models.tokenizer import CLIPTokenizer
    from noisecraft.models.unet import UNet, UNetConfig
    from noisecraft.models.vae import AutoencoderKL, VAEConfig

    torch.manual_seed(seed)
    unet = UNet(dataclasses.replace(UNetConfig.sd15(), model_channels=32, context_dim=32))
    vae = AutoencoderKL(dataclasses.replace(VAEConfig.sd(), base_channels=32))
    te = CLIPTextEncoder(
        dataclasses.replace(
            TextEncoderConfig.sd15(), width=32, layers=1, heads=2, intermediate_size=64
        )
    )
    return LatentDiffusion(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=te.eval(),
        tokenizer=CLIPTokenizer.default(),
        schedule=NoiseSchedule.scaled_linear(),
        image_size=image_size,
    )


#: The tiny class-conditional recipe the CLI and training tests train (sklearn digits, 8x8).
TINY_RECIPE = {
    "data": {"name": "digits", "image_size": 8, "limit": 128},
    "model": {
        "in_channels": 1,
        "out_channels": 1,
        "model_channels": 8,
        "channel_mult": [1, 2],
        "num_res_blocks": 1,
        "attention_levels": [1],
        "num_heads": 2,
        "num_classes": 10,
        "norm_groups": 4,
    },
    "diffusion": {"num_steps": 100},
    "train": {"batch_size": 16, "max_steps": 3, "warmup_steps": 1},
    "run": {"sample_every": 0, "progress": False},
}


def tiny_recipe(run_dir, **sections: dict) -> str:
    """:data:`TINY_RECIPE` as TOML text with ``run.dir = run_dir``; each keyword (a section
    name) updates that section's keys."""
    import json

    lines = []
    for name, base in TINY_RECIPE.items():
        values = {**base, **sections.get(name, {})}
        if name == "run":
            values = {"dir": str(run_dir), **values}
        lines.append(f"[{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"
