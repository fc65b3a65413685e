"""A Stable Diffusion text-to-image generation from three plain callables, driven by a
diffusers scheduler: the loop of diffusers' ``StableDiffusionPipeline`` (its classifier-free
guidance arithmetic, initial latents and decode) with the text encoder, U-Net and VAE decoder
replaced by any implementation of them, e.g. OpenVINO's compiled models (``bench/openvino.py``).

Given the pipeline's tokenizer, a scheduler configured as the pipeline's and the same seed,
the image is the pipeline's image up to the callables' rounding, so a backend's generation
can be compared pixel for pixel with diffusers' and ours.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Tensor = torch.Tensor


def hf_tokenize(tokenizer: Any) -> Callable[[list[str]], Tensor]:
    """A transformers tokenizer as a ``tokenize`` callable: each text padded to the
    tokenizer's length and truncated, as ``StableDiffusionPipeline.encode_prompt`` does."""

    def tokenize(texts: list[str]) -> Tensor:
        return tokenizer(
            texts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    return tokenize


def generate_with_scheduler(
    encode: Callable[[Tensor], Tensor],
    unet: Callable[[Tensor, Tensor, Tensor], Tensor],
    decode: Callable[[Tensor], Tensor],
    *,
    tokenize: Callable[[list[str]], Tensor],
    scheduler: Any,
    scaling_factor: float,
    prompt: str,
    size: int,
    steps: int,
    seed: int,
    guidance: float = 7.5,
    latent_channels: int = 4,
) -> Tensor:
    """One ``size``² image of ``prompt`` (pixels in [0, 1], shape (1, 3, size, size)).

    ``tokenize(texts)``: token ids, (len(texts), 77) (:func:`hf_tokenize` of the pipeline's
    tokenizer, or our ``CLIPTokenizer``); ``encode(ids)``: (2, 77) token ids to (2, 77,
    context) hidden states, the negative prompt "" first (diffusers' CFG batch); ``unet(x, t,
    context)``: the noise prediction of a (2, C, size/8, size/8) batch, ``t`` a float32 (2,)
    tensor; ``decode(z)``: a (1, C, size/8, size/8) latent to an image in [-1, 1].
    ``scheduler``: a diffusers scheduler (its ``set_timesteps`` is called here, which resets
    its state). The initial latents are ``torch.randn`` of a CPU generator seeded ``seed``
    times ``init_noise_sigma``, as the pipeline draws them for one image; each step doubles
    the latents, guides ``uncond + guidance * (cond - uncond)`` and takes the scheduler's step.
    """
    context = encode(tokenize(["", prompt]))
    scheduler.set_timesteps(steps)
    shape = (1, latent_channels, size // 8, size // 8)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    latents = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        eps = unet(x, torch.full((2,), float(t)), context)
        uncond, cond = eps.chunk(2)
        eps = uncond + guidance * (cond - uncond)
        latents = scheduler.step(eps, t, latents, return_dict=False)[0]
    image = decode(latents / scaling_factor)
    return (image / 2 + 0.5).clamp(0, 1)
