"""AUTOMATIC1111 ``parameters`` text: exact layout, round trips, sampler names, errors."""

from __future__ import annotations

import pytest

from noisecraft.errors import ConfigError, NoisecraftError
from noisecraft.pipelines.png_params import (
    A1111_SAMPLER_NAMES,
    format_parameters,
    parse_parameters,
    quote,
    sampler_display,
    sampler_from_display,
    unquote,
)
from noisecraft.samplers import SAMPLERS

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


def test_sampler_names_round_trip():
    assert set(A1111_SAMPLER_NAMES) == set(SAMPLERS)
    for name in SAMPLERS:
        for spacing in (None, "karras", "exponential", "leading", "trailing"):
            display, schedule = sampler_display(name, spacing)
            assert sampler_from_display(display, schedule) == (name, spacing)
    assert sampler_display("DPM++ 2M Karras") == ("DPM++ 2M", "Karras")
    assert sampler_display("euler_a") == ("Euler a", None)
    # older A1111 infotexts put the schedule into the sampler name
    assert sampler_from_display("DPM++ 2M Karras") == ("dpmpp_2m", "karras")
    assert sampler_from_display("DPM++ 2M", "Automatic") == ("dpmpp_2m", None)
    assert sampler_from_display("Euler", "Uniform") == ("euler", "linspace")


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
        sampler_from_display("DPM2 a")
