"""LoRAs through the public API and the CLI: load / unload / list, ``<lora:NAME:W>`` prompt
tags, the PNG parameters and their replay, fast (int8), low-memory and offload modes."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import noisecraft
from noisecraft.adapters import (
    AppliedLoRA,
    MergedLoRAs,
    lora_targets,
    read_lora,
    write_kohya_lora,
)
from noisecraft.api.loras import LoRAHashWarning, LoRATag, lora_spec, parse_lora_tags
from noisecraft.api.options import LoadOptions
from noisecraft.api.pipeline import Pipeline
from noisecraft.cli.main import main
from noisecraft.errors import CheckpointError, ConfigError, NoisecraftError
from noisecraft.io.native import save_model
from noisecraft.pipelines.png_params import parse_parameters
from test_latent_pipeline import tiny_model
from test_lora_adapters import KEYS, _trained
from test_lora_files import _sdxl_like

CALL = dict(steps=3, sampler="euler", seed=5, width=64, height=48)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_api")
    model = tiny_model()
    save_model(model, root / "tiny.safetensors")
    loras = root / "loras"
    (loras / "sub").mkdir(parents=True)
    write_kohya_lora(loras / "style.safetensors", _trained(model, KEYS, 1, std=1.0))
    write_kohya_lora(loras / "sub" / "ink.safetensors", _trained(model, KEYS[3:], 7, std=1.0))
    save_file(_sdxl_like(), str(root / "xl.safetensors"))
    return root


def _state(model) -> dict[str, torch.Tensor]:
    out = {}
    for part in ("unet", "text_encoder", "vae"):
        sd = getattr(model, part).state_dict()
        out.update({f"{part}.{k}": v.clone() for k, v in sd.items()})
    return out


def _same_state(a, b) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------- prompt tags
def test_parse_lora_tags_as_a1111():
    text, tags = parse_lora_tags(
        "a <lora:x> cat, <lora:y y:0.5> <lora:z:0.3:0.7><lyco:w:te=0.2:unet=2> <hypernet:h:1>"
    )
    assert text == "a  cat,   <hypernet:h:1>"  # removed, spaces kept; other types stay
    assert tags == [
        LoRATag("x", 1.0, 1.0),
        LoRATag("y y", 0.5, 0.5),
        LoRATag("z", 0.3, 0.7),
        LoRATag("w", 0.2, 2.0),
    ]
    for bad, said in (("<lora:x:heavy>", "not a number"), ("<lora::1>", "write <lora:NAME")):
        with pytest.raises(ConfigError, match=said):
            parse_lora_tags(f"a {bad}")


def test_lora_spec():
    assert lora_spec("a/b.safetensors:0.5") == (__import__("pathlib").Path("a/b.safetensors"), 0.5)
    assert lora_spec("C:/x/b.pt")[1] == 1.0  # a drive letter is no weight
    assert lora_spec(("b.pt", 2))[1] == 2.0
    with pytest.raises(ConfigError, match="loras"):
        LoadOptions(loras="b.pt")


# ---------------------------------------------------------------------------- the API
def test_load_lora_tags_and_unload(files):
    pipe = noisecraft.load(files / "tiny.safetensors", lora_dir=files / "loras")
    base_state = _state(pipe.model)
    base = pipe("the cat", **CALL)
    tagged = pipe("the cat <lora:style:0.8>", **CALL)
    assert (tagged.tensors[0] - base.tensors[0]).abs().max() > 0.05
    params = parse_parameters(tagged.infotexts[0])
    assert params["prompt"] == "the cat <lora:style:0.8>"
    h = pipe._loras.file_hash(files / "loras" / "style.safetensors")
    assert params["extra"]["Lora hashes"] == f"style: {h}"
    # not in the next prompt: no longer applied, weights back bit for bit
    assert torch.equal(pipe("the cat", **CALL).tensors[0], base.tensors[0])
    assert _same_state(_state(pipe.model), base_state)
    # loaded: every call, written as a tag; the tag form gives the same image
    entry = pipe.load_lora(files / "loras" / "style.safetensors", 0.8)
    assert [lo.name for lo in pipe.loras] == ["style"] and entry.short_hash == h
    loaded = pipe("the cat", **CALL)
    assert torch.equal(loaded.tensors[0], tagged.tensors[0])
    assert parse_parameters(loaded.infotexts[0])["prompt"] == "the cat <lora:style:0.8>"
    # a tag for a loaded LoRA sets its weight for the call (not applied twice)
    assert torch.equal(pipe("the cat <lora:style:0.8>", **CALL).tensors[0], tagged.tensors[0])
    # two at once (one in a sub-folder), each with its weight
    both = pipe("the cat <lora:ink:-0.5>", **CALL)
    p = parse_parameters(both.infotexts[0])
    assert p["prompt"] == "the cat <lora:ink:-0.5> <lora:style:0.8>"
    assert p["extra"]["Lora hashes"].startswith("style: ")
    assert ", ink: " in p["extra"]["Lora hashes"]
    again = pipe.replay(both.infotexts[0])
    assert torch.equal(again.tensors[0], both.tensors[0])
    pipe.unload_loras()
    assert pipe.loras == []
    assert torch.equal(pipe("the cat", **CALL).tensors[0], base.tensors[0])
    assert _same_state(_state(pipe.model), base_state)


def test_load_time_loras_equal_load_lora(files):
    lora = files / "loras" / "style.safetensors"
    pipe = noisecraft.load(files / "tiny.safetensors", loras=[f"{lora}:0.8"])
    other = noisecraft.load(files / "tiny.safetensors")
    other.load_lora(lora, 0.8)
    assert torch.equal(pipe("a dog", **CALL).tensors[0], other("a dog", **CALL).tensors[0])


def test_tag_errors(files, tmp_path):
    pipe = noisecraft.load(files / "tiny.safetensors", lora_dir=files / "loras")
    with pytest.raises(NoisecraftError, match=r"unknown LoRA 'styel'; did you mean 'style'\?"):
        pipe("the cat <lora:styel>", **CALL)
    with pytest.raises(ConfigError, match="name different LoRAs"):
        pipe(["a <lora:style>", "b"], **CALL)
    bare = noisecraft.load(files / "tiny.safetensors")
    with pytest.raises(ConfigError, match="needs the folder of LoRA files: set lora_dir"):
        bare("the cat <lora:style>", **CALL)
    empty = noisecraft.load(files / "tiny.safetensors", lora_dir=tmp_path)
    with pytest.raises(ConfigError, match="holds no LoRA files"):
        empty("the cat <lora:style>", **CALL)
    with pytest.raises(ConfigError, match="is not a folder"):
        noisecraft.load(files / "tiny.safetensors", lora_dir=tmp_path / "nope")


def test_foreign_lora_refused_and_model_unchanged(files):
    pipe = noisecraft.load(files / "tiny.safetensors")
    before = _state(pipe.model)
    with pytest.raises(CheckpointError, match=r"of 11 LoRA keys .*\(an SDXL LoRA\?\)") as e:
        pipe.load_lora(files / "xl.safetensors")
    assert "\n" not in str(e.value)
    assert pipe.loras == [] and _same_state(_state(pipe.model), before)


def test_replay_warns_when_the_file_found_has_another_hash(files, tmp_path):
    d = tmp_path / "loras"
    d.mkdir()
    (d / "style.safetensors").write_bytes((files / "loras" / "style.safetensors").read_bytes())
    pipe = noisecraft.load(files / "tiny.safetensors", lora_dir=d)
    made = pipe("the cat <lora:style>", **CALL)
    write_kohya_lora(d / "style.safetensors", _trained(tiny_model(), KEYS, 9, std=1.0))
    with pytest.warns(LoRAHashWarning, match="the image was made with"):
        pipe.replay(made.infotexts[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error", LoRAHashWarning)
        pipe.replay(pipe("the cat <lora:style>", **CALL).infotexts[0])  # same file: silent


# ---------------------------------------------------------------------------- modes
def test_fast_mode_merges_before_int8_and_refuses_changes(files):
    lora = files / "loras" / "style.safetensors"
    pipe = noisecraft.load(files / "tiny.safetensors", fast=True, loras=[(lora, 0.8)])
    got = pipe("the cat", **CALL)
    # the same: merge by hand, then quantise
    model = tiny_model()
    MergedLoRAs(model).apply([AppliedLoRA.of(read_lora(lora, model), 0.8)])
    manual = Pipeline(model.int8(inplace=True), options=LoadOptions(fast=True))
    assert torch.equal(got.tensors[0], manual("the cat", **CALL).tensors[0])
    for change in (
        lambda: pipe.load_lora(files / "loras" / "sub" / "ink.safetensors"),
        pipe.unload_loras,
        lambda: pipe("the cat <lora:style:0.5>", **CALL),
    ):
        with pytest.raises(ConfigError, match="before fast mode quantises them to int8") as e:
            change()
        assert "give them when loading (loras) or load without fast" in str(e.value)
    assert torch.equal(pipe.replay(got.infotexts[0]).tensors[0], got.tensors[0])


@pytest.mark.parametrize("weights", ["fp16", "int8"])
def test_low_memory_merges_where_the_weights_live(files, weights):
    from noisecraft.pipelines.lowmem import low_memory

    lora = files / "loras" / "style.safetensors"
    full = noisecraft.load(files / "tiny.safetensors")
    want = full("the cat", **CALL).tensors[0]
    full.load_lora(lora, 0.8)
    want_lora = full("the cat", **CALL).tensors[0]
    # every layer stored narrow (the tiny model's are below the default size threshold)
    model = low_memory(tiny_model(), weights, vae=None, min_elements=1, mmap_threshold=None)
    stored = torch.int8 if weights == "int8" else torch.float16
    layers = lora_targets(model)
    assert all(layers[k]._buffers["weight"].dtype == stored for k in KEYS)
    pipe = Pipeline(model, options=LoadOptions(low_memory=weights))
    before = _state(pipe.model)
    base = pipe("the cat", **CALL).tensors[0]
    pipe.load_lora(lora, 0.8)
    assert all(layers[k]._buffers["weight"].dtype == stored for k in KEYS)
    got = pipe("the cat", **CALL).tensors[0]
    assert (got - base).abs().max() > 0.05
    tol = (want - base).abs().max() + 0.01  # what the storage alone costs, and a margin
    assert (got - want_lora).abs().max() <= tol
    pipe.unload_loras()
    assert _same_state(_state(pipe.model), before)
    assert torch.equal(pipe("the cat", **CALL).tensors[0], base)
    # given at load time: merged into what load_low_memory stored
    loaded = noisecraft.load(files / "tiny.safetensors", low_memory=weights, loras=[(lora, 0.8)])
    assert (loaded("the cat", **CALL).tensors[0] - want_lora).abs().max() <= tol


def test_offload_merges_into_the_cpu_weights(files):
    from noisecraft.pipelines.offload import offload_latent_diffusion

    lora = files / "loras" / "style.safetensors"
    plain = noisecraft.load(files / "tiny.safetensors", loras=[(lora, 0.8)])
    hooked = offload_latent_diffusion(tiny_model(), "cpu", torch.float32)  # hooks on the CPU
    pipe = Pipeline(hooked)
    before = _state(hooked)
    pipe.load_lora(lora, 0.8)
    got = pipe("the cat", **CALL).tensors[0]
    torch.testing.assert_close(got, plain("the cat", **CALL).tensors[0], atol=1e-5, rtol=0)
    pipe.unload_loras()
    assert _same_state(_state(hooked), before)


# ---------------------------------------------------------------------------- the CLI
def _run(args, capsys):
    rc = main(args)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _pixels(path):
    return np.asarray(Image.open(path))


def test_cli_lora_flags_tags_png_and_from_png(files, capsys, tmp_path):
    model, d = str(files / "tiny.safetensors"), str(files / "loras")
    common = ["--model", model, "--steps", "3", "--sampler", "euler", "--size", "64x48"]
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    rc, out, err = _run(
        ["generate", "the cat <lora:style:0.8>", *common, "--lora-dir", d, "--out", str(a)], capsys
    )
    assert rc == 0, err
    rc, _, err = _run(
        [
            "generate",
            "the cat",
            *common,
            "--lora",
            f"{files / 'loras' / 'style.safetensors'}:0.8",
            "--out",
            str(b),
        ],
        capsys,
    )
    assert rc == 0, err
    assert np.array_equal(_pixels(a), _pixels(b))
    params = parse_parameters(Image.open(b).text["parameters"])
    assert params["prompt"] == "the cat <lora:style:0.8>"
    assert params["extra"]["Lora hashes"].startswith("style: ")
    rc, _, err = _run(
        ["generate", "--from-png", str(b), "--model", model, "--lora-dir", d, "--out", str(c)],
        capsys,
    )
    assert rc == 0, err
    assert np.array_equal(_pixels(c), _pixels(b))
    rc, _, err = _run(
        [
            "generate",
            "the cat <lora:styel>",
            *common,
            "--lora-dir",
            d,
            "--out",
            str(tmp_path / "x.png"),
        ],
        capsys,
    )
    assert rc == 2 and err.strip().splitlines() == [
        "error: unknown LoRA 'styel'; did you mean 'style'? choose one of: ink, mnist_tiny, style"
    ]
    rc, _, err = _run(
        ["generate", "the cat <lora:style>", *common, "--out", str(tmp_path / "y.png")], capsys
    )
    assert rc == 2 and "set --lora-dir" in err
    rc, _, err = _run(
        [
            "generate",
            "the cat",
            *common,
            "--fast",
            "--lora",
            str(files / "xl.safetensors"),
            "--out",
            str(tmp_path / "z.png"),
        ],
        capsys,
    )
    assert rc == 2 and "(an SDXL LoRA?); it does not fit this model" in err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_offload_fp16_merges_into_the_cpu_weights(files):
    lora = files / "loras" / "style.safetensors"
    cpu = noisecraft.load(files / "tiny.safetensors", loras=[(lora, 0.8)])
    pipe = noisecraft.load(files / "tiny.safetensors", device="cuda", offload=True, dtype="fp16")
    before = _state(pipe.model)
    pipe.load_lora(lora, 0.8)
    assert all(p.device.type == "cpu" for p in pipe.model.unet.parameters())
    got = pipe("the cat", **CALL).tensors[0].float().cpu()
    assert (got - cpu("the cat", **CALL).tensors[0]).abs().max() < 0.05
    pipe.unload_loras()
    assert _same_state(_state(pipe.model), before)
