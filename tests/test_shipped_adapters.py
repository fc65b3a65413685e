"""The adapters shipped with the mini Stable Diffusion do what the README says.

The style LoRA ``assets/loras/mnist_tiny.safetensors`` (configs/mnist_text_lora.toml) draws
tiny digits on the keyword "tiny" and leaves the model alone without it; its kohya file loads in
diffusers' ``load_lora_weights`` and gives the same image there. Measured with
``bench/lora_style.py`` (100 prompts, 10 per digit, seeds 0-99, DPM++ 2M, 20 steps, CFG 5):
with the keyword 100 % tiny / 99 % tiny and read as asked; without it 100 % normal and read.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import noisecraft
from noisecraft.api.shipped import ASSETS
from noisecraft.metrics.digit_shape import TINY_MAX_HEIGHT, ink_height, tiny_style_scores
from noisecraft.training.captions import DIGIT_WORDS
from noisecraft.training.styles import TINY_SCALE

LORA = ASSETS / "loras" / "mnist_tiny.safetensors"
DIGITS = [d for d in range(10) for _ in range(10)]


@pytest.fixture(scope="module")
def pipe():
    return noisecraft.load("mnist-text")  # the shipped LoRAs need no LoRA folder


def _scores(pipe, suffix: str) -> dict[str, float]:
    prompts = [f"a handwritten {DIGIT_WORDS[d]}{suffix} <lora:mnist_tiny:1>" for d in DIGITS]
    result = pipe(prompts, sampler="DPM++ 2M", steps=20, cfg=5.0, seed=0, progress=False)
    return tiny_style_scores(result.tensors, torch.tensor(DIGITS), TINY_SCALE)


def test_the_shipped_lora_file_is_small_and_kohya():
    from safetensors import safe_open

    assert LORA.stat().st_size <= 5e6
    with safe_open(str(LORA), "pt") as f:
        keys = list(f.keys())
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)


def test_the_keyword_draws_tiny_digits_of_the_digit_asked_for(pipe):
    s = _scores(pipe, ", tiny")
    assert s["tiny"] >= 0.9 and s["tiny_and_read"] >= 0.9, s  # measured 1.00 / 0.99


def test_without_the_keyword_the_lora_leaves_the_model_alone(pipe):
    s = _scores(pipe, "")
    assert s["normal_and_read"] >= 0.95, s  # measured 1.00


def test_the_shipped_lora_gives_the_same_image_in_diffusers(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from noisecraft.io.formats.diffusers_write import save_diffusers_folder
    from noisecraft.io.native import load_latent_diffusion
    from noisecraft.io.shipped import resolve_model

    folder = save_diffusers_folder(
        load_latent_diffusion(resolve_model("mnist-text")), tmp_path / "mini-sd"
    )
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
    pipe.load_lora_weights(str(LORA.parent), weight_name=LORA.name)
    prompt, seed = "a handwritten seven, tiny", 3
    with torch.no_grad():
        want = pipe(
            prompt,
            num_inference_steps=10,
            guidance_scale=5.0,
            generator=torch.Generator().manual_seed(seed),
            height=32,
            width=32,
            output_type="np",
        ).images[0]
    ours = noisecraft.load(folder, loras=[(LORA, 1.0)])
    got = ours(prompt, sampler="euler", steps=10, cfg=5.0, seed=seed, progress=False)
    mine = np.asarray(got.images[0], dtype=np.float64)
    theirs = np.round(want[..., 0] * 255)
    assert np.abs(mine - theirs).max() <= 2
    assert ink_height(got.tensors)[0] <= TINY_MAX_HEIGHT  # the LoRA took effect in both


# ---------------------------------------------------------------- the shipped embedding

EMBEDDING = ASSETS / "embeddings" / "unlucky.safetensors"


def test_the_shipped_embedding_teaches_the_word_unlucky():
    """configs/mnist_text_ti.toml: "unlucky" learned from the fours of MNIST. Measured with
    bench/embedding_unlucky.py (200 images): 100 % fours with the embedding, 0 % without."""
    from noisecraft.io.file_hash import sha256_file, short_hash
    from noisecraft.metrics.digit_shape import read_digits

    assert EMBEDDING.stat().st_size <= 5e6
    with_ti = noisecraft.load("mnist-text")  # a shipped model knows its shipped embeddings
    plain = noisecraft.load("mnist-text")
    plain.model.textual_inversion = None
    call = dict(sampler="DPM++ 2M", steps=20, cfg=5.0, seed=0, progress=False)
    result = with_ti(["a handwritten unlucky"] * 50, **call)
    fours = (read_digits(result.tensors) == 4).float().mean().item()
    without = read_digits(plain(["a handwritten unlucky"] * 50, **call).tensors) == 4
    assert fours >= 0.9 and without.float().mean().item() <= 0.1, (fours, without)
    assert f'TI hashes: "unlucky: {short_hash(sha256_file(EMBEDDING))}"' in result.infotexts[0]


def test_attention_maps_name_an_embedding_by_its_word():
    """The observer reads an embedding's vectors back as its word (2 vectors, one map)."""
    model = noisecraft.load("mnist-text").model
    words = model.prompt_words("a handwritten unlucky, tiny")
    assert [w.text for w in words] == ["a", "handwritten", "unlucky", ",", "tiny"]
    assert len(words[2].positions) == 2 and words[2].positions == (3, 4)
