"""Textual inversion: learn new token vectors for a frozen text-to-image model.

Gal et al. 2022 ("An Image is Worth One Word", sec. 3, eq. 2) keep the text encoder and the
diffusion model frozen and optimise only the embedding ``v*`` of a placeholder word ``S*``:

    v* = argmin_v  E_{z ~ E(x), y, eps, t} || eps - eps_theta(z_t, t, c_theta(y(S*, v))) ||^2

where ``y`` is a caption template holding the word (``"a handwritten seven <thick>"``). Here
``v`` is ``inversion.vectors`` vectors (A1111's "number of vectors per token"), initialised
from the token embeddings of ``inversion.init_text`` (A1111: vector ``i`` takes the init
text's token ``i * len / n``), and the loss is the base model's own objective (its
prediction type; Min-SNR weighting unless ``min_snr_gamma = 0``).

The images are ``[data]``'s, all of them or the fraction with the thickest (or thinnest)
strokes (:func:`noisecraft.metrics.stroke.stroke_thickness`), encoded once by the model's
VAE (posterior mean) and cached. The trained module holds only the vectors, so the trainer's
EMA, checkpoints and resume apply to them alone; the saved ``model.safetensors`` is an
A1111-format embedding (``emb_params``), usable with ``embedding_dir`` or
``Pipeline.load_embedding``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from noisecraft.adapters.embedding_set import EmbeddingSet
from noisecraft.adapters.embeddings import Embedding, save_embedding
from noisecraft.diffusion import ObjectiveConfig
from noisecraft.diffusion.timestep_sampling import make_timestep_sampler
from noisecraft.errors import ConfigError
from noisecraft.io.native import load_latent_diffusion
from noisecraft.io.shipped import resolve_model
from noisecraft.metrics.stroke import stroke_thickness
from noisecraft.models.latent_diffusion import LatentDiffusion
from noisecraft.pipelines.generate import generate
from noisecraft.training.captions import DIGIT_WORDS
from noisecraft.training.config import ExperimentConfig
from noisecraft.training.data import ImageDataset, batch_indices
from noisecraft.training.tasks.base import (
    Batch,
    CaptionedLatentLoss,
    TimestepSamplerState,
    draw_timesteps_and_noise,
    grid_request,
)


class InvertedToken(nn.Module):
    """The trained vectors, with the frozen model they condition (not registered as
    submodules: nothing of it is trained, saved in checkpoints or averaged)."""

    def __init__(self, vectors: Tensor, model: LatentDiffusion):
        super().__init__()
        self.vectors = nn.Parameter(vectors.clone())
        self.frozen = (model,)  # a tuple: nn.Module does not register it

    def forward(self, x: Tensor, t: Tensor, input_ids: Tensor) -> Tensor:
        model = self.frozen[0]
        unique, inverse = torch.unique(input_ids, dim=0, return_inverse=True)
        out = model.text_encoder(unique, extra_tokens=self.vectors)
        return model.unet(x, t, context=out.last_hidden_state[inverse])


class TextualInversionTask(CaptionedLatentLoss, TimestepSamplerState):
    """Learn ``inversion.token`` for a frozen latent model (module docstring)."""

    name = "textual_inversion"
    resume_sections = ("data", "inversion")
    log_keys: tuple[str, ...] = ()

    def __init__(self, cfg: ExperimentConfig, dataset: ImageDataset, device: torch.device):
        self.cfg = cfg
        ic = cfg.inversion
        self.device = device
        if dataset.labels is None:
            raise ConfigError(
                "the textual_inversion captions name each image's class; use a labelled "
                "dataset (data.class_conditional = true)"
            )
        base = load_latent_diffusion(resolve_model(ic.model), device=device)
        for module in (base.unet, base.text_encoder, base.vae):
            module.eval().requires_grad_(False)
        self.base = base
        self.token = ic.token
        self.embeddings = EmbeddingSet.for_model(base)
        self.model = InvertedToken(self._init_vectors(), base)
        self.embeddings.add(Embedding(ic.token, self.model.vectors.detach()))
        self.schedule = base.schedule
        self.objective = ObjectiveConfig(
            prediction=base.prediction,
            weighting="min_snr" if ic.min_snr_gamma > 0 else "none",
            min_snr_gamma=ic.min_snr_gamma or 5.0,
        )
        self.t_sampler = make_timestep_sampler("uniform", base.schedule.num_steps)
        self.dataset = self._select(dataset)
        self.captions = self._caption_table()
        self.latents = self._encode(self.dataset.images)

    # ------------------------------------------------------------------ setup
    def _init_vectors(self) -> Tensor:
        ic, te = self.cfg.inversion, self.base.text_encoder
        ids = self.base.tokenizer.encode(ic.init_text)
        if not ids:
            raise ConfigError("inversion.init_text must hold at least one word")
        table = te.embeddings.token_embedding.weight.detach().float()
        rows = [ids[i * len(ids) // ic.vectors] for i in range(ic.vectors)]
        return table[torch.tensor(rows, device=table.device)].cpu()

    def _select(self, dataset: ImageDataset) -> ImageDataset:
        ic = self.cfg.inversion
        if ic.select == "classes":
            if dataset.labels is None:
                raise ConfigError('inversion.select = "classes" needs a labelled dataset')
            names = [str(n) for n in dataset.class_names]
            idx = [names.index(str(c)) for c in ic.classes if str(c) in names]
            if len(idx) != len(ic.classes):
                raise ConfigError(
                    f"inversion.classes {list(ic.classes)} names classes the data lacks; it "
                    f"has {', '.join(names)}"
                )
            keep = torch.isin(dataset.labels, torch.tensor(idx)).nonzero().flatten()
            self.selected = keep
            return ImageDataset(dataset.images[keep], dataset.labels[keep], dataset.class_names)
        if ic.select == "all":
            return dataset
        thickness = stroke_thickness(dataset.images)
        k = max(1, round(ic.fraction * len(dataset)))
        keep = thickness.argsort(descending=ic.select == "thickest")[:k].sort().values
        self.selected = keep
        return ImageDataset(dataset.images[keep], dataset.labels[keep], dataset.class_names)

    def _caption(self, template: str, class_name: str) -> str:
        fields = {"token": self.token, "name": class_name.replace("_", " ")}
        if class_name in tuple(map(str, range(10))):
            fields.update(word=DIGIT_WORDS[int(class_name)], digit=class_name)
        try:
            return template.format(**fields)
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(
                f"inversion.templates: cannot fill {template!r} for class {class_name!r} ({e}); "
                "use {token}, {name}, and {word} / {digit} for digit classes"
            ) from None

    def _caption_table(self) -> Tensor:
        """Token ids (classes, templates, 77) of every caption."""
        tok, names = self.base.tokenizer, self.dataset.class_names
        rows = []
        for name in names:
            ids = []
            for template in self.cfg.inversion.templates:
                chunks = tok.encode_chunks(
                    self._caption(template, name), embeddings=self.embeddings
                )
                if chunks.shape[0] != 1:
                    raise ConfigError(f"inversion.templates: {template!r} is over 75 tokens")
                ids.append(chunks[0])
            rows.append(torch.stack(ids))
        return torch.stack(rows)

    @torch.no_grad()
    def _encode(self, images: Tensor) -> Tensor:
        vae, out = self.base.vae, []
        for i in range(0, len(images), 256):
            x = images[i : i + 256].to(self.device)
            out.append(vae.encode_latents(x, None, sample=False).float().cpu())
        return torch.cat(out)

    # ------------------------------------------------------------------ one step
    def draw(self, step: int, generator: torch.Generator) -> Batch:
        tc, g = self.cfg.train, generator
        idx = batch_indices(len(self.dataset), tc.batch_size, step, tc.seed)
        labels = self.dataset.labels[idx]
        choice = torch.randint(self.captions.shape[1], (len(idx),), generator=g)
        batch: Batch = {"z0": self.latents[idx], "input_ids": self.captions[labels, choice]}
        batch.update(draw_timesteps_and_noise(self.t_sampler, batch["z0"].shape, g))
        return batch

    # ------------------------------------------------------------------ outputs
    def embedding(self, model: nn.Module) -> Embedding:
        return Embedding(self.token, model.vectors.detach().float().cpu())

    def pipeline(self, model: nn.Module) -> LatentDiffusion:
        """The base model with ``model``'s vectors as the token."""
        ti = EmbeddingSet.for_model(self.base)
        ti.add(self.embedding(model))
        return self.base.replace(textual_inversion=ti)

    def save_model(self, model: nn.Module, path: Path, training: dict[str, Any]) -> None:
        save_embedding(self.embedding(model), path, training=training, overwrite=True)

    def sample_grid(self, model: nn.Module) -> tuple[Tensor, int]:
        """One row per class (up to 10): 4 images without the token, then 4 with it."""
        names = self.dataset.class_names[:10]
        prompts = []
        for name in names:
            plain = self._caption(self.cfg.inversion.templates[0], name).replace(self.token, "")
            prompts += [plain.strip()] * 4 + [
                self._caption(self.cfg.inversion.templates[0], name)
            ] * 4
        req = grid_request(self.cfg, prompts, seeds=[i % 4 for i in range(len(prompts))])
        return generate(self.pipeline(model), req), 8


__all__ = ["InvertedToken", "TextualInversionTask"]
