"""Sampler records and the parsed sampler choice: A1111's per-sampler defaults, the grid a
request samples on, diffusers configs governing, and one parse per CLI call."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from noisecraft.api.shipped import resolve_model
from noisecraft.cli.main import main
from noisecraft.diffusion import NoiseSchedule, make_sigmas
from noisecraft.errors import NoisecraftError
from noisecraft.io.native import load_latent_diffusion
from noisecraft.models import PixelDiffusion
from noisecraft.models.unet import UNet, UNetConfig
from noisecraft.pipelines import GenerateRequest, count_steps, generate
from noisecraft.pipelines.diffusers_schedulers import SD15_SCHEDULER_CONFIG
from noisecraft.samplers import RECORDS, parse_sampler
from noisecraft.samplers import registry as registry_module
from noisecraft.viz.images import to_uint8

SD = NoiseSchedule.scaled_linear(1000)

#: AUTOMATIC1111's k-diffusion sampler table (webui 1.9+, modules/sd_samplers_kdiffusion.py
#: ``samplers_k_diffusion``): name -> (function, scheduler option, discard_next_to_last_sigma,
#: brownian_noise). No scheduler option = the model's default grid (noisecraft: linspace).
A1111_TABLE = {
    "DPM++ 2M": ("sample_dpmpp_2m", "karras", False, False),
    "DPM++ SDE": ("sample_dpmpp_sde", "karras", False, True),
    "DPM++ 2M SDE": ("sample_dpmpp_2m_sde", "exponential", False, True),
    "DPM++ 2M SDE Heun": ("sample_dpmpp_2m_sde", "exponential", False, True),
    "DPM++ 2S a": ("sample_dpmpp_2s_ancestral", "karras", False, False),
    "DPM++ 3M SDE": ("sample_dpmpp_3m_sde", "exponential", True, True),
    "Euler a": ("sample_euler_ancestral", "linspace", False, False),
    "Euler": ("sample_euler", "linspace", False, False),
    "LMS": ("sample_lms", "linspace", False, False),
    "Heun": ("sample_heun", "linspace", False, False),
    "DPM2": ("sample_dpm_2", "karras", True, False),
    "DPM2 a": ("sample_dpm_2_ancestral", "karras", True, False),
}


def test_records_follow_a1111s_table():
    by_display = {r.display: r for r in RECORDS}
    for display, (function, schedule, discard, brownian) in A1111_TABLE.items():
        r = by_display[display]
        assert (r.k_diffusion, r.default_schedule) == (function, schedule), display
        assert (r.discard_penultimate_sigma, r.brownian_noise) == (discard, brownian), display
    # A1111's timestep samplers (and DDPM, which it lacks) keep the model's default grid
    for display in ("DDIM", "PLMS", "UniPC", "DDPM"):
        r = by_display[display]
        assert (r.default_schedule, r.discard_penultimate_sigma) == ("linspace", False)


@pytest.mark.parametrize(
    "spellings",
    [
        ("dpmpp_2m", "DPM++ 2M", "k_dpmpp_2m", "dpm_solver_pp_2m"),
        ("dpmpp_3m_sde", "DPM++ 3M SDE", "k_dpmpp_3m_sde", "dpmpp-3m-sde"),
        ("euler_ancestral", "Euler a", "k_euler_a", "k_euler_ancestral", "euler_a"),
        ("dpm2_ancestral", "DPM2 a", "k_dpm_2_a", "dpm_2_ancestral"),
    ],
)
def test_every_spelling_means_the_same_choice(spellings):
    specs = [parse_sampler(s) for s in spellings]
    assert all(s == specs[0] for s in specs)
    assert specs[0].explicit_schedule is None


def test_automatic_is_the_a1111_default_and_an_explicit_schedule_wins():
    steps = 12
    spec = parse_sampler("dpmpp_2m")
    assert spec.schedule == "karras" and not spec.discard_penultimate_sigma
    assert torch.equal(spec.sigmas(SD, steps), make_sigmas(SD, steps, "karras"))
    # DPM++ 3M SDE: exponential, built for steps + 1, the next-to-last sigma dropped
    spec = parse_sampler("DPM++ 3M SDE")
    full = make_sigmas(SD, steps + 1, "exponential")
    sigmas = spec.sigmas(SD, steps)
    assert torch.equal(sigmas, torch.cat([full[:-2], full[-1:]]))
    assert len(sigmas) == steps + 1 and float(sigmas[-2]) > float(full[-2])
    # an explicit schedule wins over the default; the discard rule stays (as in A1111)
    for choice in (parse_sampler("DPM++ 3M SDE Karras"), parse_sampler("dpmpp_3m_sde", "karras")):
        assert choice.explicit_schedule == "karras"
        full = make_sigmas(SD, steps + 1, "karras")
        assert torch.equal(choice.sigmas(SD, steps), torch.cat([full[:-2], full[-1:]]))
    assert parse_sampler("DPM++ 2M Karras", "linspace").schedule == "linspace"
    assert parse_sampler("dpmpp_2m", "Uniform").schedule == "linspace"  # A1111's label
    assert parse_sampler("dpmpp_2m", "Automatic").schedule == "karras"
    assert parse_sampler("euler").schedule == "linspace"
    with pytest.raises(NoisecraftError, match="schedule type"):
        parse_sampler("euler", "polyexponential")


def test_unknown_sampler_lists_the_a1111_names():
    with pytest.raises(NoisecraftError) as err:
        parse_sampler("DPM fast")
    message = str(err.value)
    assert "\n" not in message
    for r in RECORDS:
        assert r.name in message and r.display.lower() in message.lower()


def test_listing_shows_a1111_names_and_default_schedules(capsys):
    assert main(["samplers"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for r in RECORDS:
        (line,) = [x for x in lines if x.split()[:1] == [r.name]]
        assert r.display in line and r.default_schedule in line


# ------------------------------------------------------------------ requests


@pytest.fixture(scope="module")
def pixel():
    torch.manual_seed(0)
    unet = UNet(
        UNetConfig(model_channels=8, channel_mult=(1, 2), attention_levels=(1,), norm_groups=4)
    )
    return PixelDiffusion(unet, NoiseSchedule.linear(200), image_size=8)


def _sigmas_run(model, **req) -> list[float]:
    seen: list[float] = []
    request = GenerateRequest(n=1, seed=0, **req)
    generate(model, request, callback=lambda d: seen.append(float(d["sigma"])))
    assert len(seen) == count_steps(model, request) == request.steps
    return seen


@pytest.mark.parametrize("sampler", ["DPM++ 3M SDE", "dpmpp_2m", "DPM2 a", "Euler a"])
def test_request_samples_on_the_specs_grid(pixel, sampler):
    spec = parse_sampler(sampler)
    want = spec.sigmas(pixel.schedule, 6)[:-1].tolist()
    assert _sigmas_run(pixel, sampler=sampler, steps=6) == pytest.approx(want)
    linspace = make_sigmas(pixel.schedule, 6, "linspace")[:-1].tolist()
    got = _sigmas_run(pixel, sampler=sampler, steps=6, spacing="linspace")
    if spec.discard_penultimate_sigma:
        assert got != pytest.approx(linspace)  # linspace, still with the discard rule
    else:
        assert got == pytest.approx(linspace)


def test_request_parses_its_sampler_once():
    req = GenerateRequest(sampler="DPM++ 2M", spacing="exponential")
    assert req.spec is req.spec and req.spec == parse_sampler("dpmpp_2m", "exponential")
    given = parse_sampler("dpm2")
    assert GenerateRequest(sampler=given).spec is given
    assert GenerateRequest(sampler=given, spacing="karras").spec.explicit_schedule == "karras"


def test_a_diffusers_config_governs_the_grid():
    """With a scheduler config, "Automatic" is the config's grid (no Karras default, no
    discard): diffusers' image for the same seed, as before."""
    for name in ("dpmpp_2m", "DPM++ 2M SDE", "DPM++ 3M SDE Exponential", "euler"):
        assert parse_sampler(name).schedule != "linspace" or name == "euler"
    for name in ("dpmpp_2m", "DPM++ 2M SDE", "euler"):  # A1111: karras, exponential, -
        req = GenerateRequest(sampler=name, scheduler_config=SD15_SCHEDULER_CONFIG)
        assert req.diffusers_sampling().spacing == "linspace"  # SD 1.5's config: linspace
    req = GenerateRequest(sampler="DPM++ 2M Karras", scheduler_config=SD15_SCHEDULER_CONFIG)
    assert req.diffusers_sampling().spacing == "karras"
    sde = registry_module.REGISTRY["dpmpp_2m_sde_heun"]
    assert dict(sde.diffusers_scheduler.config)["solver_type"] == "heun"
    heun = GenerateRequest(sampler="DPM++ 2M SDE Heun", scheduler_config=SD15_SCHEDULER_CONFIG)
    assert dict(heun.diffusers_sampling().options) == {"solver_type": "heun"}


def test_cli_generate_parses_the_sampler_once(monkeypatch, tmp_path, capsys):
    calls = []
    normalize = registry_module.normalize
    monkeypatch.setattr(registry_module, "normalize", lambda n: calls.append(n) or normalize(n))
    out = tmp_path / "four.png"
    args = ["generate", "a handwritten 4", "--sampler", "DPM++ 3M SDE", "--steps", "2"]
    assert main([*args, "--out", str(out)]) == 0
    assert calls == ["DPM++ 3M SDE"]
    assert out.exists()


def test_a_noisecraft_010_png_replays_to_its_image(tmp_path, capsys):
    """A PNG of noisecraft 0.1.0 has no Schedule type: it was sampled on linspace without
    the discard rule, and --from-png gives that image again (DPM++ 3M SDE, whose A1111 grid
    is another one)."""
    text = (
        "a handwritten 4\nSteps: 6, Sampler: DPM++ 3M SDE, CFG scale: 7.0, Seed: 3, "
        "Size: 32x32, Model: mnist-text, Version: noisecraft 0.1.0"
    )
    info = PngInfo()
    info.add_text("parameters", text)
    old, replay = tmp_path / "old.png", tmp_path / "replay.png"
    Image.new("L", (32, 32)).save(old, pnginfo=info)  # a replay reads only the parameters
    assert main(["generate", "--from-png", str(old), "--out", str(replay)]) == 0

    model = load_latent_diffusion(resolve_model("mnist-text"))
    req = dict(n=1, prompts=["a handwritten 4"], steps=6, cfg=7.0, seed=3)
    legacy = parse_sampler("dpmpp_3m_sde", "linspace", discard_penultimate_sigma=False)
    want = to_uint8(generate(model, GenerateRequest(sampler=legacy, **req)))[0].squeeze(-1)
    assert np.array_equal(np.asarray(Image.open(replay)), want)
    a1111 = to_uint8(generate(model, GenerateRequest(sampler="DPM++ 3M SDE", **req)))[0]
    assert not np.array_equal(a1111.squeeze(-1), want)
