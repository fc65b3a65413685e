"""ControlNet in the one generate() core, the API and the CLI: start / end steps, untrained
units, preprocessors and resize modes, A1111's infotext units, replay, one-line errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from noisecraft import Control, LoadOptions
from noisecraft.api.controls import UsedControl, format_unit, units_of
from noisecraft.api.pipeline import Pipeline
from noisecraft.cli.main import main
from noisecraft.diffusion import NoiseSchedule
from noisecraft.errors import ConfigError
from noisecraft.io.controlnet_files import save_controlnet
from noisecraft.io.file_hash import legacy_model_hash
from noisecraft.io.native import save_model
from noisecraft.models import PixelDiffusion
from noisecraft.models.controlnet import ControlNet
from noisecraft.models.unet import UNet
from noisecraft.pipelines import GenerateRequest, generate
from noisecraft.pipelines.control import ControlInput, control_active
from noisecraft.pipelines.control_preprocess import fit_hint, make_hint, preprocess
from noisecraft.pipelines.png_params import format_parameters, parse_parameters
from test_controlnet_parity import tiny_controlnet
from test_latent_pipeline import UNET, H, W, _image, _mask, tiny_model

BASE = dict(n=1, prompts=["the cat"], steps=4, sampler="euler", height=H, width=W, cfg=4.0)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def net(model):
    return tiny_controlnet(model, 11)


def _hint(seed: int = 5) -> torch.Tensor:
    return (_image(seed) + 1) / 2


def _square(size: int = 32) -> Image.Image:
    a = np.zeros((size, size, 3), dtype=np.uint8)
    a[8:24, 8:24] = 255
    return Image.fromarray(a)


# ---------------------------------------------------------------------------- the core


def test_start_end_follow_diffusers_controlnet_keep():
    """diffusers: keep step i of n unless i / n < start or (i + 1) / n > end."""
    got = [control_active(i, 4, 0.25, 0.75) for i in range(4)]
    assert got == [False, True, True, False]
    assert [control_active(i, 3, 0.0, 0.5) for i in range(3)] == [True, False, False]
    assert all(control_active(i, 7, 0.0, 1.0) for i in range(7))


def test_untrained_controlnet_changes_nothing(model):
    """Zero convolutions: a fresh ControlNet (from_unet) adds exact zeros."""
    fresh = ControlNet.from_unet(model.unet)
    unit = ControlInput(fresh, _hint(), weight=1.5)
    plain = generate(model, GenerateRequest(**BASE))
    assert torch.equal(generate(model, GenerateRequest(**BASE, controls=[unit])), plain)


def test_guess_mode_batch_equals_images_alone(model, net):
    """Guess mode runs the ControlNet on the conditional rows of a CFG batch of two images:
    each image equals the one made alone (its seed), so the rows are not mixed up."""
    units = [ControlInput(net, _hint(), guess_mode=True), ControlInput(net, _hint(6), 0.5)]
    req = dict(BASE, n=2, seeds=[3, 8], prompts=["the cat", "a dog"])
    both = generate(model, GenerateRequest(**req, controls=units))
    for i in range(2):
        alone = dict(req, n=1, seeds=[req["seeds"][i]], prompts=[req["prompts"][i]])
        torch.testing.assert_close(both[i : i + 1], generate(model, GenerateRequest(**alone,
                                   controls=units)), atol=1e-5, rtol=0)  # fmt: skip


def test_two_calls_per_step_stay_in_their_step(model, net):
    """A call belongs to the step whose sigmas hold its own. Heun calls the model twice per
    step (once in the last), the second time at the next step's sigma: with start 0.5 of 4
    steps the ControlNet acts on the calls at steps 2 and 3's sigmas, Heun's second call of
    step 1 included (it is at step 2's sigma), 4 calls in all."""
    seen = []
    forward = net.forward

    def spy(x, t, *a, **kw):
        seen.append(float(t[0]))
        return forward(x, t, *a, **kw)

    net.forward = spy
    try:
        generate(
            model,
            GenerateRequest(
                **{**BASE, "sampler": "heun"}, controls=[ControlInput(net, _hint(), start=0.5)]
            ),
        )
    finally:
        del net.forward
    req = GenerateRequest(**{**BASE, "sampler": "heun"})
    t = model.denoiser(req.spec.schedule).sigma_to_t(req.spec.sigmas(model.schedule, 4))
    assert seen == pytest.approx([float(t[2])] * 2 + [float(t[3])] * 2)


def test_inpainting_with_controlnet_keeps_the_known_region(model, net):
    init, mask = _image(3), _mask()
    req = dict(**BASE, init_image=init, mask=mask, strength=1.0)
    units = [ControlInput(net, _hint())]
    got = generate(model, GenerateRequest(**req, controls=units), decode=False)
    plain = generate(model, GenerateRequest(**req), decode=False)
    known = (F.interpolate(mask, size=got.shape[-2:]) < 0.5).expand_as(got)
    assert known.any() and torch.equal(got[known], plain[known])  # the init latents
    assert (got - plain)[~known].abs().max() > 0.01


def test_one_line_errors(model, net):
    other = ControlNet.from_unet(UNet(dataclasses.replace(UNET, model_channels=8)))
    cases = [
        (dict(controls=[ControlInput(other, _hint())]), "for another U-Net"),
        (dict(controls=[ControlInput(net, _hint()[..., :32])]), "resize it"),
        (dict(controls=[ControlInput(net, _hint(), start=0.6, end=0.5)]), "start < end"),
    ]
    for kw, words in cases:
        with pytest.raises(ConfigError, match=words) as e:
            generate(model, GenerateRequest(**BASE, **kw))
        assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------- control images


def test_canny_scribble_threshold_hints():
    image = torch.from_numpy(np.asarray(_square(), dtype=np.float32) / 255).permute(2, 0, 1)
    edges = preprocess(image[None], "canny")[0, 0]
    assert edges.shape == (32, 32) and set(edges.unique().tolist()) == {0.0, 1.0}
    ys, xs = torch.nonzero(edges, as_tuple=True)
    assert ys.min() >= 6 and ys.max() <= 25 and xs.min() >= 6 and xs.max() <= 25
    assert edges[12:20, 12:20].sum() == 0 and edges[:4].sum() == 0  # flat areas: no edge
    lines = preprocess(1 - image[None], "scribble")[0, 0]  # black square on white paper
    assert torch.equal(lines, preprocess(image[None], "threshold")[0, 0])
    assert lines[16, 16] == 1 and lines[0, 0] == 0


def test_resize_modes():
    wide = torch.zeros(1, 3, 8, 16)
    wide[..., 4:12] = 1.0  # a white middle half
    assert fit_hint(wide, 8, 8, "crop").min() == 1  # the centre, cropped
    stretched = fit_hint(wide, 8, 8, "resize", binary=True)
    assert stretched[..., :2].max() == 0 and stretched[..., 3:5].min() == 1
    filled = fit_hint(wide, 16, 16, "fill")
    assert filled.shape == (1, 3, 16, 16)
    assert filled[..., :4, :].max() == 0 and filled[..., 12:, :].max() == 0  # median border
    assert filled[..., 4:12, 6:10].min() > 0.99
    assert torch.equal(make_hint(wide, 8, 16, preprocess_name="none", resize="crop"), wide)


# ---------------------------------------------------------------------------- infotext


def test_unit_infotext_is_the_extensions_layout_and_reads_back():
    unit = UsedControl("canny", "control_sd15_canny [fef5e48e]", 1.0, "crop", 0.0, 1.0, False, None)
    text = format_unit(unit)
    assert text == (
        "Module: canny, Model: control_sd15_canny [fef5e48e], Weight: 1.0, Resize Mode: Crop "
        "and Resize, Low Vram: False, Guidance Start: 0.0, Guidance End: 1.0, Pixel Perfect: "
        "False, Control Mode: Balanced"
    )
    info = format_parameters(
        "a cat", steps=4, sampler="Euler", cfg_scale=4, seed=1, width=W, height=H,
        extra={"ControlNet 0": text, "ControlNet 1": text.replace("Balanced", "ControlNet is "
               "more important").replace("Crop and Resize", "Resize and Fill")},
    )  # fmt: skip
    assert 'ControlNet 0: "Module: canny, Model: control_sd15_canny [fef5e48e], ' in info
    units = units_of(parse_parameters(info)["extra"])
    assert units[0] == dict(
        model="control_sd15_canny", hash="fef5e48e", preprocess="canny", resize="crop",
        guess_mode=False, weight=1.0, start=0.0, end=1.0,
    )  # fmt: skip
    assert units[1]["guess_mode"] and units[1]["resize"] == "fill"
    with pytest.raises(ConfigError, match="not supported"):
        units_of({"ControlNet 0": text.replace("Balanced", "My prompt is more important")})


# ---------------------------------------------------------------------------- API and CLI


@pytest.fixture(scope="module")
def files(tmp_path_factory, model, net):
    root = tmp_path_factory.mktemp("cn")
    (root / "cn").mkdir()
    save_controlnet(net, root / "cn" / "tiny_canny.safetensors")
    save_model(model, root / "tiny.safetensors")
    _square(48).resize((W, H)).save(root / "edges.png")
    return root


def test_api_records_units_and_replays(model, files):
    pipe = Pipeline(model, name="tiny", options=LoadOptions(controlnet_dir=files / "cn"))
    unit = Control("tiny_canny", files / "edges.png", weight=0.8, preprocess="canny", end=0.75)
    settings = dict(steps=4, sampler="euler", width=W, height=H, seed=3, cfg=4.0)
    result = pipe("the cat", control=unit, **settings)
    digest = legacy_model_hash(files / "cn" / "tiny_canny.safetensors")
    assert (
        f'ControlNet 0: "Module: canny, Model: tiny_canny [{digest}], Weight: 0.8, Resize Mode: '
        "Crop and Resize, Low Vram: False, Guidance Start: 0.0, Guidance End: 0.75, "
        'Pixel Perfect: False, Control Mode: Balanced"'
    ) in result.infotext
    plain = pipe("the cat", **settings)
    assert np.abs(np.asarray(result.images[0], float) - np.asarray(plain.images[0])).max() > 5
    with pytest.raises(ConfigError, match="control image again") as e:
        pipe.replay(result.infotext)
    assert "control_images" in str(e.value)
    again = pipe.replay(result.infotext, control_images=files / "edges.png")
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(result.images[0]))
    paths = result.save(files / "api.png", hints=True)
    assert [p.name for p in paths] == ["api.png", "api_control0.png"]
    hint = np.asarray(Image.open(paths[1]))
    assert hint.shape == (H, W, 3) and set(np.unique(hint)) == {0, 255}


def test_pixel_models_refuse_control(net):
    unet = UNet(dataclasses.replace(UNET, in_channels=1, out_channels=1, context_dim=None))
    pipe = Pipeline(PixelDiffusion(unet, NoiseSchedule.cosine(100), image_size=8))
    with pytest.raises(ConfigError, match="for latent models"):
        pipe(control=Control(net, np.zeros((8, 8), np.uint8)), steps=2)


def test_cli_generate_and_from_png(files, capsys):
    out = files / "cli.png"
    args = ["generate", "the cat", "--model", str(files / "tiny.safetensors"), "--steps", "3"]
    args += ["--sampler", "euler", "--size", f"{W}x{H}", "--out", str(out)]
    unit = ["--controlnet", "tiny_canny", "--controlnet-dir", str(files / "cn")]
    unit += ["--control-image", str(files / "edges.png"), "--preprocess", "canny"]
    assert main([*args, *unit, "--control-weight", "0.9", "--guess-mode", "--save-hint"]) == 0
    assert (files / "cli_control0.png").is_file()
    info = Image.open(out).text["parameters"]
    assert "Weight: 0.9" in info and "Control Mode: ControlNet is more important" in info
    again = files / "again.png"
    replay = ["generate", "--model", str(files / "tiny.safetensors"), "--from-png", str(out)]
    replay += ["--controlnet-dir", str(files / "cn"), "--out", str(again)]
    capsys.readouterr()
    assert main(replay) == 2
    assert "--control-image" in capsys.readouterr().err
    assert main([*replay, "--control-image", str(files / "edges.png")]) == 0
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(out)))
    bad = [*args, *unit, "--control-weight", "1", "--control-weight", "0.5", "--overwrite"]
    assert main(bad) == 2
    assert "--control-weight was given 2 times for 1 --controlnet" in capsys.readouterr().err
