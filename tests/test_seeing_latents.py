"""The latents of a text-to-image call (issue 17, part 2): x_t and the predicted x0 every K
steps and at the end, raw and decoded (cheap linear preview and VAE), the 4 channels on one
colour scale, the denoising GIF; from the API (``Observer(every=K)``) and the CLI
(``--save-every``, ``--gif``), on the shipped mini SD and on SD 1.5's layout."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

import noisecraft
from helpers import narrow_sd15_model
from noisecraft.api import Observer, Pipeline
from noisecraft.cli.main import main
from noisecraft.errors import ConfigError
from noisecraft.io.native import save_model
from noisecraft.models.latent_preview import latent_to_rgb, sd_latent_rgb
from noisecraft.pipelines.generate import generate
from noisecraft.pipelines.observe import LatentRecorder
from noisecraft.viz.latents import channel_grid, shared_scale

STEPS = 7


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return noisecraft.load("mnist-text")


@pytest.fixture(scope="module")
def observed(pipe):
    off = pipe("a handwritten 3", seed=1, steps=STEPS)
    on = pipe("a handwritten 3", seed=1, steps=STEPS, observe=Observer(every=3))
    return off, on


def test_recorder_keeps_every_kth_step_in_ddpm_view_and_the_final_latents():
    """x_t = x / sqrt(1 + sigma^2) (DDPM eq. 4 with sigma^2 = (1 - abar) / abar) at steps
    0, K, 2K, ...; the final latents close the trace as x_t = x0 at sigma 0."""
    rec = LatentRecorder(every=2)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 4, 3, 3, generator=g) for _ in range(5)]
    sigmas = [8.0, 4.0, 2.0, 1.0, 0.5]
    for i, (x, s) in enumerate(zip(xs, sigmas, strict=True)):
        rec.on_step({"i": i, "x": x, "sigma": torch.tensor(s), "denoised": x * 0.1})
    final = torch.randn(2, 4, 3, 3, generator=g)
    traces = rec.finish(final, 5)
    assert len(traces) == 2 and traces[1].steps == [0, 2, 4, 5]
    torch.testing.assert_close(traces[1].sigmas, torch.tensor([8.0, 2.0, 0.5, 0.0]))
    torch.testing.assert_close(traces[1].xt[1], xs[2][1] / math.sqrt(1 + 2.0**2))
    torch.testing.assert_close(traces[0].x0[2], xs[4][0] * 0.1)
    assert torch.equal(traces[0].xt[-1], final[0]) and torch.equal(traces[0].x0[-1], final[0])


def test_observing_latents_leaves_the_image_bit_identical(observed):
    off, on = observed
    assert torch.equal(on.tensors, off.tensors)
    assert on.observed.attention is None and len(on.observed.latents) == 1


def test_latent_steps_hold_the_run(pipe, observed):
    """Rows at steps 0, 3, 6 and the final one (7); row 0 is the initial noise at the
    largest sigma (unit variance in DDPM's view); the final row is the call's latents and
    its VAE picture the call's image; the other VAE pictures are the VAE's decodes."""
    _, on = observed
    s = on.observed.latents[0]
    assert s.steps == [0, 3, 6, STEPS] and s.xt.shape == (4, 4, 8, 8) and s.x0.dtype == np.float32
    req = pipe.request("a handwritten 3", seed=1, steps=STEPS)
    z = generate(pipe.model, req, decode=False)[0].numpy()
    np.testing.assert_array_equal(s.xt[-1], z)
    np.testing.assert_array_equal(s.x0[-1], z)
    assert s.sigmas[-1] == 0 and s.sigmas[0] == pytest.approx(
        float(pipe.model.schedule.sigmas[-1]), rel=1e-4
    )
    assert 0.7 < float(s.xt[0].std()) < 1.3  # x_T ~ N(0, I) in DDPM's view
    assert s.x0_images["vae"][-1] is on.images[0]
    decoded = pipe.model.decode(torch.from_numpy(s.x0[1:2])).clamp(-1, 1)
    want = ((decoded[0, 0] / 2 + 0.5) * 255).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(np.asarray(s.x0_images["vae"][1]), want)
    for images in (*s.xt_images.values(), *s.x0_images.values()):
        assert len(images) == 4 and all(im.size == (32, 32) for im in images)
    assert s.row_labels()[0].startswith("step 0, σ=") and s.row_labels()[-1] == "step 7 (final)"


def test_fitted_cheap_preview_shows_the_digit(pipe):
    """For a VAE that is not SD's the cheap preview's factors are fitted to the VAE: on
    generated digits (not fitted on) the preview is close to the decoded image averaged over
    each latent pixel's 4x4 patch, and much closer than SD's fixed factors."""
    req = pipe.request([f"a handwritten {d}" for d in range(10)], seed=100, steps=8)
    z = generate(pipe.model, req, decode=False)
    pooled = F.adaptive_avg_pool2d(pipe.model.decode(z).float().clamp(-1, 1), (8, 8))[:, 0]
    factors = pipe.model.latent_rgb()
    assert factors.shape == (5, 1)
    fitted = latent_to_rgb(z, factors)[:, 0]
    sd = latent_to_rgb(z, sd_latent_rgb())[:, 0]
    err_fit, err_sd = (fitted - pooled).abs().mean(), (sd - pooled).abs().mean()
    assert err_fit < 0.25 and err_fit < err_sd / 2, (err_fit, err_sd)
    corr = torch.corrcoef(torch.stack([fitted.flatten(), pooled.flatten()]))[0, 1]
    assert corr > 0.85


def test_latent_to_rgb_closed_form():
    z = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0)) * 0.1
    factors = torch.tensor([[0.1], [0.2], [-0.3], [0.4], [0.05]])
    got = latent_to_rgb(z, factors)
    want = (z * factors[:4].view(1, 4, 1, 1)).sum(1, keepdim=True) + 0.05
    torch.testing.assert_close(got, want.expand(-1, 3, -1, -1))
    torch.testing.assert_close(latent_to_rgb(z), latent_to_rgb(z, sd_latent_rgb()))


def test_channel_grid_one_scale_for_all_channels():
    latents = np.zeros((2, 4, 8, 8), dtype=np.float32)
    latents[1, 2, 0, 0] = -5.0
    latents[0, 1] = 2.0
    assert shared_scale(latents) == 5.0 and shared_scale(np.zeros((1, 1, 2, 2))) == 1.0
    small = channel_grid(latents[:1, :2], ["a"])
    big = channel_grid(latents, ["a", "b"])
    assert big.width > small.width and big.height > small.height and big.mode == "RGB"


def test_saved_files_and_gif(observed, tmp_path):
    _, on = observed
    s = on.observed.latents[0]
    paths = s.save(tmp_path / "steps")
    names = {p.name for p in paths}
    assert len(paths) == 4 * 4 + 4
    assert {"step_000_xt_cheap.png", "step_007_x0_vae.png", "channels_xt.png"} <= names
    assert Image.open(tmp_path / "steps" / "steps.png").width > 4 * 32
    raw = load_file(tmp_path / "steps" / "latents.safetensors")
    np.testing.assert_array_equal(raw["x0"].numpy(), s.x0)
    assert raw["steps"].tolist() == s.steps
    final = np.asarray(Image.open(tmp_path / "steps" / "step_007_x0_vae.png"))
    np.testing.assert_array_equal(final, np.asarray(on.images[0]))
    gif = Image.open(s.save_gif(tmp_path / "d.gif"))
    assert gif.n_frames == 4
    with pytest.raises(FileExistsError):
        s.save(tmp_path / "steps")


def test_bad_observe_every_is_refused(pipe):
    for every in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="every"):
            Observer(every=every)
    pixel = noisecraft.load("mnist")
    with pytest.raises(ConfigError, match="latent"):
        pixel(steps=2, observe=Observer(every=1))


# ---------------------------------------------------------------------------- CLI


def test_cli_save_every_and_gif(tmp_path, capsys):
    out = tmp_path / "five.png"
    args = ["generate", "a handwritten 5", "--steps", "4", "--out", str(out)]
    rc = main([*args, "--save-every", "2", "--gif", str(tmp_path / "d.gif"), "--n", "2"])
    assert rc == 0, capsys.readouterr().err
    for i in ("0", "1"):
        folder = tmp_path / "five_steps" / i
        assert (folder / "step_004_x0_vae.png").is_file() and (folder / "channels_x0.png").is_file()
        assert not (folder / "step_001_xt_vae.png").exists()
    assert Image.open(tmp_path / "d_1.gif").n_frames == 3  # steps 0, 2 and the final
    rc = main([*args, "--overwrite", "--gif", str(tmp_path / "every.gif")])
    assert rc == 0 and Image.open(tmp_path / "every.gif").n_frames == 5  # every step + final
    assert not (tmp_path / "five_steps" / "step_000_xt_vae.png").exists()
    capsys.readouterr()
    rc = main([*args, "--overwrite", "--save-every", "-1"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: --save-every") and "\n" not in err.strip()
    fresh = ["generate", "a", "--steps", "1", "--out", str(tmp_path / "new.png")]
    rc = main([*fresh, "--gif", str(tmp_path / "d.gif")])  # exists: not replaced
    assert rc == 2 and "d.gif" in capsys.readouterr().err and not (tmp_path / "new.png").exists()


# ---------------------------------------------------------------------------- SD 1.5 layout


def test_cli_on_sd15_layout_with_random_weights(tmp_path, capsys):
    """Every seeing-inside command on SD 1.5's layout (narrow, random weights): shapes and
    files only."""
    path = tmp_path / "sd15.safetensors"
    save_model(narrow_sd15_model(), path)
    out = tmp_path / "cube.png"
    rc = main(
        [
            "generate",
            "a red cube on a table",
            "--model",
            str(path),
            "--steps",
            "2",
            "--out",
            str(out),
            "--attention-maps",
            str(tmp_path / "maps"),
            "--save-every",
            "1",
            "--gif",
            str(tmp_path / "cube.gif"),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert Image.open(out).size == (64, 64)
    maps = sorted(p.name for p in (tmp_path / "maps").iterdir())
    assert maps == ["00_a.png", "01_red.png", "02_cube.png", "03_on.png", "04_a.png"] + [
        "05_table.png",
        "grid.png",
    ]
    raw = load_file(tmp_path / "cube_steps" / "latents.safetensors")
    assert raw["xt"].shape == (3, 4, 8, 8) and raw["steps"].tolist() == [0, 1, 2]
    cheap = Image.open(tmp_path / "cube_steps" / "step_000_x0_cheap.png")
    assert cheap.size == (64, 64) and cheap.mode == "RGB"
    assert Image.open(tmp_path / "cube.gif").n_frames == 3
