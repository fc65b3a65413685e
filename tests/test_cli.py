"""CLI smoke tests: every command runs, and every user mistake is one `error:` line, exit 2."""

import subprocess
import sys

import pytest
import torch
from PIL import Image, ImageSequence

from helpers import tiny_recipe
from noisecraft.cli.main import main
from noisecraft.io.checkpoint import CheckpointInfo, save_checkpoint


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    toml = root / "tiny.toml"
    toml.write_text(tiny_recipe((root / "run").as_posix()))
    assert main(["train", str(toml)]) == 0
    return root


def _err(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_train_then_sample_writes_grid_and_gif(trained, capsys):
    model = trained / "run" / "model.safetensors"
    out, gif = trained / "grid.png", trained / "d.gif"
    rc = main(
        [
            "sample",
            str(model),
            "--steps",
            "3",
            "--n",
            "20",
            "--out",
            str(out),
            "--gif",
            str(gif),
            "--sampler",
            "euler",
        ]
    )
    assert rc == 0
    assert f"wrote {out}" in capsys.readouterr().out
    im = Image.open(out)
    assert im.size[0] > 0
    assert "sampler: euler" in im.text["parameters"]
    # one 80 ms frame per step, then the final images held 1 s (Pillow merges equal frames,
    # so count time, not frames)
    durations = [f.info["duration"] for f in ImageSequence.Iterator(Image.open(gif))]
    assert sum(durations) == 3 * 80 + 1000


def test_existing_output_is_refused_unless_overwrite(trained, capsys):
    model = str(trained / "run" / "model.safetensors")
    out = trained / "keep.png"
    out.write_bytes(b"precious")
    assert main(["sample", model, "--steps", "2", "--n", "2", "--out", str(out)]) == 2
    assert "--overwrite" in _err(capsys)
    assert out.read_bytes() == b"precious"
    assert (
        main(["sample", model, "--steps", "2", "--n", "2", "--out", str(out), "--overwrite"]) == 0
    )


def test_train_resumes(trained, capsys):
    toml = trained / "tiny.toml"
    assert main(["train", str(toml), "--max-steps", "4"]) == 0
    assert "resuming" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, needle",
    [
        (["sample", "{model}", "--sampler", "eulr"], "did you mean 'euler'"),
        (["sample", "{model}", "--steps", "0"], "at least 1"),
        (["sample", "{model}", "--class", "12"], "out of range"),
        (["sample", "{root}/nothing.safetensors"], "not found"),
        (["sample", "{root}/vae.safetensors"], "'vae' model"),
        (["train", "{root}/tiny.toml", "--set", "train.bach_size=3"], "did you mean 'batch_size'"),
        (
            [
                "train",
                "{root}/tiny.toml",
                "--set",
                "data.name=folder",
                "--set",
                "data.path={root}/none",
                "--set",
                "run.dir={root}/r2",
            ],
            "not found",
        ),
        (["train", "{root}/missing.toml"], "not found"),
    ],
)
def test_user_mistakes_are_one_line_errors(trained, capsys, args, needle):
    save_checkpoint(
        trained / "vae.safetensors", {"w": torch.ones(1)}, CheckpointInfo("vae", {}), overwrite=True
    )
    model = trained / "run" / "model.safetensors"
    args = [a.format(model=model, root=trained) for a in args]
    assert main(args) == 2
    assert needle in _err(capsys)


def test_samplers_listing(capsys):
    assert main(["samplers"]) == 0
    out = capsys.readouterr().out
    for name in ["ddpm", "ddim", "euler_ancestral", "dpmpp_2m", "unipc", "plms"]:
        assert name in out


def test_plot_schedule(tmp_path):
    path = tmp_path / "s.png"
    assert main(["plot-schedule", "--out", str(path)]) == 0
    assert Image.open(path).size[0] > 500


def test_console_script_exit_code_and_no_traceback(tmp_path):
    exe = [sys.executable, "-m", "noisecraft.cli.main"]
    r = subprocess.run(
        [*exe, "sample", str(tmp_path / "x.safetensors")], capture_output=True, text=True
    )
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr


def test_train_on_folder_counts_corrupt_images(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        Image.new("L", (20, 12), i * 60).save(folder / f"{i}.png")
    (folder / "bad.png").write_bytes(b"\x89PNG broken")
    toml = tmp_path / "f.toml"
    toml.write_text(
        tiny_recipe((tmp_path / "run").as_posix())
        .replace('name = "digits"', f'name = "folder"\npath = "{folder.as_posix()}"')
        .replace("num_classes = 10\n", "")
        .replace("limit = 128", "class_conditional = false")
    )
    assert main(["train", str(toml), "--set", "train.batch_size=4"]) == 0
    assert "skipped 1 unreadable image(s)" in capsys.readouterr().out


def test_torchrun_two_processes(tmp_path):
    """The README's multi-process command, for real: torchrun with 2 gloo processes."""
    toml = tmp_path / "tiny.toml"
    toml.write_text(tiny_recipe((tmp_path / "run").as_posix()))
    # --standalone: a free rendezvous port, so parallel test runs do not collide on 29500
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
    ]
    r = subprocess.run(
        [*torchrun, "-m", "noisecraft.cli.main", "train", str(toml), "--set", "train.device='cpu'"],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("trained to step 3") == 1  # only rank 0 reports
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_save_every_writes_intermediates_and_the_final_image(trained):
    import numpy as np

    model = str(trained / "run" / "model.safetensors")
    out = trained / "inter.png"
    args = ["sample", model, "--steps", "4", "--n", "3", "--save-every", "2", "--out", str(out)]
    assert main(args) == 0
    folder = trained / "inter_steps"
    names = sorted(p.name for p in folder.iterdir())
    assert names == [
        f"step_{i:03d}_{k}.png" for i in (0, 2, 4) for k in ("x0", "xt")
    ]  # steps 0 and 2 of 4, and the result (step 4)
    grid = np.asarray(Image.open(out))
    for k in ("x0", "xt"):
        assert np.array_equal(np.asarray(Image.open(folder / f"step_004_{k}.png")), grid)
    assert not np.array_equal(np.asarray(Image.open(folder / "step_002_xt.png")), grid)


def test_eval_prints_table_and_writes_json(trained, capsys):
    import json

    model = str(trained / "run" / "model.safetensors")
    out = trained / "eval.json"
    args = [
        "eval",
        model,
        "--metrics",
        "fid,kid,is,pr,bpd",
        "--n",
        "100",
        "--steps",
        "2",
        "--bpd-timesteps",
        "4",
        "--bpd-n",
        "8",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    doc = json.loads(out.read_text())
    for key in ("fid", "kid", "is", "bpd"):
        assert key in printed
        assert key in " ".join(doc["metrics"])
    assert doc["metrics"]["fid"] > 0 and doc["metrics"]["bpd"] > 0


def test_eval_records_the_schedule_it_sampled_on(trained):
    """--spacing picks the grid; without it DPM++ 2M runs on its A1111 default, Karras."""
    import json

    model = str(trained / "run" / "model.safetensors")
    out = trained / "eval_spacing.json"
    base = ["eval", model, "--metrics", "fid", "--n", "100", "--steps", "2", "--overwrite"]
    for extra, schedule in ([], "karras"), (["--spacing", "Uniform"], "linspace"):
        assert main([*base, *extra, "--out", str(out)]) == 0
        assert json.loads(out.read_text())["schedule"] == schedule


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--metrics", "fid,kdi"], "did you mean 'kid'"),
        (["--metrics", "fid", "--n", "10"], "feature"),
        (["--features", "inception"], "--inception PATH"),
    ],
)
def test_eval_user_mistakes(trained, capsys, extra, needle):
    model = str(trained / "run" / "model.safetensors")
    assert main(["eval", model, "--out", str(trained / "e.json"), *extra]) == 2
    assert needle in _err(capsys)


def test_usage_errors_are_one_line_and_exit_2(capsys):
    """typer's usage box became one line (issue 13 case 9; tests/test_cli_errors.py has all)."""
    assert main(["sample", "--bogus"]) == 2
    line = _err(capsys)
    assert line.startswith("error: noisecraft sample has no option --bogus; ")
    assert "noisecraft sample --help" in line


def test_demo_uses_shipped_model_and_keeps_earlier_outputs(tmp_path, capsys):
    """The README's main job: shipped model, a grid and a GIF; a second run never overwrites."""
    args = ["demo", "--out-dir", str(tmp_path), "--steps", "2"]
    assert main(args) == 0
    first = (tmp_path / "digits.png").read_bytes()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'digits_2.png'}" in out
    assert f"wrote {tmp_path / 'denoising_2.gif'}" in out
    assert (tmp_path / "digits.png").read_bytes() == first
    with Image.open(tmp_path / "digits.png") as im:
        assert im.height > im.width  # 10 class rows of 8 digits
    # the shipped text-to-image model's grid, numbered the same way
    assert f"wrote {tmp_path / 'text_digits_2.png'}" in out
    with Image.open(tmp_path / "text_digits.png") as im:
        assert im.height > im.width  # 10 prompt rows of 8 images


def test_python_dash_m_runs_the_same_cli():
    """``python -m noisecraft`` (what bench/sdcpp.py starts) is the ``noisecraft`` program:
    same commands, and a user error is the same one line with exit code 2."""
    ok = subprocess.run(
        [sys.executable, "-m", "noisecraft", "--help"], capture_output=True, text=True
    )
    assert ok.returncode == 0 and "generate" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "noisecraft", "generate", "a 1", "--threads", "-1"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "error: --threads must be 0 (torch's default) or more, got -1"
    ]


def test_eval_writes_each_metric_as_it_comes_and_keeps_them_on_ctrl_c(
    trained, tmp_path, capsys, monkeypatch
):
    """Ctrl-C after FID: the JSON holds FID, marked incomplete, and the command says so."""
    import importlib
    import json

    ev = importlib.import_module("noisecraft.metrics.evaluate")  # the module, not the function

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ev, "kernel_inception_distance", interrupted)
    model = str(trained / "run" / "model.safetensors")
    out = tmp_path / "e.json"
    args = ["eval", model, "--metrics", "fid,kid", "--n", "100", "--steps", "1"]
    assert main([*args, "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert f'interrupted: fid saved to {out} ("complete": false)' in err
    assert "Traceback" not in err
    doc = json.loads(out.read_text())
    assert list(doc["metrics"]) == ["fid"] and doc["metrics"]["fid"] > 0
    assert doc["complete"] is False and doc["steps"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["e.json"]  # no temporary file


def test_eval_interrupted_before_any_metric_writes_nothing(trained, tmp_path, capsys, monkeypatch):
    import noisecraft.pipelines as pipelines

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipelines, "generate", interrupted)
    model = str(trained / "run" / "model.safetensors")
    out = tmp_path / "e.json"
    assert main(["eval", model, "--metrics", "fid", "--n", "100", "--out", str(out)]) == 130
    assert f"interrupted before the first metric; {out} not written" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_eval_bits_per_dim_progress_counts_timesteps_and_json_is_complete(
    trained, tmp_path, capsys
):
    import json

    model = str(trained / "run" / "model.safetensors")
    out = tmp_path / "e.json"
    args = ["eval", model, "--metrics", "bpd", "--bpd-n", "70", "--bpd-timesteps", "3"]
    assert main([*args, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    # 70 images: batches of 64 and 6, each over 3 timesteps -> the bar counts 6 ticks
    assert "bits/dim (2 batches x 3 timesteps)" in err and "6/6" in err
    doc = json.loads(out.read_text())
    assert doc["complete"] is True and doc["metrics"]["bpd"] > 0


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--bpd-timesteps", "-1"], "--bpd-timesteps must be 0 (all T) or a number"),
        (["--batch", "0"], "--batch must be at least 1"),
    ],
)
def test_eval_refuses_negative_counts(trained, tmp_path, capsys, extra, needle):
    model = str(trained / "run" / "model.safetensors")
    args = ["eval", model, "--metrics", "bpd", *extra, "--out", str(tmp_path / "e.json")]
    assert main(args) == 2
    assert needle in _err(capsys)
    assert list(tmp_path.iterdir()) == []
