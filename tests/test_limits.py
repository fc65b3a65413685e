"""Hardening of generation (issue 13): every bad number is one line, huge requests are refused
before anything is allocated, and a PNG made in fast / low-memory / tiny-decoder mode replays.

CLI cases assert exit 2, one line starting with ``error:``, no traceback and no file written.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import noisecraft
from noisecraft.api import limits as limits_module
from noisecraft.api import pipeline as pipeline_module
from noisecraft.api.limits import Limits
from noisecraft.cli.main import main
from noisecraft.errors import ConfigError
from noisecraft.models.unet import UNetConfig
from noisecraft.models.vae import VAEConfig
from noisecraft.pipelines import memory
from noisecraft.pipelines.png_params import parse_parameters
from test_latent_pipeline import tiny_model

G = ["generate", "a handwritten 7"]


@pytest.fixture
def no_generation(monkeypatch):
    """Fail the test if sampling starts (a refusal must come before any allocation)."""

    def refuse(*args, **kwargs):
        raise AssertionError("generate() ran; the request should have been refused first")

    monkeypatch.setattr(pipeline_module, "generate", refuse)


def _one_line_error(args: list[str], capsys, tmp_path) -> str:
    rc = main([*args, "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert not list(tmp_path.iterdir())  # nothing written, nothing left behind
    return lines[0]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--seed", "18446744073709551616"], "--seed must be in [0, 2^64)"),
        (["--seed", "-2"], "--seed must be in [0, 2^64)"),
        (["--cfg", "nan"], "--cfg must be a finite number"),
        (["--cfg", "inf"], "--cfg must be a finite number"),
        (["--guidance-rescale", "nan"], "--guidance-rescale must be a finite number"),
        (["--steps", "100000000"], "--steps must be at most 1000"),
        (["--size", "100000x100000"], "is 10,000,000,000 pixels, more than --max-pixels"),
        (["--n", "100000"], "--n = 100,000 images in one call is more than --max-images"),
        (["--device", "cuda"] if not torch.cuda.is_available() else ["--n", "0"], ""),
    ],
)
def test_generate_refuses_in_one_line(args, needle, capsys, tmp_path, no_generation):
    assert needle in _one_line_error([*G, *args], capsys, tmp_path)


def test_sample_refuses_in_one_line(capsys, tmp_path, no_generation):
    line = _one_line_error(["sample", "mnist", "--n", "100000000"], capsys, tmp_path)
    assert "more than --max-images" in line
    assert "--cfg must be a finite" in _one_line_error(
        ["sample", "mnist", "--cfg", "nan"], capsys, tmp_path
    )


def test_huge_seed_in_a_png_is_one_line(capsys, tmp_path):
    info = PngInfo()
    info.add_text("parameters", "a 7\nSteps: 4, Sampler: Euler, Seed: 99999999999999999999999")
    png = tmp_path / "in.png"
    Image.new("L", (32, 32)).save(png, pnginfo=info)
    out = tmp_path / "out"
    out.mkdir()
    rc = main(["generate", "--from-png", str(png), "--out", str(out / "x.png")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: --seed must be in [0, 2^64)") and err[-1] == "\n"
    assert not list(out.iterdir())


def test_raising_max_pixels_lets_a_large_image_through_to_the_memory_check(
    capsys, tmp_path, monkeypatch, no_generation
):
    monkeypatch.setattr(limits_module, "available_bytes", lambda device: 2**30)
    line = _one_line_error(
        [*G, "--size", "4096x4096", "--max-pixels", "20000000"], capsys, tmp_path
    )
    assert "need about" in line and "more than the 0.8 GiB" in line and "--tiling" in line


def test_no_prompt_is_the_empty_prompt(tmp_path, capsys):
    out = tmp_path / "x.png"
    assert main(["generate", "--steps", "2", "--out", str(out)]) == 0, capsys.readouterr().err
    params = parse_parameters(Image.open(out).text["parameters"])
    assert params["prompt"] == "" and params["steps"] == 2


def test_api_refuses_non_finite_and_too_many_steps():
    pipe = noisecraft.load()
    for settings, match in [
        ({"eta": float("inf"), "sampler": "Euler a"}, "eta must be a finite number"),
        ({"strength": float("nan"), "init_image": np.zeros((32, 32))}, "strength must be"),
        ({"steps": 1001}, "steps must be at most 1000"),
    ]:
        with pytest.raises(ConfigError, match=match):
            pipe("a 7", **settings)


# ---------------------------------------------------------------------------- memory


def test_memory_estimate_scales_as_the_tensors_do():
    model = tiny_model()
    one = memory.estimate(model, 64, 64, n=1, batch=1, cfg=5.0)
    # activations grow with the pixels and the batch; outputs with the images
    four = memory.estimate(model, 128, 128, n=1, batch=1, cfg=5.0)
    assert 3.5 < four.sampling / one.sampling <= 4.0 and four.decoding == 4 * one.decoding
    batch = memory.estimate(model, 64, 64, n=8, batch=4, cfg=5.0)
    assert batch.sampling == 4 * one.sampling and batch.outputs == 8 * one.outputs
    assert memory.estimate(model, 64, 64, n=1, batch=1, cfg=1.0).sampling * 2 == one.sampling
    # a tiled decode holds one tile, whatever the size
    big = memory.estimate(model, 2048, 2048, n=1, batch=1, cfg=5.0, tiling=True)
    bigger = memory.estimate(model, 4096, 4096, n=1, batch=1, cfg=5.0, tiling=True)
    tile = bigger.decoding - 2 * 3 * 4096 * 4096 * 4  # minus the blended output and weights
    assert tile == big.decoding - 2 * 3 * 2048 * 2048 * 4
    assert one.total == max(one.sampling, one.decoding) + one.outputs


def test_sd_decoder_estimate_matches_the_measured_peak():
    """SD 1.5's VAE decoder at 512x512: models/vae_tiling.py's docstring gives the measured
    peak of float32 activations, 743 MiB (one image, CPU); the estimate is 3 x 256 channels at
    full resolution, 768 MiB."""
    floats = memory.decoder_floats(VAEConfig(), 512, 512)
    assert math.isclose(floats * 4 / 2**20, 743, rel_tol=0.05)


def test_sd15_unet_estimate_at_1360x768_is_sane():
    """A size users type: one CFG pass of SD 1.5 at 1360x768 (latents 170x96) is estimated at
    a few GiB of activations -- allowed on a 24 GiB machine, unlike 100000x100000."""
    floats = memory.unet_floats(UNetConfig.sd15(), 96, 170) * 2
    assert 0.5 < floats * 4 / 2**30 < 4


def test_a_request_that_fits_only_in_smaller_batches_runs_in_them(monkeypatch):
    pipe = noisecraft.load()
    settings = {"n": 4, "steps": 2, "seed": 5}
    whole = pipe("a 7", **settings)
    assert whole.request.batch_size >= 4
    need = memory.estimate(pipe.model, 32, 32, n=4, batch=1, cfg=7.0)
    budget = (need.total + 1) / pipe.limits.memory_fraction  # room for one image at a time
    monkeypatch.setattr(limits_module, "available_bytes", lambda device: budget)
    split = pipe("a 7", **settings)
    assert split.request.batch_size == 1 and split.seeds == whole.seeds
    assert (split.tensors - whole.tensors).abs().max() < 1e-4
    monkeypatch.setattr(limits_module, "available_bytes", lambda device: budget / 4)
    with pytest.raises(ConfigError, match="need about .* more than the"):
        pipe("a 7", **settings)


def test_limits_are_checked():
    for bad in ({"max_pixels": 0}, {"max_images": -1}, {"max_images": 1.5}):
        with pytest.raises(ConfigError, match="must be a positive integer"):
            Limits(**bad)
    with pytest.raises(ConfigError, match="max_pixels must be a positive integer"):
        noisecraft.load(max_pixels=0)


# ---------------------------------------------------------------------------- modes replay


@pytest.mark.parametrize("mode", [["--fast"], ["--fast-decode"], ["--low-memory", "int8"]])
def test_from_png_replays_the_mode_it_was_made_in(mode, tmp_path, capsys):
    made, again = tmp_path / "made.png", tmp_path / "again.png"
    assert main(["generate", "a handwritten 3", "--steps", "4", *mode, "--out", str(made)]) == 0
    assert main(["generate", "--from-png", str(made), "--out", str(again)]) == 0
    capsys.readouterr()
    assert np.array_equal(np.asarray(Image.open(made)), np.asarray(Image.open(again)))
    # and the plain pipeline refuses to pretend
    plain = noisecraft.load()
    with pytest.raises(ConfigError, match="made in fast mode|low_memory int8|tiny decoder"):
        plain.replay(made)
