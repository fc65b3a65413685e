"""TAESD decoder files users download, loaded as our tiny decoder: madebyollin's original
``taesd_decoder.safetensors`` / ``.pth`` and diffusers' ``AutoencoderTiny`` (folder or its
weights file), each decoding to the same [-1, 1] images as diffusers' ``AutoencoderTiny``
(test-only reference, random weights); and the refusals of files that are not one."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

import noisecraft
from noisecraft.cli.main import main
from noisecraft.errors import CheckpointError, ConfigError
from noisecraft.io.native import load_tiny_decoder, save_model, save_tiny_decoder
from noisecraft.models.tiny_decoder import TinyDecoder, TinyDecoderConfig
from test_latent_pipeline import tiny_model

diffusers = pytest.importorskip("diffusers")

#: A narrow TAESD: width 8, 2 blocks per level, f=8, 4 latent channels, RGB.
NARROW = dict(
    encoder_block_out_channels=(8, 8, 8, 8),
    decoder_block_out_channels=(8, 8, 8, 8),
    num_encoder_blocks=(1, 1, 1, 1),
    num_decoder_blocks=(2, 2, 2, 1),
)


def _reference(latent_channels: int = 4):
    torch.manual_seed(0)
    ae = diffusers.AutoencoderTiny(latent_channels=latent_channels, **NARROW).eval()
    last = ae.decoder.layers[-1]
    with torch.no_grad():  # biases away from 0, and an image that fills [0, 1], not flat
        for p in ae.parameters():
            p.add_(0.05 * torch.randn_like(p))
        last.weight.mul_(4)
        last.bias.zero_()
        raw = (ae.decode(1.5 * torch.randn(4, latent_channels, 5, 6)).sample + 1) / 2
        last.bias.copy_(0.5 - raw.mean((0, 2, 3)))
    return ae


def _original_layout(ae) -> dict[str, torch.Tensor]:
    """madebyollin's taesd_decoder keys, built independently of the loader: taesd.py's
    ``Decoder`` is ``nn.Sequential(Clamp(), conv, ReLU, ...)``, diffusers' ``decoder.layers``
    the same without the Clamp (applied in ``forward``), so each index moves up by one."""
    out = {}
    for key, value in ae.state_dict().items():
        if key.startswith("decoder.layers."):
            index, rest = key.removeprefix("decoder.layers.").split(".", 1)
            out[f"{int(index) + 1}.{rest}"] = value.clone()
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    ae = _reference()
    root = tmp_path_factory.mktemp("taesd")
    ae.save_pretrained(root / "taesd")
    original = _original_layout(ae)
    save_file(original, str(root / "taesd_decoder.safetensors"))
    torch.save(original, root / "taesd_decoder.pth")
    return ae, root


SOURCES = [
    "taesd",
    "taesd/diffusion_pytorch_model.safetensors",
    "taesd_decoder.safetensors",
    "taesd_decoder.pth",
]


@pytest.mark.parametrize("name", SOURCES)
def test_taesd_files_decode_like_diffusers(files, name):
    ae, root = files
    dec = load_tiny_decoder(root / name)
    assert dec.config == TinyDecoderConfig(
        latent_channels=4, width=8, upsamplings=3, blocks_per_level=2, output_range="unit"
    )
    latents = 1.5 * torch.randn(2, 4, 5, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ae.decode(latents).sample.clamp(-1, 1)  # diffusers maps [0, 1] by 2 x - 1
    got = dec.decode(latents)
    assert got.shape == (2, 3, 40, 48)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert want.std() > 0.05 and (want.abs() < 1).float().mean() > 0.5  # not flat, not clamped


def test_original_keys_are_taesds(tmp_path):
    keys = _original_layout(_reference())
    assert keys["1.weight"].shape == (8, 4, 3, 3) and "3.conv.0.weight" in keys
    assert "0.weight" not in keys  # index 0 is the Clamp, which has no weights
    # diffusers' default AutoencoderTiny is TAESD's SD decoder: our TAESD config, same shapes
    full = tmp_path / "full"
    diffusers.AutoencoderTiny().save_pretrained(full)
    dec = load_tiny_decoder(full)
    assert dec.config == TinyDecoderConfig.taesd(output_range="unit")
    ours = TinyDecoder(TinyDecoderConfig.taesd()).state_dict()
    assert {k: v.shape for k, v in dec.state_dict().items()} == {
        k: v.shape for k, v in ours.items()
    }


def test_native_round_trip_keeps_the_output_range(tmp_path, files):
    dec = load_tiny_decoder(files[1] / "taesd_decoder.safetensors")
    back = load_tiny_decoder(save_tiny_decoder(dec, tmp_path / "td.safetensors"))
    assert back.config.output_range == "unit"
    x = torch.randn(1, 4, 3, 3)
    torch.testing.assert_close(back.decode(x), dec.decode(x))
    # the default stays [-1, 1] output: the same weights read as "signed" give 2 x - 1 less
    signed = TinyDecoder(TinyDecoderConfig(**{**dec.config.to_dict(), "output_range": "signed"}))
    signed.load_state_dict(dec.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(dec(x), signed(x) * 2 - 1)
    with pytest.raises(ConfigError, match="output_range must be one of signed, unit"):
        TinyDecoderConfig(output_range="0..1")


def test_api_and_cli_take_a_taesd_file(tmp_path, files, capsys):
    ae, root = files
    torch.manual_seed(1)
    model = save_model(tiny_model(), tmp_path / "m.safetensors")
    pipe = noisecraft.load(model, tiny_decoder=root / "taesd")
    x = torch.randn(1, 4, 6, 8)
    with torch.no_grad():
        want = ae.decode(x).sample.clamp(-1, 1)
    torch.testing.assert_close(pipe.model.tiny_decode(x), want, atol=1e-5, rtol=0)
    common = ["generate", "a cat", "--steps", "1", "--sampler", "euler", "--size", "64x48"]
    td = ["--fast-decode", "--tiny-decoder", str(root / "taesd_decoder.pth")]
    rc = main([*common, "--model", str(model), *td, "--out", str(tmp_path / "a.png")])
    assert rc == 0 and (tmp_path / "a.png").is_file()
    # a 16-channel TAESD (TAESD3 / TAEF1's latent space) loads, but not for a 4-channel model
    wide = tmp_path / "taesd3_decoder.safetensors"
    save_file(_original_layout(_reference(latent_channels=16)), str(wide))
    assert load_tiny_decoder(wide).config.latent_channels == 16
    td = ["--fast-decode", "--tiny-decoder", str(wide)]
    rc = main([*common, "--model", str(model), *td, "--out", str(tmp_path / "b.png")])
    err = capsys.readouterr().err
    assert rc == 2 and "16 latent channels" in err and "TAESD3" in err, err
    assert not (tmp_path / "b.png").exists()


def _one_line_error(path, match: str) -> None:
    with pytest.raises(CheckpointError, match=match) as e:
        load_tiny_decoder(path)
    assert "\n" not in str(e.value)


def test_refusals(tmp_path, files):
    ae, root = files
    other = tmp_path / "other.safetensors"
    save_file({"conv_in.weight": torch.zeros(2, 2)}, str(other))
    _one_line_error(other, "not a tiny decoder .*expected a noisecraft tiny_decoder checkpoint")
    encoder = tmp_path / "taesd_encoder.safetensors"
    save_file(
        {k.removeprefix("layers."): v.clone() for k, v in ae.encoder.state_dict().items()},
        str(encoder),
    )
    _one_line_error(encoder, "TAESD's encoder")
    _one_line_error(tmp_path / "missing.pth", "not found")
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(empty, "without config.json")
    config = json.loads((root / "taesd" / "config.json").read_text())
    for key, value, match in [
        ("scaling_factor", 1.5305, "another latent space"),
        ("_class_name", "AutoencoderKL", "not an AutoencoderTiny"),
        ("act_fn", "silu", "only TAESD's design"),
    ]:
        folder = tmp_path / key
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({**config, key: value}))
        os.symlink(
            root / "taesd" / "diffusion_pytorch_model.safetensors",
            folder / "diffusion_pytorch_model.safetensors",
        )
        _one_line_error(folder, match)


def test_pth_goes_through_the_safe_reader(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.getcwd, ())

    bad = tmp_path / "taesd_decoder.pth"
    torch.save({"1.weight": torch.zeros(1), "x": Payload()}, bad)
    _one_line_error(bad, "refusing to load .*posix.getcwd|refusing to load .*os.getcwd")
