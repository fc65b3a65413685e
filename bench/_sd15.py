"""Stable Diffusion 1.5-architecture models with random weights, in noisecraft AND in diffusers.

Shared model construction for the bench scripts (``bench/sd_speed.py``; ``bench/memory.py``
may import it). One noisecraft :class:`~noisecraft.models.latent_diffusion.LatentDiffusion` is built
with random weights; the diffusers / transformers modules are built from ITS weights through
the converters, so both sides compute the same function:

* U-Net: our names are the LDM ``model.diffusion_model.*`` names;
  ``noisecraft.io.formats.unet_keys.unet_to_diffusers`` renames them to
  ``UNet2DConditionModel``'s (the rules of diffusers' ``convert_ldm_unet_checkpoint``) and
  ``unet_config_to_diffusers`` writes its config.
* VAE: ``AutoencoderKL.to_diffusers_state_dict`` (LDM ``first_stage_model.*`` names to diffusers').
* Text encoder: our names ARE transformers 5's ``CLIPTextModel`` names (no ``text_model.``).
* Tokenizer: the shipped OpenAI CLIP vocabulary, written as ``vocab.json`` / ``merges.txt`` for
  ``transformers.CLIPTokenizer``.

The diffusers modules are built on the meta device and take our tensors with
``load_state_dict(assign=True)``: renaming never copies a tensor, so both sides SHARE one copy
of the weights (and a peak-RSS comparison is not skewed by a second copy).

Random weights: PyTorch's default initialisation, except that the layers our models
zero-initialise (the last conv of each residual block, attention output projections, the
U-Net's output conv) get the default initialisation of their kind too, so no block is the
identity and outputs are non-trivial (a zero output would hide differences).

``tiny=True`` gives the same layouts at a fraction of the width (U-Net model_channels 64, VAE
base 32, a 2-layer 256-wide text encoder) for developing the bench on a loaded machine.

diffusers and transformers are bench / test-only dependencies (the ``test`` extra).
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from noisecraft.diffusion import NoiseSchedule
from noisecraft.io.formats.diffusers_folder import vae_config_to_diffusers
from noisecraft.io.formats.unet_keys import unet_config_to_diffusers, unet_to_diffusers
from noisecraft.models.latent_diffusion import LatentDiffusion
from noisecraft.models.text_encoder import CLIPTextEncoder, TextEncoderConfig
from noisecraft.models.tokenizer import CLIPTokenizer, write_vocab_files
from noisecraft.models.unet import UNet, UNetConfig
from noisecraft.models.vae import AutoencoderKL, VAEConfig

#: Stable Diffusion 1.5's U-Net (``v1-inference.yaml``'s ``unet_config``): 859.5 M parameters.
SD15_UNET = UNetConfig.sd15()
SD15_VAE = VAEConfig.sd()
SD15_TEXT = TextEncoderConfig.sd15()


@dataclass(frozen=True)
class Configs:
    """The three component configs of one bench model."""

    unet: UNetConfig
    vae: VAEConfig
    text: TextEncoderConfig


def configs(tiny: bool = False) -> Configs:
    """SD 1.5's configs, or (``tiny``) the same layouts, narrower, for development."""
    if not tiny:
        return Configs(SD15_UNET, SD15_VAE, SD15_TEXT)
    return Configs(
        dataclasses.replace(SD15_UNET, model_channels=64, context_dim=256),
        dataclasses.replace(SD15_VAE, base_channels=32),
        dataclasses.replace(SD15_TEXT, width=256, layers=2, heads=4, intermediate_size=1024),
    )


@torch.no_grad()
def randomize_zero_layers(module: nn.Module) -> nn.Module:
    """Give every all-zero weight of ``module`` (zero-initialised output layers) PyTorch's
    default initialisation for its kind (``kaiming_uniform_(a=sqrt(5))``, as ``nn.Linear`` /
    ``nn.Conv2d``), and its bias the matching ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``."""
    for sub in module.modules():
        weight = getattr(sub, "weight", None)
        if not isinstance(sub, (nn.Linear, nn.Conv1d, nn.Conv2d)) or weight is None:
            continue
        if weight.any():
            continue
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        if sub.bias is not None:
            fan_in = weight[0].numel()
            nn.init.uniform_(sub.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
    return module


def _ready(module: nn.Module) -> nn.Module:
    return randomize_zero_layers(module).eval().requires_grad_(False)


def build_unet(config: UNetConfig, seed: int = 0) -> UNet:
    """Our U-Net with random weights (see the module docstring)."""
    torch.manual_seed(seed)
    return _ready(UNet(config))


def build_vae(config: VAEConfig, seed: int = 1) -> AutoencoderKL:
    """Our VAE with random weights."""
    torch.manual_seed(seed)
    return _ready(AutoencoderKL(config))


def build_text_encoder(config: TextEncoderConfig, seed: int = 2) -> CLIPTextEncoder:
    """Our CLIP text encoder with OpenAI CLIP's random initialisation."""
    torch.manual_seed(seed)
    return _ready(CLIPTextEncoder(config))


def build_ours(
    tiny: bool = False,
    *,
    parts: tuple[str, ...] = ("unet", "vae", "text"),
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[str, nn.Module]:
    """The requested parts (``unet``, ``vae``, ``text``) of our model, on ``device`` in
    ``dtype``."""
    c = configs(tiny)
    makers = {
        "unet": lambda: build_unet(c.unet),
        "vae": lambda: build_vae(c.vae),
        "text": lambda: build_text_encoder(c.text),
    }
    return {name: makers[name]().to(device=device, dtype=dtype) for name in parts}


def latent_diffusion(unet: UNet, vae: AutoencoderKL, text: CLIPTextEncoder) -> LatentDiffusion:
    """Our three parts as one text-to-image model (SD's schedule, the shipped CLIP vocab)."""
    return LatentDiffusion(
        unet=unet,
        vae=vae,
        text_encoder=text,
        tokenizer=CLIPTokenizer.default(),
        schedule=NoiseSchedule.scaled_linear(),
        image_size=512,
    )


# ---------------------------------------------------------------------------- diffusers side


def _assign(factory: Any, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Build ``factory()`` on the meta device and assign ``state_dict``'s tensors (shared,
    not copied). Falls back to a normal construction when the module keeps non-persistent
    buffers, which the meta device would leave without values."""
    with torch.device("meta"):
        module = factory()
    if any(b.is_meta for b in module.buffers()):
        module = factory()
    module.load_state_dict(state_dict, strict=True, assign=True)
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left on the meta device: {left[:3]}")
    # buffers of a normal construction (e.g. CLIP's position ids) follow the weights' device;
    # the assigned weights are already there, so .to() leaves them shared
    module.to(next(iter(state_dict.values())).device)
    return module.eval().requires_grad_(False)


def diffusers_unet(unet: UNet) -> nn.Module:
    """diffusers' ``UNet2DConditionModel`` sharing ``unet``'s weights."""
    from diffusers import UNet2DConditionModel

    cfg = unet_config_to_diffusers(unet.config)
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    sd = unet_to_diffusers(unet.state_dict(), unet.config)
    return _assign(lambda: UNet2DConditionModel(**cfg), sd)


def build_controlnet(unet: UNet, seed: int = 3) -> nn.Module:
    """A ControlNet for ``unet`` (its encoder copied, as training starts) with the zero
    convolutions and the hint encoder's last conv given random weights, so its residuals
    are not zero."""
    from noisecraft.models.controlnet import ControlNet

    torch.manual_seed(seed)
    return _ready(ControlNet.from_unet(unet))


def diffusers_controlnet(controlnet: nn.Module) -> nn.Module:
    """diffusers' ``ControlNetModel`` with ``controlnet``'s weights (through a diffusers
    folder written by our converter; a second copy of the weights)."""
    import tempfile

    from diffusers import ControlNetModel

    from noisecraft.io.controlnet_files import save_controlnet

    with tempfile.TemporaryDirectory() as tmp:
        save_controlnet(controlnet, f"{tmp}/cn", format="diffusers")
        model = ControlNetModel.from_pretrained(f"{tmp}/cn")
    dtype = next(controlnet.parameters()).dtype
    device = next(controlnet.parameters()).device
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def diffusers_vae(vae: AutoencoderKL) -> nn.Module:
    """diffusers' ``AutoencoderKL`` sharing ``vae``'s weights."""
    from diffusers import AutoencoderKL as DAutoencoderKL

    cfg = vae_config_to_diffusers(vae.config, sample_size=512)
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    return _assign(lambda: DAutoencoderKL(**cfg), vae.to_diffusers_state_dict())


def transformers_text_encoder(text: CLIPTextEncoder, tokenizer: CLIPTokenizer) -> nn.Module:
    """transformers' ``CLIPTextModel`` sharing ``text``'s weights (same names)."""
    import transformers

    c = text.config
    config = transformers.CLIPTextConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.width,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.layers,
        num_attention_heads=c.heads,
        max_position_embeddings=c.max_positions,
        hidden_act=c.activation,
        layer_norm_eps=c.layer_norm_eps,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return _assign(lambda: transformers.CLIPTextModel(config), text.state_dict())


def transformers_tokenizer(tokenizer: CLIPTokenizer) -> Any:
    """transformers' ``CLIPTokenizer`` with ``tokenizer``'s vocabulary and merges."""
    import transformers

    with tempfile.TemporaryDirectory() as folder:
        write_vocab_files(tokenizer, folder)
        return transformers.CLIPTokenizer.from_pretrained(folder, model_max_length=77)


def diffusers_pipeline(
    model: LatentDiffusion,
    scheduler: str = "DPMSolverMultistepScheduler",
    scheduler_config: dict[str, Any] | None = None,
    parts: dict[str, nn.Module] | None = None,
) -> Any:
    """diffusers' ``StableDiffusionPipeline`` built from ``model``'s modules (shared weights).

    ``parts`` may hold already built ``unet`` / ``vae`` / ``text`` diffusers modules.
    """
    import diffusers

    from noisecraft.pipelines.diffusers_schedulers import SD15_SCHEDULER_CONFIG

    parts = dict(parts or {})
    unet = parts.get("unet") or diffusers_unet(model.unet)
    vae = parts.get("vae") or diffusers_vae(model.vae)
    text = parts.get("text") or transformers_text_encoder(model.text_encoder, model.tokenizer)
    config = dict(scheduler_config or SD15_SCHEDULER_CONFIG)
    sched = getattr(diffusers, scheduler).from_config(config)
    pipe = diffusers.StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text,
        tokenizer=transformers_tokenizer(model.tokenizer),
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
