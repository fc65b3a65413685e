"""AUTOMATIC1111 ``parameters`` text: exact layout, round trips, sampler names, errors."""

from __future__ import annotations

import pytest
import torch

from noisecraft import __version__
from noisecraft.diffusion import NoiseSchedule, make_sigmas
from noisecraft.errors import ConfigError, NoisecraftError
from noisecraft.pipelines.png_params import (
    format_parameters,
    parse_parameters,
    quote,
    sampler_display,
    sampler_from_display,
    unquote,
)
from noisecraft.samplers import SAMPLERS, parse_sampler

BASE = dict(steps=20, sampler="DPM++ 2M", cfg_scale=7.0, seed=1234, width=512, height=768)


def test_a1111_layout():
    text = format_parameters(
        "a photo of a cat",
        "blurry",
        **BASE,
        schedule_type="Karras",
        model="sd15",
        denoising_strength=0.6,
        version="v1.10.1",
    )
    assert text == (
        "a photo of a cat\n"
        "Negative prompt: blurry\n"
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.0, Seed: 1234, "
        "Size: 512x768, Model: sd15, Denoising strength: 0.6, Version: v1.10.1"
    )
    # no negative prompt: no "Negative prompt:" line; defaults are left out
    text = format_parameters("x", **BASE, clip_skip=1, guidance_rescale=0.0, version=None)
    assert text == "x\nSteps: 20, Sampler: DPM++ 2M, CFG scale: 7.0, Seed: 1234, Size: 512x768"


@pytest.mark.parametrize(
    ("prompt", "negative"),
    [
        ("a cat, sitting, (detailed:1.2)", "blurry, lowres"),
        ("line one\nline two, with a comma\nline: three", "neg one\nneg two"),
        ("no negative prompt here", ""),
        ("", "only a negative"),
        ("", ""),
        ("Steps: 3, Sampler: x, Seed: 4 looks like params", ""),
        ('quotes "inside" the prompt', 'and "here"'),
    ],
)
def test_round_trip(prompt, negative):
    kw = dict(
        BASE,
        schedule_type="Exponential",
        model="my model, v2: final",  # needs quoting
        denoising_strength=0.35,
        clip_skip=2,
        guidance_rescale=0.7,
        eta=0.5,
        extra={"Class": 3},
    )
    back = parse_parameters(format_parameters(prompt, negative, **kw))
    assert back["prompt"] == prompt and back["negative_prompt"] == negative
    for key in (
        "steps",
        "sampler",
        "cfg_scale",
        "seed",
        "width",
        "height",
        "schedule_type",
        "model",
        "denoising_strength",
        "clip_skip",
        "guidance_rescale",
        "eta",
    ):
        assert back[key] == kw[key], key
    assert back["extra"] == {"Class": "3"}
    assert back["version"].startswith("noisecraft ")


def test_parse_a1111_examples():
    a1111 = (
        "girl with an artist's beret, determined, blue eyes\n"
        "Negative prompt: ugly, fat, (((deformed))), [blurry]\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, "
        'Model hash: 45dee52b, Lora hashes: "a: 1, b: 2"'
    )
    p = parse_parameters(a1111)
    assert p["prompt"] == "girl with an artist's beret, determined, blue eyes"
    assert p["negative_prompt"] == "ugly, fat, (((deformed))), [blurry]"
    assert (p["steps"], p["sampler"], p["cfg_scale"], p["seed"]) == (20, "Euler a", 7.0, 965400086)
    assert (p["width"], p["height"]) == (512, 512)
    assert p["extra"] == {"Model hash": "45dee52b", "Lora hashes": "a: 1, b: 2"}
    assert "schedule_type" not in p and "denoising_strength" not in p
    # a text without a parameter line is all prompt
    assert parse_parameters("just a prompt\nover two lines")["prompt"] == (
        "just a prompt\nover two lines"
    )


def test_quote():
    assert quote("plain") == "plain" and quote(7.0) == "7.0"
    for text in ["a, b", "a: b", "a\nb", 'a "b", c']:
        assert quote(text).startswith('"') and unquote(quote(text)) == text


SD = NoiseSchedule.scaled_linear(1000)
OURS = f"noisecraft {__version__}"


def _replay(text: str):
    """The sampler choice a PNG's parameters text gives back."""
    p = parse_parameters(text)
    return sampler_from_display(
        p["sampler"],
        p.get("schedule_type"),
        version=p.get("version"),
        discard=p.get("discard_penultimate_sigma"),
    )


@pytest.mark.parametrize("diffusers", [False, True], ids=["native", "diffusers"])
def test_sampler_choice_round_trips_through_the_infotext(diffusers):
    """Every sampler, every schedule (and Automatic), with and without a forced discard
    rule: writing the infotext and reading it back gives the same grid (native) or the same
    explicit schedule (a diffusers config decides the rest)."""
    for name in SAMPLERS:
        for spacing in (None, "linspace", "karras", "exponential", "leading", "trailing"):
            for discard in (None, True, False):
                spec = parse_sampler(name, spacing, discard_penultimate_sigma=discard)
                display, schedule = sampler_display(spec, diffusers=diffusers)
                text = format_parameters(
                    "p",
                    **{**BASE, "sampler": display},
                    schedule_type=schedule,
                    discard_penultimate_sigma=spec.discard_note(diffusers),
                )
                back = _replay(text)
                assert back.name == name, text
                if diffusers:
                    assert back.explicit_schedule == spec.explicit_schedule, text
                else:
                    assert torch.equal(back.sigmas(SD, 7), spec.sigmas(SD, 7)), text


def test_schedule_type_is_written_as_a1111_writes_it():
    assert sampler_display("DPM++ 2M Karras") == ("DPM++ 2M", "Karras")
    assert sampler_display("dpmpp_2m") == ("DPM++ 2M", "Karras")  # Automatic = Karras
    assert sampler_display("dpmpp_2m", "linspace") == ("DPM++ 2M", "Uniform")
    assert sampler_display("DPM++ 3M SDE") == ("DPM++ 3M SDE", "Exponential")
    assert sampler_display("euler_a") == ("Euler a", None)  # the model default: nothing
    assert sampler_display("Euler", "linspace") == ("Euler", None)
    assert sampler_display("Euler", "karras") == ("Euler", "Karras")
    # a diffusers config chose the grid: only an explicit schedule is written
    assert sampler_display("dpmpp_2m", diffusers=True) == ("DPM++ 2M", None)
    assert sampler_display("dpmpp_2m", "linspace", diffusers=True) == ("DPM++ 2M", "Uniform")
    # older A1111 infotexts put the schedule into the sampler name
    assert sampler_from_display("DPM++ 2M Karras").explicit_schedule == "karras"
    assert sampler_from_display("DPM++ 2M", "Automatic").schedule == "karras"
    assert sampler_from_display("Euler", "Uniform").explicit_schedule == "linspace"
    assert sampler_from_display("DPM2 a", "Karras").name == "dpm2_ancestral"


@pytest.mark.parametrize("name", ["DPM++ 3M SDE", "DPM++ 2M", "DPM2", "Euler a"])
def test_noisecraft_010_pngs_without_schedule_type_replay_on_linspace(name):
    """PNGs of noisecraft 0.1.0 (before A1111's per-sampler defaults) wrote no Schedule type
    for the linspace grid they used for every sampler, never discarding a sigma: they keep
    replaying to that grid. The same text from A1111 means "Automatic"."""
    text = f"a 7\nSteps: 20, Sampler: {name}, CFG scale: 5.0, Seed: 3, Size: 32x32"
    old = _replay(text + ", Version: noisecraft 0.1.0")
    assert torch.equal(old.sigmas(SD, 20), make_sigmas(SD, 20, "linspace"))
    a1111 = _replay(text + ", Version: v1.10.1")
    assert a1111.explicit_schedule is None
    assert torch.equal(a1111.sigmas(SD, 20), parse_sampler(name).sigmas(SD, 20))
    if name != "Euler a":  # these have a default grid other than linspace
        assert not torch.equal(old.sigmas(SD, 20), a1111.sigmas(SD, 20))
    # an explicit schedule means the same to both
    both = [_replay(text + f", Schedule type: Karras, Version: {v}") for v in (OURS, "v1.9")]
    assert torch.equal(both[0].sigmas(SD, 20), both[1].sigmas(SD, 20))


def test_noisecraft_010_pngs_never_discard_a_sigma():
    """noisecraft before 0.2 ran DPM2 on the grid it wrote, without A1111's discard rule."""
    text = "a 7\nSteps: 20, Sampler: DPM2, Schedule type: Karras, CFG scale: 5.0, Seed: 3"
    old = _replay(text + ", Version: noisecraft 0.1.0")
    assert torch.equal(old.sigmas(SD, 20), make_sigmas(SD, 20, "karras"))
    new = _replay(text + ", Version: noisecraft 0.2.0")  # A1111's rule: DPM2 discards
    full = make_sigmas(SD, 21, "karras")
    assert torch.equal(new.sigmas(SD, 20), torch.cat([full[:-2], full[-1:]]))


def test_discard_penultimate_sigma_field():
    """A1111 writes "Discard penultimate sigma: True" when its setting forces the rule on."""
    text = "x\nSteps: 8, Sampler: Euler, CFG scale: 7, Seed: 1, Discard penultimate sigma: True"
    assert parse_parameters(text)["discard_penultimate_sigma"] is True
    spec = _replay(text)
    full = make_sigmas(SD, 9, "linspace")
    assert torch.equal(spec.sigmas(SD, 8), torch.cat([full[:-2], full[-1:]]))
    with pytest.raises(ConfigError, match="Discard penultimate sigma 'maybe' is not True"):
        parse_parameters(text.replace("True", "maybe"))


def test_errors_are_one_line():
    for text, match in [
        ("p\nSteps: many, Sampler: Euler, Seed: 1, Size: 8x8", "Steps 'many' is not an integer"),
        ("p\nSteps: 2, Sampler: Euler, Seed: 1, Size: big", "Size 'big' is not WIDTHxHEIGHT"),
        ("p\nSteps: 2, Sampler: Euler, CFG scale: x, Seed: 1", "CFG scale 'x' is not a number"),
    ]:
        with pytest.raises(ConfigError, match=match) as e:
            parse_parameters(text)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="Schedule type"):
        sampler_from_display("Euler", "Polyexponential")
    with pytest.raises(NoisecraftError, match="unknown sampler"):
        sampler_from_display("DPM fast")
