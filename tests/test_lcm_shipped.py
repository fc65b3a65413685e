"""The shipped LCM student of the mini SD (assets/mnist_text_lcm_unet.safetensors) makes the
digit asked for in 4 steps at CFG 1, about as well as its teacher in 20 steps at CFG 5.

The seed set and scores are those of bench/lcm_quality.py (README / docs/samplers.md table):
prompt i is "a handwritten <digit i % 10>" with seed i, i = 0..99; the shipped MNIST
classifier reads the 28x28 centre; FID in its features against the 5,000 MNIST digits.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from noisecraft.adapters.lcm_student import apply_lcm_student
from noisecraft.api.shipped import ASSETS, resolve_model
from noisecraft.io.native import load_latent_diffusion
from noisecraft.metrics.features import mnist_extractor
from noisecraft.metrics.frechet import fid_from_features
from noisecraft.training.config import DataConfig
from noisecraft.training.data import load_dataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from lcm_quality import digit_images, prompts_and_digits  # noqa: E402

STUDENT = ASSETS / "mnist_text_lcm_unet.safetensors"
SEEDS = list(range(100))


@pytest.fixture(scope="module")
def models():
    teacher = load_latent_diffusion(resolve_model("mnist-text"))
    return teacher, apply_lcm_student(teacher, STUDENT)


@pytest.fixture(scope="module")
def scorer():
    extractor = mnist_extractor()
    real = extractor(load_dataset(DataConfig(name="mnist")).images)
    _, digits = prompts_and_digits(len(SEEDS))

    def score(images: torch.Tensor) -> tuple[float, float]:
        acc = (extractor.logits(images).argmax(1) == torch.tensor(digits)).float().mean()
        return acc.item(), fid_from_features(extractor(images), real)

    return score


def test_shipped_student_fits_the_size_budget():
    assert STUDENT.stat().st_size <= 5_000_000


def test_four_lcm_steps_at_cfg_1_match_the_teacher(models, scorer):
    """The issue's goals (measured: teacher 99 %, FID 1.33; student at 4 steps 100 %, 1.14)."""
    teacher, student = models
    acc_t, fid_t = scorer(digit_images(teacher, "DPM++ 2M", 20, 5.0, SEEDS))
    acc_s, fid_s = scorer(digit_images(student, "LCM", 4, 1.0, SEEDS))
    assert acc_t >= 0.95 and acc_s >= 0.95, (acc_t, acc_s)
    assert fid_s <= 2 * fid_t, (fid_s, fid_t)


def test_one_step_is_what_distillation_buys(models, scorer):
    """One step from pure noise: the student's consistency output against the teacher's own
    x0 prediction (measured: student 99 %, FID 2.70; teacher 91 %, FID 6.67). At 2 and 4
    steps the undistilled teacher re-noised LCM-style is already as good on MNIST (table)."""
    teacher, student = models
    acc_s, fid_s = scorer(digit_images(student, "LCM", 1, 1.0, SEEDS))
    acc_raw, fid_raw = scorer(digit_images(teacher, "LCM", 1, 1.0, SEEDS))
    assert acc_s >= 0.95, acc_s
    assert fid_s < 0.6 * fid_raw, (fid_s, fid_raw)


def test_the_student_by_name_samples_with_lcm_defaults_and_replays(models, tmp_path, capsys):
    """``--model mnist-text-lcm``: the teacher with the student U-Net, LCM / 4 steps / CFG 1
    unless asked otherwise, recorded in the PNG and replayed from it."""
    import noisecraft
    from noisecraft.cli.main import main
    from noisecraft.errors import ConfigError
    from noisecraft.pipelines import GenerateRequest, generate

    pipe = noisecraft.load("mnist-text-lcm")
    result = pipe("a handwritten 7", seed=3, progress=False)
    info = result.infotext
    for field in ("Steps: 4", "Sampler: LCM", "CFG scale: 1.0", "LCM U-Net: mnist_text_lcm_unet"):
        assert field in info, info
    req = GenerateRequest(
        n=1, prompts=["a handwritten 7"], sampler="LCM", steps=4, cfg=1.0, seeds=[3]
    )
    want = generate(models[1], req)
    assert torch.equal(result.tensors, want)
    png = result.save(tmp_path / "lcm.png")[0]
    with pytest.raises(ConfigError, match="made with the LCM student U-Net"):
        noisecraft.load("mnist-text").replay(png)
    out = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(png), "--out", str(out)]) == 0
    from PIL import Image

    from noisecraft.api.infotext import read_parameters

    again, first = Image.open(out), Image.open(png)
    assert again.tobytes() == first.tobytes()  # the same pixels
    a, b = read_parameters(out), read_parameters(png)
    assert {**a, "model": None} == {**b, "model": None}, (a, b)  # and the same settings
    capsys.readouterr()
