"""`noisecraft convert` and `generate --model` on every format (issue: real SD checkpoints).

A tiny random Stable Diffusion pipeline is built with diffusers and saved as a folder; the
CLI converts it folder -> single file -> diffusers folder -> native file, and each hop must
keep every tensor bit for bit. `generate` on the folder and on the single file must give
diffusers' own image for the same prompt, seed and scheduler (DDIM: diffusers' scheduler
rules come from the folder's scheduler config, and from SD 1.5's for a single file).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from noisecraft.cli.main import main
from noisecraft.io.formats.auto import detect_format, load_any
from noisecraft.pipelines.diffusers_schedulers import SD15_SCHEDULER_CONFIG
from test_diffusers_folder import H, W, _build_pipeline

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sd1")
    pipe = _build_pipeline("sd1", tmp)
    # the scheduler SD 1.5's folder ships (PNDM with clip_sample false, steps_offset 1, ...)
    pipe.scheduler = diffusers.PNDMScheduler.from_config(dict(SD15_SCHEDULER_CONFIG))
    pipe.save_pretrained(str(tmp / "model"))
    return pipe, tmp / "model"


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    rc = main(args)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _state(model) -> dict[str, torch.Tensor]:
    out = {}
    for prefix, module in (("unet.", model.unet), ("vae.", model.vae), ("te.", model.text_encoder)):
        out.update({prefix + k: v for k, v in module.state_dict().items()})
    return out


def test_convert_every_direction_is_bit_exact(folder, tmp_path, capsys):
    _, src = folder
    single, back, native = tmp_path / "m.safetensors", tmp_path / "back", tmp_path / "n.safetensors"
    for args in (
        [str(src), str(single), "--to", "single-file"],
        [str(single), str(back), "--to", "diffusers"],
        [str(back), str(native), "--to", "noisecraft"],
    ):
        rc, out, err = _run(["convert", *args], capsys)
        assert rc == 0, err
        assert "converted" in out
    assert [detect_format(p) for p in (src, single, back, native)] == [
        "diffusers",
        "single-file",
        "diffusers",
        "noisecraft",
    ]
    models = [load_any(p) for p in (src, single, back, native)]
    ref = _state(models[0])
    for m in models[1:]:
        got = _state(m)
        assert got.keys() == ref.keys()
        assert all(torch.equal(got[k], ref[k]) for k in ref)
        assert m.unet.config == models[0].unet.config
        assert m.prediction == models[0].prediction
        assert m.vae.config.scaling_factor == models[0].vae.config.scaling_factor
        assert torch.equal(m.schedule.betas, models[0].schedule.betas)
    # a second convert to the same place is refused; --overwrite replaces
    rc, _, err = _run(["convert", str(src), str(single), "--to", "single-file"], capsys)
    assert rc == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1
    rc, _, err = _run(
        ["convert", str(src), str(single), "--to", "single-file", "--overwrite"], capsys
    )
    assert rc == 0, err


def _diffusers_ddim(pipe, prompt: str, seed: int, steps: int) -> np.ndarray:
    pipe = diffusers.StableDiffusionPipeline(
        **{
            **pipe.components,
            "scheduler": diffusers.DDIMScheduler.from_config(pipe.scheduler.config),
        }
    )
    with torch.no_grad():
        image = pipe(
            prompt=prompt,
            negative_prompt="a dog",
            num_inference_steps=steps,
            guidance_scale=7.5,
            generator=torch.Generator().manual_seed(seed),
            height=H,
            width=W,
            output_type="np",
        ).images[0]
    return np.round(image * 255)


@pytest.mark.parametrize("fmt", ["diffusers", "single-file"])
def test_generate_from_folder_and_single_file_equals_diffusers_ddim(folder, fmt, tmp_path, capsys):
    pipe, src = folder
    model = src
    if fmt == "single-file":
        model = tmp_path / "m.safetensors"
        assert _run(["convert", str(src), str(model), "--to", "single-file"], capsys)[0] == 0
    out = tmp_path / "cat.png"
    args = ["generate", "a cat", "--model", str(model), "--negative", "a dog", "--sampler", "ddim"]
    args += ["--steps", "8", "--seed", "5", "--cfg", "7.5", "--size", f"{W}x{H}", "--out", str(out)]
    rc, _, err = _run(args, capsys)
    assert rc == 0, err
    ours = np.asarray(Image.open(out).convert("RGB")).astype(np.float64)
    want = _diffusers_ddim(pipe, "a cat", 5, 8)
    assert ours.std() > 10  # not a flat image
    assert np.abs(ours - want).max() <= 2


def test_vae_override_from_a_separate_file(folder, tmp_path):
    _, src = folder
    model = load_any(src)
    vae_file = tmp_path / "vae.safetensors"
    jittered = {k: v + 0.01 for k, v in model.vae.state_dict().items()}
    save_file(jittered, str(vae_file))
    swapped = load_any(src, vae=vae_file)
    assert all(torch.equal(swapped.vae.state_dict()[k], jittered[k]) for k in jittered)
    unet_before, unet_after = model.unet.state_dict(), swapped.unet.state_dict()
    assert all(torch.equal(unet_after[k], unet_before[k]) for k in unet_before)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_bytes(b"not a model at all" * 10), "not a .safetensors file"),
        (
            lambda p: save_file(
                {"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(4, 8)}, str(p)
            ),
            "LoRA",
        ),
    ],
    ids=["random-bytes", "lora"],
)
def test_bad_model_files_are_one_line_errors(make, message, tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    make(bad)
    rc, _, err = _run(
        ["generate", "a cat", "--model", str(bad), "--out", str(tmp_path / "x.png")], capsys
    )
    assert rc == 2
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1
    assert message in err and "bad.safetensors" in err


def test_missing_tokenizer_folder_and_bad_size(folder, tmp_path, capsys):
    import shutil

    _, src = folder
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    shutil.rmtree(broken / "tokenizer")
    rc, _, err = _run(
        ["generate", "a cat", "--model", str(broken), "--out", str(tmp_path / "x.png")], capsys
    )
    assert rc == 2 and "tokenizer" in err and len(err.strip().splitlines()) == 1
    args = [
        "generate",
        "a cat",
        "--model",
        str(src),
        "--size",
        "60x48",
        "--out",
        str(tmp_path / "y.png"),
    ]
    rc, _, err = _run(args, capsys)
    assert rc == 2 and "60" in err and len(err.strip().splitlines()) == 1


def test_arch_override_errors(folder, tmp_path, capsys):
    """--arch is for SD single files (tests/test_single_file.py checks what it changes); a
    folder states its config, and an unknown family is a one-line error."""
    from noisecraft.errors import ConfigError

    _, src = folder
    with pytest.raises(ConfigError, match="arch applies to SD single files"):
        load_any(src, arch="sd2")
    single = tmp_path / "m.safetensors"
    assert _run(["convert", str(src), str(single), "--to", "single-file"], capsys)[0] == 0
    args = [
        "generate",
        "a",
        "--model",
        str(single),
        "--arch",
        "sd3",
        "--out",
        str(tmp_path / "x.png"),
    ]
    rc, _, err = _run(args, capsys)
    assert rc == 2 and "sd1, sd2" in err and len(err.strip().splitlines()) == 1
