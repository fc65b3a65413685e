"""The public Python API (noisecraft.load -> Pipeline) and the CLI as a thin shell over it.

The CLI and the API must write byte-identical PNGs for the same settings (one policy, two
surfaces), in every mode: text-to-image, img2img, inpainting, fast mode, low-memory int8 and
replaying a PNG's parameters.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import noisecraft
from noisecraft.cli.main import main
from noisecraft.errors import ConfigError, NoisecraftError
from noisecraft.io.native import save_model
from noisecraft.pipelines import GenerateRequest, generate
from noisecraft.pipelines.png_params import parse_parameters
from test_latent_pipeline import tiny_model

COMMON = {"steps": 3, "sampler": "euler", "width": 64, "height": 48}
COMMON_ARGS = ["--steps", "3", "--sampler", "euler", "--size", "64x48"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    save_model(tiny_model(), root / "tiny.safetensors")
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(root / "init.png")
    mask = np.zeros((48, 64), dtype=np.uint8)
    mask[:, 40:] = 255
    Image.fromarray(mask).save(root / "mask.png")
    return root


@pytest.fixture(scope="module")
def pipe(files):
    return noisecraft.load(files / "tiny.safetensors")


def _cli(args: list[str], capsys) -> tuple[int, str]:
    rc = main(args)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize(
    ("mode", "load", "call", "args"),
    [
        ("txt2img", {}, {"seed": 5, "n": 2, "cfg": 3.0}, ["--seed", "5", "--n", "2", "--cfg", "3"]),
        (
            "img2img",
            {},
            {"init_image": "init.png", "strength": 0.6, "negative_prompt": "a dog"},
            ["--init", "{init.png}", "--strength", "0.6", "--negative", "a dog"],
        ),
        (
            "inpaint",
            {},
            {"init_image": "init.png", "mask": "mask.png", "sampler": "Euler a"},
            ["--init", "{init.png}", "--mask", "{mask.png}", "--sampler", "Euler a"],
        ),
        ("fast", {"fast": True}, {}, ["--fast"]),
        ("lowmem", {"low_memory": "int8"}, {}, ["--low-memory", "int8"]),
    ],
)
def test_cli_and_api_write_identical_pngs(files, tmp_path, capsys, mode, load, call, args):
    call = {k: files / v if k in ("init_image", "mask") else v for k, v in call.items()}
    args = [re.sub(r"\{(.+)\}", lambda m: str(files / m[1]), a) for a in args]
    api_pipe = noisecraft.load(files / "tiny.safetensors", **load)
    written = api_pipe("a cat", **{**COMMON, **call}).save(tmp_path / "api.png")
    cli_out = tmp_path / "cli.png"
    model = ["--model", str(files / "tiny.safetensors")]
    rc, err = _cli(
        ["generate", "a cat", *model, *COMMON_ARGS, *args, "--out", str(cli_out)], capsys
    )
    assert rc == 0, err
    cli_written = sorted(tmp_path.glob("cli*.png"))
    assert len(cli_written) == len(written) >= 1
    for a, b in zip(written, cli_written, strict=True):
        assert a.read_bytes() == b.read_bytes(), (mode, a, b)
        assert np.asarray(Image.open(a)).std() > 5  # a picture, not a flat image


def test_replay_and_from_png_write_identical_pngs(files, pipe, tmp_path, capsys):
    result = pipe("a (cat:1.2) BREAK the dog", seed=11, n=2, cfg=4.0, **COMMON)
    first, second = result.save(tmp_path / "made.png")
    again = pipe.replay(second).save(tmp_path / "api_again.png")[0]
    rc, err = _cli(
        ["generate", "--from-png", str(second), "--model", str(files / "tiny.safetensors"),
         "--out", str(tmp_path / "cli_again.png")],
        capsys,
    )  # fmt: skip
    assert rc == 0, err
    assert again.read_bytes() == (tmp_path / "cli_again.png").read_bytes()
    # the second image of a batch, made alone from its infotext: same seed, same parameters
    assert Image.open(again).text["parameters"] == result.infotexts[1]
    diff = np.abs(np.asarray(Image.open(again), int) - np.asarray(result.images[1], int))
    assert diff.max() <= 1  # batched vs single float rounding, at most one level
    # the text itself and a PIL image work as sources too, and overrides win
    assert pipe.replay(result.infotexts[1]).seeds == [12]
    assert pipe.replay(Image.open(first), seed=3).seeds == [3]


def test_result_has_images_seeds_and_infotexts(pipe):
    result = pipe("a cat", seed=7, n=3, **COMMON)
    assert [im.size for im in result.images] == [(64, 48)] * 3
    assert result.seeds == [7, 8, 9]
    params = [parse_parameters(t) for t in result.infotexts]
    assert [p["seed"] for p in params] == [7, 8, 9]
    assert params[0]["prompt"] == "a cat" and params[0]["model"] == "tiny"
    assert result.infotext == result.infotexts[0]
    # the PIL images are the tensors rounded as diffusers rounds them
    want = ((result.tensors[0] / 2 + 0.5).clamp(0, 1) * 255).round().permute(1, 2, 0).byte()
    assert np.array_equal(np.asarray(result.images[0]), want.numpy())


def test_a_list_of_prompts_makes_one_image_each(pipe):
    result = pipe(["a cat", "the dog"], seed=3, **COMMON)
    assert result.seeds == [3, 4]
    assert [parse_parameters(t)["prompt"] for t in result.infotexts] == ["a cat", "the dog"]
    alone = pipe("the dog", seed=4, **COMMON).tensors[0]
    assert (alone - result.tensors[1]).abs().max() < 1e-4  # batched vs single float rounding


def test_seed_minus_one_draws_a_seed_and_records_it(pipe):
    result = pipe("a cat", seed=-1, n=2, **COMMON)
    seed = result.seeds[0]
    assert 0 <= seed < 2**32 and result.seeds == [seed, seed + 1]
    assert parse_parameters(result.infotexts[1])["seed"] == seed + 1
    again = pipe("a cat", seed=seed, n=2, **COMMON)
    assert torch.equal(again.tensors, result.tensors)


def test_images_may_be_pil_paths_arrays_or_tensors(files, pipe):
    im = Image.open(files / "init.png")
    arr = np.asarray(im)
    tensor = torch.from_numpy(arr.astype(np.float32)).permute(2, 0, 1) / 127.5 - 1
    outs = [
        pipe("a cat", init_image=x, strength=0.5, seed=1, steps=3, sampler="euler").tensors
        for x in (im, files / "init.png", str(files / "init.png"), arr, tensor)
    ]
    for out in outs[1:]:
        assert torch.equal(out, outs[0])
    with pytest.raises(ConfigError, match="init_image as a tensor must be float"):
        pipe("a cat", init_image=torch.zeros(2, 48, 64), strength=0.5)
    with pytest.raises(ConfigError, match="init_image .*absent.png not found"):
        pipe("a cat", init_image=files / "absent.png", strength=0.5)


def test_stochastic_batch_equals_images_made_alone(pipe):
    """Per-image generators reach the sampler as a list, so a stochastic sampler runs the
    whole batch at once and still gives each image its own seed's noise."""
    batch = pipe("a cat", seed=20, n=3, **{**COMMON, "sampler": "Euler a"})
    for i in range(3):
        alone = pipe("a cat", seed=20 + i, **{**COMMON, "sampler": "Euler a"})
        assert (alone.tensors[0] - batch.tensors[i]).abs().max() < 1e-4


def test_clip_skip_per_call(pipe):
    one = pipe("a cat", seed=1, **COMMON)
    two = pipe("a cat", seed=1, clip_skip=2, **COMMON)
    assert (one.tensors - two.tensors).abs().max() > 1e-3
    assert parse_parameters(two.infotext)["clip_skip"] == 2
    assert torch.equal(pipe.replay(two.infotext).tensors, two.tensors)
    with pytest.raises(ConfigError, match=r"clip_skip must be an integer in \[1, 2\]"):
        pipe("a cat", clip_skip=3, **COMMON)


def test_api_matches_the_core(pipe):
    """The Pipeline adds policy, not arithmetic: its tensors are generate()'s."""
    result = pipe("a cat", negative_prompt="a dog", seed=4, n=2, cfg=3.0, **COMMON)
    req = GenerateRequest(
        n=2,
        prompts=["a cat"],
        negative_prompt="a dog",
        seeds=[4, 5],
        cfg=3.0,
        steps=3,
        sampler="euler",
        width=64,
        height=48,
    )
    assert torch.equal(result.tensors, generate(pipe.model, req))


def test_errors_name_the_setting_and_the_cli_shows_the_flag(files, pipe, tmp_path, capsys):
    cases = [  # (API settings, API message, CLI flags, CLI message)
        ({"n": 0}, "n must be at least 1", ["--n", "0"], "--n must be at least 1"),
        ({"steps": 0}, "steps must be at least 1", ["--steps", "0"], "--steps must be"),
        (
            {"strength": 0.5},
            "strength needs init_image",
            ["--strength", "0.5"],
            "--strength needs --init",
        ),
        (
            {"class_label": 1},
            "takes prompt, not class_label",
            ["--class", "1"],
            "takes a prompt, not --class",
        ),
        (
            {"guidance_rescale": 2.0},
            "guidance_rescale must be in",
            ["--guidance-rescale", "2"],
            "--guidance-rescale must be in",
        ),
    ]
    model = ["--model", str(files / "tiny.safetensors")]
    for settings, api_msg, args, cli_msg in cases:
        with pytest.raises(NoisecraftError) as e:
            pipe("a cat", **settings)
        assert api_msg in str(e.value) and "--" not in str(e.value), str(e.value)
        rc, err = _cli(
            ["generate", "a cat", *model, *args, "--out", str(tmp_path / "x.png")], capsys
        )
        assert rc == 2 and cli_msg in err and err.count("\n") == 1, err
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"seed": 2**64}, r"seed must be in \[0, 2\^64\)"),
        ({"seed": -2}, r"seed must be in \[0, 2\^64\)"),
        ({"seed": "7"}, "seed must be an integer"),
        ({"cfg": float("nan")}, "cfg must be a finite number"),
        ({"cfg": float("inf")}, "cfg must be a finite number"),
        ({"n": 1.5}, "n must be an integer"),
        ({"steps": "3"}, "steps must be an integer"),
    ],
)
def test_bad_numbers_are_refused_before_any_work(pipe, settings, match):
    with pytest.raises(ConfigError, match=match):
        pipe("a cat", **settings)


def test_replay_of_img2img_needs_the_init_image(files, pipe):
    made = pipe("a cat", init_image=files / "init.png", strength=0.5, **COMMON)
    with pytest.raises(ConfigError, match="made by img2img.*give the same init_image"):
        pipe.replay(made.infotext)
    again = pipe.replay(made.infotext, init_image=files / "init.png")
    assert torch.equal(again.tensors, made.tensors)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"compile": True, "fast": True}, "compile does not mix with fast"),
        ({"low_memory": "int8", "dtype": "fp16"}, "low_memory runs on the CPU in fp32"),
        ({"low_memory": "int4"}, "unknown low_memory 'int4'"),
        ({"dtype": "fp8"}, "unknown dtype 'fp8'"),
        ({"threads": -1}, "threads must be 0"),
        ({"device": "tpu"}, "device must be cpu or cuda"),
    ],
)
def test_load_options_are_checked_before_loading(options, match):
    with pytest.raises(NoisecraftError, match=match):
        noisecraft.load("no-such-file.safetensors", **options)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_a_gpu_is_one_line():
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        noisecraft.load(device="cuda")


def test_class_model_through_the_api(tmp_path):
    pipe = noisecraft.load("mnist")
    result = pipe(class_label=[3, 7], n=2, steps=4, seed=2)
    assert parse_parameters(result.infotexts[1])["extra"]["Class"] == "7"
    assert pipe.defaults()["cfg"] == 2.0
    assert torch.equal(pipe.replay(result.infotexts[1]).tensors[0], result.tensors[1])
    with pytest.raises(ConfigError, match="takes class_label, not prompt"):
        pipe("a seven")


def test_readme_python_section_runs(tmp_path, monkeypatch):
    """The README's "Python" section, run as it is (in a scratch folder)."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## Python", 1)[1].split("\n## ", 1)[0]
    code = re.findall(r"```python\n(.*?)```", section, re.S)
    assert code, "README has no ```python block under '## Python'"
    monkeypatch.chdir(tmp_path)
    for block in code:
        exec(compile(block, "README.md", "exec"), {})
    assert sorted(p.name for p in tmp_path.glob("*.png"))


def test_a_vae_given_as_the_model_points_to_the_vae_setting(tmp_path, capsys):
    from safetensors.torch import save_file

    from noisecraft.models.vae import AutoencoderKL, VAEConfig

    vae = AutoencoderKL(VAEConfig(base_channels=8, channel_mult=(1, 2), norm_groups=4))
    path = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(path))
    with pytest.raises(NoisecraftError, match="is a VAE, not a whole model; pass it as vae$"):
        noisecraft.load(path)
    rc, err = _cli(
        ["generate", "a cat", "--model", str(path), "--out", str(tmp_path / "x.png")], capsys
    )
    assert rc == 2 and err.strip().endswith("is a VAE, not a whole model; pass it as --vae")
