"""The CLIP text transformer that conditions Stable Diffusion (Radford et al. 2021, sec. 2.4).

A GPT-2 style (Radford et al. 2019) pre-LayerNorm causal transformer: token + learned position
embeddings, ``layers`` blocks of ``x += attn(ln_1(x)); x += mlp(ln_2(x))`` with a causal mask,
and a final LayerNorm. The MLP activation is OpenAI CLIP's "quick GELU" ``x * sigmoid(1.702 x)``
(SD 1.x, ViT-L/14) or the exact erf GELU (OpenCLIP ViT-H/14, SD 2.x).

Parameter names are those of transformers' ``CLIPTextModel`` without the ``text_model.`` prefix
(``embeddings.{token,position}_embedding``, ``encoder.layers.N.{self_attn.{q,k,v,out}_proj,
layer_norm1, mlp.fc1, mlp.fc2, layer_norm2}``, ``final_layer_norm``): SD 1.x single files store
them under ``cond_stage_model.transformer.text_model.`` and diffusers folders under
``text_model.``, so loading either is a prefix strip (:meth:`CLIPTextEncoder.
load_transformers_state_dict`). SD 2.x single files hold OpenCLIP names (``resblocks``, a packed
``in_proj_weight``) and need a converter first.

``clip_skip`` follows AUTOMATIC1111 ("stop at last layers"): ``k`` takes the output of the
``k``-th layer from the end and applies the final LayerNorm, so 1 is the last layer and 2 the
penultimate one (SD 2.x). diffusers counts from 0 instead: its ``clip_skip=c`` is ours ``c + 1``
(``StableDiffusionPipeline.encode_prompt`` takes ``hidden_states[-(c + 1)]``, then
``final_layer_norm``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from noisecraft.config_dict import config_from_dict
from noisecraft.errors import CheckpointError, ConfigError, unknown_name
from noisecraft.nn.kernels import Linear

ACTIVATIONS = ("quick_gelu", "gelu")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class TextEncoderConfig:
    """Size of a :class:`CLIPTextEncoder`; JSON-able through ``to_dict`` / ``from_dict``.

    * ``width`` channels, ``heads`` attention heads of ``width // heads`` channels, ``layers``
      transformer blocks, an MLP of ``intermediate_size`` hidden units (4 * width in CLIP).
    * ``activation``: ``"quick_gelu"`` ``x * sigmoid(1.702 x)`` (OpenAI CLIP) or ``"gelu"``
      (erf form, OpenCLIP).
    * ``eos_token_id``: where ``pooled`` is read. ``None``: at ``argmax(input_ids)``, as OpenAI
      CLIP (its end-of-text token 49407 is the largest id) and as transformers does for the
      ``eos_token_id: 2`` that SD-era CLIP configs carry; an int: at the first occurrence of
      that id (transformers' path for any other ``eos_token_id``; position 0 if absent).
    * ``clip_skip``: the default of :meth:`CLIPTextEncoder.forward`'s ``clip_skip``
      (1 = last layer; SD 2.x uses 2, the penultimate layer).
    """

    vocab_size: int = 49408
    max_positions: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    intermediate_size: int = 3072
    activation: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int | None = None
    clip_skip: int = 1

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_positions", "width", "layers", "heads"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ConfigError(
                    f"TextEncoderConfig.{name} must be a positive integer, got {value!r}"
                )
        if not _is_int(self.intermediate_size) or self.intermediate_size < 1:
            raise ConfigError(
                f"TextEncoderConfig.intermediate_size must be a positive integer, "
                f"got {self.intermediate_size!r}"
            )
        if self.width % self.heads:
            raise ConfigError(
                f"TextEncoderConfig: heads={self.heads} must divide width={self.width}"
            )
        if self.activation not in ACTIVATIONS:
            raise unknown_name("text encoder activation", str(self.activation), ACTIVATIONS)
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf:
            raise ConfigError(f"TextEncoderConfig.layer_norm_eps must be > 0, got {eps!r}")
        eos = self.eos_token_id
        if eos is not None and (not _is_int(eos) or not 0 <= eos < self.vocab_size):
            raise ConfigError(
                f"TextEncoderConfig.eos_token_id must be null or a token id in "
                f"0..{self.vocab_size - 1}, got {eos!r}"
            )
        _check_clip_skip(self.clip_skip, self.layers)

    @property
    def head_dim(self) -> int:
        """Channels per attention head."""
        return self.width // self.heads

    @classmethod
    def sd15(cls, **overrides: Any) -> TextEncoderConfig:
        """OpenAI CLIP ViT-L/14 text tower (SD 1.x): 768 wide, 12 layers, 12 heads, quick GELU."""
        return dataclasses.replace(cls(), **overrides)

    @classmethod
    def sd2(cls, **overrides: Any) -> TextEncoderConfig:
        """OpenCLIP ViT-H/14 text tower (SD 2.x): 1024 wide, 24 layers, 16 heads, GELU.

        SD 2.x conditions on the penultimate layer, so ``clip_skip`` defaults to 2. diffusers
        folders store only the first 23 layers (the last one is never used): build those with
        ``sd2(layers=23, clip_skip=1)``, which gives the same ``last_hidden_state``.
        """
        base = cls(
            width=1024, layers=24, heads=16, intermediate_size=4096, activation="gelu", clip_skip=2
        )
        return dataclasses.replace(base, **overrides)

    @classmethod
    def from_transformers(cls, d: Mapping[str, Any]) -> TextEncoderConfig:
        """From a transformers ``CLIPTextConfig`` dict (a diffusers ``text_encoder/config.json``).

        ``eos_token_id`` 2 (the pre-2023 value SD configs carry) maps to ``None`` (argmax
        pooling), as in transformers; other keys of the dict are ignored.
        """
        if d.get("hidden_act", "quick_gelu") not in ACTIVATIONS:
            raise unknown_name("text encoder activation", str(d["hidden_act"]), ACTIVATIONS)
        eos = d.get("eos_token_id", 2)
        return cls(
            vocab_size=d.get("vocab_size", 49408),
            max_positions=d.get("max_position_embeddings", 77),
            width=d.get("hidden_size", 512),
            layers=d.get("num_hidden_layers", 12),
            heads=d.get("num_attention_heads", 8),
            intermediate_size=d.get("intermediate_size", 2048),
            activation=d.get("hidden_act", "quick_gelu"),
            layer_norm_eps=d.get("layer_norm_eps", 1e-5),
            eos_token_id=eos if _is_int(eos) and eos != 2 else None,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TextEncoderConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`ConfigError` naming them."""
        return config_from_dict(cls, d, "text encoder")


def _check_clip_skip(clip_skip: Any, layers: int) -> None:
    if not _is_int(clip_skip) or not 1 <= clip_skip <= layers:
        raise ConfigError(
            f"clip_skip must be an integer in 1..{layers} (1 = last layer, 2 = penultimate), "
            f"got {clip_skip!r}"
        )


def quick_gelu(x: Tensor) -> Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU: ``x * sigmoid(1.702 x)``."""
    return x * torch.sigmoid(1.702 * x)


class CLIPTextEmbeddings(nn.Module):
    """``token_embedding(ids) + position_embedding(0..L-1)``; ids from ``vocab_size`` on
    index ``extra`` (k, width), the vectors of textual-inversion embeddings (Gal et al. 2022)."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.position_embedding = nn.Embedding(config.max_positions, config.width)

    def forward(self, input_ids: Tensor, extra: Tensor | None = None) -> Tensor:
        positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
        if extra is None:
            tokens = self.token_embedding(input_ids)
        else:
            vocab = self.token_embedding.num_embeddings
            added = input_ids >= vocab
            tokens = self.token_embedding(input_ids.masked_fill(added, 0))
            rows = extra.to(tokens)[(input_ids - vocab).clamp(min=0)]
            tokens = torch.where(added[..., None], rows, tokens)
        return tokens + self.position_embedding(positions)


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention ``softmax(q k^T / sqrt(d) + M) v`` (Vaswani et al. eq. 1).

    ``M`` is ``-inf`` above the diagonal (a token sees itself and the tokens before it) and,
    with a ``key_mask``, on padded keys. One SDPA call over all heads.
    """

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.heads = config.heads
        self.q_proj = Linear(config.width, config.width)
        self.k_proj = Linear(config.width, config.width)
        self.v_proj = Linear(config.width, config.width)
        self.out_proj = Linear(config.width, config.width)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        q, k, v = (
            t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, heads, L, d)
            for t in (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        )
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).flatten(2))


class CLIPMLP(nn.Module):
    """``fc2(act(fc1(x)))`` with quick GELU or GELU."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.quick = config.activation == "quick_gelu"
        self.fc1 = Linear(config.width, config.intermediate_size)
        self.fc2 = Linear(config.intermediate_size, config.width)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        return self.fc2(quick_gelu(h) if self.quick else F.gelu(h))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN block (GPT-2): ``x += self_attn(layer_norm1(x)); x += mlp(layer_norm2(x))``."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    """The stack of :class:`CLIPEncoderLayer` s (``encoder.layers.N``)."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.layers))


@dataclass
class TextEncoderOutput:
    """What :meth:`CLIPTextEncoder.forward` returns.

    * ``last_hidden_state`` (B, L, width): the state ``clip_skip`` picks, after the final
      LayerNorm; with ``clip_skip=1`` transformers' ``last_hidden_state``. This is the
      cross-attention ``context`` of SD 1.x / 2.x.
    * ``pooled`` (B, width): the final layer's output after the final LayerNorm at the
      end-of-text token, whatever ``clip_skip`` is (transformers' ``pooler_output``; SDXL reads
      the pooled feature from the last layer and the tokens from the penultimate one).
    * ``hidden_states``: with ``output_hidden_states=True``, ``layers + 1`` tensors (B, L, width)
      without the final LayerNorm: the embeddings, then each layer's output (as transformers).
    """

    last_hidden_state: Tensor
    pooled: Tensor
    hidden_states: tuple[Tensor, ...] | None = None


class CLIPTextEncoder(nn.Module):
    """CLIP text transformer: token ids (B, L <= max_positions) to (B, L, width) features."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.config = config
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """OpenAI CLIP's initialisation (``CLIP.initialize_parameters``); biases zero."""
        c = self.config
        attn_std = c.width**-0.5
        proj_std = attn_std * (2 * c.layers) ** -0.5
        fc_std = (2 * c.width) ** -0.5
        nn.init.normal_(self.embeddings.token_embedding.weight, std=0.02)
        nn.init.normal_(self.embeddings.position_embedding.weight, std=0.01)
        for layer in self.encoder.layers:
            a, m = layer.self_attn, layer.mlp
            for lin, std in (
                (a.q_proj, attn_std),
                (a.k_proj, attn_std),
                (a.v_proj, attn_std),
                (a.out_proj, proj_std),
                (m.fc1, fc_std),
                (m.fc2, proj_std),
            ):
                nn.init.normal_(lin.weight, std=std)
                nn.init.zeros_(lin.bias)

    def _check_ids(self, input_ids: Tensor, extra: int = 0) -> None:
        c = self.config
        if input_ids.ndim != 2 or input_ids.dtype.is_floating_point:
            raise ConfigError(
                f"text encoder input must be integer token ids of shape (batch, tokens), "
                f"got {input_ids.dtype} {tuple(input_ids.shape)}"
            )
        n = input_ids.shape[1]
        if n > c.max_positions:
            raise ConfigError(
                f"{n} tokens are more than the text encoder's {c.max_positions} positions; "
                f"split the prompt into chunks of {c.max_positions} (encode_prompt_chunks)"
            )
        if n == 0:
            raise ConfigError("text encoder input has no tokens; pass at least BOS and EOS")
        # An out-of-range id would be a device-side assert on CUDA; say what is wrong instead.
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= c.vocab_size + extra:
            bad = lo if lo < 0 else hi
            raise ConfigError(
                f"token id {bad} is outside the vocabulary (0..{c.vocab_size - 1}); "
                f"use the tokenizer that belongs to this text encoder"
            )

    def _mask(self, attention_mask: Tensor, input_ids: Tensor) -> Tensor:
        """Boolean (B, 1, L, L) mask: causal and, for keys, ``attention_mask != 0``."""
        if attention_mask.shape != input_ids.shape:
            raise ConfigError(
                f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                f"got {tuple(attention_mask.shape)}"
            )
        n = input_ids.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=input_ids.device).tril()
        return causal & (attention_mask != 0)[:, None, None, :].to(input_ids.device)

    def forward(
        self,
        input_ids: Tensor,
        *,
        clip_skip: int | None = None,
        attention_mask: Tensor | None = None,
        output_hidden_states: bool = False,
        extra_tokens: Tensor | None = None,
    ) -> TextEncoderOutput:
        """Encode token ids (B, L); see :class:`TextEncoderOutput` for what comes back.

        ``clip_skip`` (default ``config.clip_skip``): 1 = last layer, ``k`` = the output of
        ``hidden_states[-k]`` passed through ``final_layer_norm`` (A1111; diffusers' ``k - 1``).
        ``attention_mask`` (B, L), 1 = token, 0 = padding: padded keys are masked on top of the
        causal mask (SD does not use one: its padding is attended to). ``extra_tokens``
        (k, width): the token vectors of ids ``vocab_size .. vocab_size + k - 1``
        (textual-inversion embeddings, :mod:`noisecraft.adapters.embeddings`).
        """
        c = self.config
        clip_skip = c.clip_skip if clip_skip is None else clip_skip
        _check_clip_skip(clip_skip, c.layers)
        self._check_ids(input_ids, 0 if extra_tokens is None else len(extra_tokens))
        mask = None if attention_mask is None else self._mask(attention_mask, input_ids)

        h = self.embeddings(input_ids, extra_tokens)
        states = [h] if output_hidden_states else None
        take = c.layers + 1 - clip_skip  # hidden_states[-clip_skip] is after this many layers
        chosen = h
        for i, layer in enumerate(self.encoder.layers, start=1):
            h = layer(h, mask)
            if states is not None:
                states.append(h)
            if i == take:
                chosen = h
        last = self.final_layer_norm(chosen)

        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        if c.eos_token_id is None:  # the end token is the largest id of the vocabulary
            eos = input_ids.masked_fill(input_ids >= c.vocab_size, -1).argmax(dim=-1)
        else:
            eos = (input_ids == c.eos_token_id).int().argmax(dim=-1)
        # LayerNorm is per token: normalising the selected rows equals selecting normalised rows.
        pooled = last[rows, eos] if clip_skip == 1 else self.final_layer_norm(h[rows, eos])
        return TextEncoderOutput(
            last_hidden_state=last,
            pooled=pooled,
            hidden_states=tuple(states) if states is not None else None,
        )

    def load_transformers_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Load a transformers ``CLIPTextModel`` state dict, keys with or without ``text_model.``.

        Strip longer prefixes first (SD 1.x single files: ``cond_stage_model.transformer.``).
        ``position_ids`` buffers are ignored; any other missing, unexpected or mis-shaped key
        raises :class:`CheckpointError`. Values are cast to this model's dtype.
        """
        own = self.state_dict()
        sd: dict[str, Tensor] = {}
        for key, value in state_dict.items():
            key = key.removeprefix("text_model.")
            if key.endswith("position_ids"):
                continue
            sd[key] = value
        missing = sorted(set(own) - set(sd))
        unexpected = sorted(set(sd) - set(own))
        if missing or unexpected:
            layers = {int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")}
            hint = ""
            if layers and len(layers) != self.config.layers:
                hint = (
                    f"; the state dict has {len(layers)} layers, the config {self.config.layers}"
                    + (
                        " (diffusers SD 2.x folders keep 23: use TextEncoderConfig.sd2("
                        "layers=23, clip_skip=1))"
                        if len(layers) == 23
                        else ""
                    )
                )
            raise CheckpointError(
                f"not a CLIP text encoder of this config: {len(missing)} missing key(s) "
                f"{missing[:3]}, {len(unexpected)} unexpected key(s) {unexpected[:3]}{hint}"
            )
        bad = [k for k, v in sd.items() if tuple(v.shape) != tuple(own[k].shape)]
        if bad:
            k = bad[0]
            raise CheckpointError(
                f"{len(bad)} tensor(s) of another shape, e.g. {k}: checkpoint "
                f"{tuple(sd[k].shape)}, model {tuple(own[k].shape)}; build the config that "
                f"matches the checkpoint (TextEncoderConfig.sd15() / sd2())"
            )
        self.load_state_dict(sd, strict=True)


def encode_prompt_chunks(
    encoder: CLIPTextEncoder,
    ids: Tensor,
    weights: Tensor | None = None,
    *,
    clip_skip: int | None = None,
    extra_tokens: Tensor | None = None,
) -> Tensor:
    """Encode a long prompt as A1111 does: chunk by chunk, weighted, concatenated.

    ``ids`` (n_chunks, 77): each row a full encoder input (BOS, up to 75 tokens, EOS/padding),
    encoded independently (one batch) so prompts longer than 75 tokens still fit. ``weights``
    (n_chunks, 77) are per-token emphasis multipliers ("(word:1.3)"), applied to the encoder
    *output* with A1111's "Original" emphasis, per chunk ``z`` (77, width)::

        z' = z * w[:, None]
        z' = z' * mean(z) / mean(z')      # restore the chunk's original mean

    so ``mean(z') == mean(z)`` and all-1.0 weights change nothing. Returns the chunks
    concatenated along the tokens: (1, 77 * n_chunks, width), a UNet ``context`` of one prompt.
    ``extra_tokens``: textual-inversion vectors (:meth:`CLIPTextEncoder.forward`).
    """
    if ids.ndim != 2:
        raise ConfigError(
            f"prompt chunks must be token ids of shape (n_chunks, tokens), got {tuple(ids.shape)}"
        )
    z = encoder(ids, clip_skip=clip_skip, extra_tokens=extra_tokens).last_hidden_state
    if weights is not None:
        if weights.shape != ids.shape:
            raise ConfigError(
                f"prompt weights must have the shape of the token ids {tuple(ids.shape)}, "
                f"got {tuple(weights.shape)}"
            )
        w = weights.to(device=z.device, dtype=z.dtype)
        finite = bool(torch.isfinite(z).all())
        original_mean = z.mean(dim=(1, 2), keepdim=True)
        z = z * w[..., None]
        z = z * (original_mean / z.mean(dim=(1, 2), keepdim=True))
        if finite and not torch.isfinite(z).all():  # weights near the dtype's max overflow
            raise ConfigError(
                f"the prompt's emphasis weights overflow the text encoder's {z.dtype} "
                "(weights of about 1e38, or 65504 in fp16); use smaller weights"
            )
    return z.reshape(1, -1, z.shape[-1])


__all__ = [
    "CLIPTextEncoder",
    "TextEncoderConfig",
    "TextEncoderOutput",
    "encode_prompt_chunks",
    "quick_gelu",
]
