"""A LoRA over a frozen text-to-image model that learns a style keyword.

LoRA (Hu et al. 2021, eq. 3) leaves every weight ``W`` of the base model alone and learns, for
chosen layers, a low-rank change ``delta W = (alpha / r) * up @ down`` (``up``: out x r, zero at
the start, so training starts from the base model exactly; ``down``: r x in, random). Here it
is trained the way kohya's scripts train a "style LoRA": a share ``lora.style_prob`` of the
images is drawn in a style (:mod:`noisecraft.training.styles`) and only their captions carry
the keyword, so the LoRA learns to draw the style when the prompt says the keyword and to
leave the base behaviour alone when it does not.

* The base (``lora.base``: a shipped name or a ``latent_diffusion`` file) is frozen and never
  a submodule of the trained module: the trainer's optimizer, EMA and checkpoint hold only
  the ``down`` / ``up`` matrices.
* The forward pass merges the deltas into the weights functionally
  (``torch.func.functional_call`` with ``W + delta W``): one code path for every layer kind
  (Linear, 1x1 and 3x3 Conv2d), and the same numbers the merged file gives at sampling time.
  (:func:`noisecraft.adapters.add_trainable_lora` adds the same deltas through forward hooks
  for training loops of one's own; hooks would follow the trainer's EMA copy to the live
  weights, a functional merge does not.)
* Latents of the plain and the styled images are encoded once with the base's VAE.
* The saved ``model.safetensors`` is the LoRA in kohya's layout
  (:func:`noisecraft.adapters.lora_files.write_kohya_lora`), which A1111, diffusers'
  ``load_lora_weights`` and ``noisecraft generate --lora`` read; its ``noisecraft`` metadata
  records the training step like every run's model file.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from noisecraft.adapters.lora_files import write_kohya_lora
from noisecraft.adapters.lora_keys import lora_targets
from noisecraft.adapters.lora_module import LoRAModule
from noisecraft.diffusion import ObjectiveConfig
from noisecraft.diffusion.timestep_sampling import make_timestep_sampler
from noisecraft.errors import ConfigError
from noisecraft.io.checkpoint import METADATA_KEY, CheckpointInfo
from noisecraft.io.native import load_latent_diffusion
from noisecraft.io.shipped import resolve_model
from noisecraft.models.latent_diffusion import LatentDiffusion
from noisecraft.pipelines.generate import generate
from noisecraft.training import captions
from noisecraft.training.config import ExperimentConfig
from noisecraft.training.data import ImageDataset, batch_indices
from noisecraft.training.styles import apply_style
from noisecraft.training.tasks.base import (
    Batch,
    CaptionedLatentLoss,
    TimestepSamplerState,
    grid_request,
)
from noisecraft.training.tasks.text_latent import TextConditionedUNet

#: The U-Net layers of ``layers = "attention"``: its transformer blocks (kohya's default).
ATTENTION_PARTS = (".transformer_blocks.", ".proj_in", ".proj_out")


def choose_targets(base: Any, layers: str, text_encoder: bool) -> dict[str, nn.Module]:
    """The layers the LoRA patches, by our key (``unet.<path>`` / ``text_encoder.<path>``)."""
    out = {}
    for key, module in lora_targets(base).items():
        if key.startswith("text_encoder."):
            if text_encoder and ".layers." in key:  # attention and MLP, not the embeddings
                out[key] = module
        elif layers == "all" or any(p in key for p in ATTENTION_PARTS):
            out[key] = module
    return out


class LoRANetwork(nn.Module):
    """Trainable ``down`` / ``up`` pairs over a frozen base (see the module docstring).

    ``forward(x, t, input_ids)`` is the base's forward with every target weight replaced by
    ``W + (alpha / r) * up @ down``. ParameterDict keys are the target keys with ``.`` -> ``:``.
    """

    def __init__(
        self, base: nn.Module, targets: dict[str, nn.Module], rank: int, alpha: float, seed: int
    ):
        super().__init__()
        object.__setattr__(self, "base", base)  # frozen, not a submodule: not trained or saved
        self.rank, self.alpha = rank, alpha
        self.down, self.up = nn.ParameterDict(), nn.ParameterDict()
        self.shapes: dict[str, tuple[int, ...]] = {}
        g = torch.Generator().manual_seed(seed)
        for key, module in targets.items():
            w = module.weight
            fan_in = math.prod(w.shape[1:])
            bound = 1.0 / math.sqrt(fan_in)  # kaiming-uniform(a=sqrt(5)), as PEFT and kohya
            down = (torch.rand(rank, *w.shape[1:], generator=g) * 2 - 1) * bound
            self.down[_pkey(key)] = nn.Parameter(down)
            self.up[_pkey(key)] = nn.Parameter(
                torch.zeros(w.shape[0], rank, *([1, 1] * (w.ndim == 4)))
            )
            self.shapes[key] = tuple(w.shape)

    def to_modules(self) -> dict[str, LoRAModule]:
        """Our key -> :class:`LoRAModule` (detached copies), for :func:`write_kohya_lora`."""
        return {
            key: LoRAModule(
                down=self.down[_pkey(key)].detach().clone(),
                up=self.up[_pkey(key)].detach().clone(),
                alpha=self.alpha,
            )
            for key in self.shapes
        }

    def merged_weights(self) -> dict[str, Tensor]:
        """``W + delta W`` of every target, differentiable in ``down`` / ``up``
        (:meth:`LoRAModule.delta`, the formula the loader merges with)."""
        params = dict(self.base.named_parameters())
        out = {}
        for key, shape in self.shapes.items():
            lora = LoRAModule(self.down[_pkey(key)], self.up[_pkey(key)], self.alpha)
            out[f"{key}.weight"] = params[f"{key}.weight"] + lora.delta(1.0, shape)
        return out

    def forward(self, x: Tensor, t: Tensor, input_ids: Tensor) -> Tensor:
        return torch.func.functional_call(self.base, self.merged_weights(), (x, t, input_ids))


def _pkey(key: str) -> str:
    return key.replace(".", ":")


class LoRATask(CaptionedLatentLoss, TimestepSamplerState):
    """Train a style LoRA on a frozen text-to-image model (see the module docstring)."""

    name = "lora"
    resume_sections = ("lora",)
    log_keys: tuple[str, ...] = ()

    def __init__(self, cfg: ExperimentConfig, dataset: ImageDataset, device: torch.device):
        self.cfg, self.dataset, self.device = cfg, dataset, device
        lc = cfg.lora
        if dataset.labels is None:
            raise ConfigError(
                "the lora task makes captions from class labels; use a labelled dataset and "
                "set data.class_conditional = true"
            )
        self.base_model: LatentDiffusion = load_latent_diffusion(resolve_model(lc.base))
        m = self.base_model
        if m.text_encoder is None:
            raise ConfigError(f"lora.base = {lc.base!r} has no text encoder; give a text model")
        pair = TextConditionedUNet(m.unet, m.text_encoder).requires_grad_(False).eval()
        targets = choose_targets(pair, lc.layers, lc.text_encoder)
        self.model = LoRANetwork(pair, targets, lc.rank, lc.alpha, cfg.train.seed)
        self.schedule = m.schedule
        self.objective = ObjectiveConfig(
            prediction=m.prediction,
            weighting="min_snr" if lc.min_snr_gamma > 0 else "none",
            min_snr_gamma=lc.min_snr_gamma or 5.0,
        )
        self.t_sampler = make_timestep_sampler("uniform", len(self.schedule.betas))
        self.latents = self._encode(dataset.images)
        self.styled_latents = self._encode(apply_style(lc.style, dataset.images))
        self._build_captions()

    @torch.no_grad()
    def _encode(self, images: Tensor) -> Tensor:
        vae = self.base_model.vae
        if images.shape[1] != vae.config.in_channels:
            raise ConfigError(
                f"the base model's VAE takes {vae.config.in_channels}-channel images but the "
                f"data has {images.shape[1]}; set data.channels = {vae.config.in_channels}"
            )
        return torch.cat([vae.encode_latents(b, sample=False) for b in images.split(256)])

    def _build_captions(self) -> None:
        """Rows: ``""``, then per class and template: the plain caption, the keyword before
        it and the keyword after it (``"tiny, a handwritten 7"`` / ``"a handwritten 7, tiny"``)."""
        kw = self.cfg.lora.keyword.strip()
        table = captions.caption_table(self.dataset.class_names)
        texts = [captions.EMPTY]
        for row in table:
            for c in row:
                texts += [c, f"{kw}, {c}", f"{c}, {kw}"]
        self.caption_texts = texts
        self.caption_ids = self.base_model.tokenizer(texts, truncation=True)
        self.caption_counts = torch.tensor([len(row) for row in table])
        self.caption_start = 1 + 3 * (torch.cumsum(self.caption_counts, 0) - self.caption_counts)

    def draw(self, step: int, generator: torch.Generator) -> Batch:
        """Images, styles, captions, timesteps and noise of global step ``step``."""
        tc, g = self.cfg.train, generator
        idx = batch_indices(len(self.dataset), tc.batch_size, step, tc.seed)
        styled = torch.rand(len(idx), generator=g) < self.cfg.lora.style_prob
        before = torch.rand(len(idx), generator=g) < 0.5
        z0 = torch.where(styled[:, None, None, None], self.styled_latents[idx], self.latents[idx])
        labels = self.dataset.labels[idx]
        choice = captions.draw_caption_choices(labels, self.caption_counts, g, tc.cond_drop_prob)
        variant = torch.where(styled, torch.where(before, 1, 2), 0)
        rows = self.caption_start[labels] + 3 * choice + variant
        rows = torch.where(choice < 0, 0, rows)
        t, weights = self.t_sampler.sample(len(idx), generator=g)
        noise = torch.randn(z0.shape, generator=g)
        return {
            "z0": z0,
            "input_ids": self.caption_ids[rows],
            "t": t,
            "weights": weights,
            "noise": noise,
        }

    # ------------------------------------------------------------------ outputs
    def save_model(self, model: nn.Module, path: Path, training: dict[str, Any]) -> None:
        lc = self.cfg.lora
        info = CheckpointInfo(
            kind="lora",
            config={"base": lc.base, "rank": lc.rank, "alpha": lc.alpha, "keyword": lc.keyword},
            training=training,
        )
        meta = {
            METADATA_KEY: info.to_json(),
            "ss_network_dim": str(lc.rank),
            "ss_network_alpha": str(lc.alpha),
            "ss_tag_frequency": "{}",
            "modelspec.trigger_phrase": lc.keyword,
        }
        write_kohya_lora(path, model.to_modules(), meta, model=self.base_model)

    def with_lora(self, model: nn.Module) -> LatentDiffusion:
        """The base model with ``model``'s deltas merged (a copy of the patched weights)."""
        import copy

        m = self.base_model
        pair = TextConditionedUNet(copy.deepcopy(m.unet), copy.deepcopy(m.text_encoder))
        with torch.no_grad():
            weights = model.merged_weights()
            for name, p in pair.named_parameters():
                if name in weights:
                    p.copy_(weights[name])
        return m.replace(unet=pair.unet, text_encoder=pair.text_encoder)

    def sample_grid(self, model: nn.Module) -> tuple[Tensor, int]:
        """One row per class: 4 images with the keyword, then 4 without."""
        kw = self.cfg.lora.keyword
        names = self.dataset.class_names[:10]
        prompts = []
        for n in names:
            c = captions.grid_prompt(n)
            prompts += [f"{c}, {kw}"] * 4 + [c] * 4
        req = grid_request(self.cfg, prompts)
        return generate(self.with_lora(model), req), 8


__all__ = ["LoRANetwork", "LoRATask", "choose_targets"]
