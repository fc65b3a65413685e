"""Issue 13's contract on the command line: a usage error, an output that cannot be written
or a missing GPU is ONE `error:` line that says what to do, exit code 2, no traceback, and
nothing of the user's lost or left behind.

Tests run as root here, where chmod does not make a folder read-only; the read-only, no
permission and full-disk cases are made by a path under a file (real), by the file-system
facts the pre-check reads (os.statvfs / os.access patched) and by the write itself failing
(os.fsync, PIL's save or safetensors' save_file patched to raise what a full disk raises).
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import typer.main
from PIL import Image

import noisecraft.io.write_errors as write_errors
from noisecraft.cli.main import app, main

ROOT = typer.main.get_command(app)


def _leaves(cmd=ROOT, path=()):
    for name, sub in cmd.commands.items():
        if isinstance(getattr(sub, "commands", None), dict):
            yield from _leaves(sub, (*path, name))
        else:
            yield (*path, name), sub


COMMANDS = dict(_leaves())
IDS = [" ".join(p) for p in COMMANDS]


def one_error_line(capsys) -> str:
    """The single `error:` line on stderr (no traceback, no usage box)."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if "it/s]" not in ln and "s/it]" not in ln]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and "Usage:" not in err and "╭" not in err
    return lines[0]


def _required_args(cmd) -> list[str]:
    return [
        "x" for p in cmd.params if p.param_type_name == "argument" and p.required
    ]  # placeholders: parsing fails before they are used


def _options(cmd, kinds: tuple[type, ...]) -> list[str]:
    out = []
    for p in cmd.params:
        ann = getattr(getattr(p, "type_descriptor", None), "annotation", None)
        if p.param_type_name == "option" and ann in kinds:
            out.append(p.opts[0])
    return out


# --------------------------------------------------------------------------- usage errors


def test_every_command_is_covered():
    assert set(IDS) >= {
        "train",
        "sample",
        "demo",
        "samplers",
        "plot-schedule",
        "convert",
        "eval",
        "generate",
        "viz forward",
        "viz vlb",
    }


@pytest.mark.parametrize("path", COMMANDS, ids=IDS)
def test_unknown_option_is_one_line_for_every_command(path, capsys):
    assert main([*path, "--bogus-flag"]) == 2
    line = one_error_line(capsys)
    assert f"noisecraft {' '.join(path)} has no option --bogus-flag" in line
    assert f"noisecraft {' '.join(path)} --help" in line


@pytest.mark.parametrize("path", COMMANDS, ids=IDS)
def test_numbers_that_are_not_numbers_are_one_line_for_every_command(path, capsys):
    cmd = COMMANDS[path]
    ints, floats = _options(cmd, (int,)), _options(cmd, (float,))
    for opt, word in [(o, "a whole number") for o in ints] + [(o, "a number") for o in floats]:
        assert main([*path, *_required_args(cmd), opt, "abc"]) == 2, opt
        assert one_error_line(capsys) == (
            f"error: {opt} takes {word}, got 'abc'; see noisecraft {' '.join(path)} --help"
        )


@pytest.mark.parametrize("path", COMMANDS, ids=IDS)
def test_an_option_without_its_value_is_one_line_for_every_command(path, capsys):
    cmd = COMMANDS[path]
    takes_value = [
        p for p in cmd.params if p.param_type_name == "option" and not getattr(p, "is_flag", 0)
    ]
    for p in takes_value:
        assert main([*path, *_required_args(cmd), p.opts[0]]) == 2, p.opts
        line = one_error_line(capsys)
        assert line.startswith(f"error: {p.opts[0]} needs a value"), line


@pytest.mark.parametrize(
    "args, expected",
    [
        (["train"], "noisecraft train needs CONFIG (TOML recipe"),
        (["convert"], "usage: noisecraft convert [OPTIONS] SRC DST"),
        (["convert", "a.safetensors"], "noisecraft convert needs DST"),
        (["viz", "forward"], "noisecraft viz forward needs IMAGE"),
        (["viz", "vlb"], "noisecraft viz vlb needs CHECKPOINT"),
    ],
)
def test_missing_argument_names_it_and_shows_the_usage(args, expected, capsys):
    assert main(args) == 2
    assert expected in one_error_line(capsys)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["sampel"], "noisecraft has no command 'sampel'; did you mean 'sample'?"),
        (["genrate", "a 7"], "noisecraft has no command 'genrate'; did you mean 'generate'?"),
        (["viz", "forwrd"], "noisecraft viz has no command 'forwrd'; did you mean 'forward'?"),
        (["xyzzy"], "noisecraft has no command 'xyzzy'; see noisecraft --help"),
        (["sample", "--stesp", "3"], "has no option --stesp; did you mean --steps?"),
        (["generate", "a 7", "--negatve", "x"], "did you mean --negative?"),
        (["eval", "--metric", "fid"], "did you mean --metrics?"),
        (["viz", "forward", "mnist:1", "--sise", "8"], "did you mean --size?"),
        (["sample", "-h"], "did you mean --help?"),
        (["sample", "--overwrite=yes"], "--overwrite is a switch and takes no value; write "),
        (["generate", "a", "handwritten", "7"], 'in quotes: noisecraft generate "a handwritten 7"'),
        (["samplers", "extra"], "noisecraft samplers takes no argument 'extra' here"),
    ],
)
def test_mistyped_commands_and_options_get_the_closest_suggestion(args, expected, capsys):
    assert main(args) == 2
    assert expected in one_error_line(capsys)


@pytest.mark.parametrize("path", [(), *COMMANDS, ("viz",)], ids=["noisecraft", *IDS, "viz"])
def test_help_is_unchanged(path, capsys):
    assert main([*path, "--help"]) == 0
    cap = capsys.readouterr()
    assert "Usage:" in cap.out and cap.err == ""


def test_no_arguments_still_print_the_help(capsys):
    assert main([]) == 2  # click's answer to no_args_is_help, as before
    cap = capsys.readouterr()
    assert "Usage:" in cap.out and "generate" in cap.out


def test_console_usage_error_is_one_line_without_the_box():
    r = subprocess.run(
        [sys.executable, "-m", "noisecraft", "sample", "--steps", "abc"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert r.stderr.splitlines() == [
        "error: --steps takes a whole number, got 'abc'; see noisecraft sample --help"
    ]
    assert r.stdout == ""


# ------------------------------------------------------------------------- no CUDA GPU


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


@NO_CUDA
@pytest.mark.parametrize(
    "args",
    [
        ["eval", "mnist", "--metrics", "bpd"],
        ["viz", "vlb", "mnist"],
        ["sample", "mnist"],
        ["generate", "a handwritten 7"],
    ],
    ids=lambda a: " ".join(a[:2]),
)
def test_device_cuda_without_cuda_is_one_line(args, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([*args, "--device", "cuda"]) == 2
    assert one_error_line(capsys) == "error: --device cuda: this machine has no CUDA GPU; use cpu"
    assert list(tmp_path.iterdir()) == []


@NO_CUDA
def test_bench_sampler_quality_device_cuda_without_cuda_is_one_line(tmp_path):
    bench = Path(__file__).resolve().parent.parent / "bench" / "sampler_quality.py"
    r = subprocess.run(
        [sys.executable, str(bench), "--device", "cuda", "--out", str(tmp_path / "s.md")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert r.stderr.splitlines() == ["error: --device cuda: this machine has no CUDA GPU; use cpu"]
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------- outputs that cannot be written


@pytest.fixture(scope="module")
def sd_file(tmp_path_factory):
    """A tiny random Stable Diffusion-type model as a native file (for convert)."""
    from noisecraft.io.native import save_model
    from test_latent_pipeline import tiny_model

    path = tmp_path_factory.mktemp("sd") / "tiny.safetensors"
    save_model(tiny_model(), path)
    return path


#: each command that writes, with its output(s) in folder {d}
WRITERS = {
    "generate": ["generate", "a handwritten 7", "--steps", "1", "--out", "{d}/g.png"],
    "sample": ["sample", "mnist", "--n", "2", "--steps", "1", "--out", "{d}/s.png"],
    "sample --gif --save-every": [
        *["sample", "mnist", "--n", "2", "--steps", "2", "--out", "{d}/s.png"],
        *["--gif", "{d}/s.gif", "--save-every", "1"],
    ],
    "demo": ["demo", "--steps", "1", "--out-dir", "{d}"],
    "eval": [
        *["eval", "mnist", "--metrics", "bpd", "--bpd-n", "2", "--bpd-timesteps", "2"],
        *["--out", "{d}/e.json"],
    ],
    "viz forward": ["viz", "forward", "mnist:class=7", "--size", "8", "--out", "{d}/f.png"],
    "viz vlb": ["viz", "vlb", "mnist", "--n", "2", "--timesteps", "3", "--out", "{d}/v.png"],
    "plot-schedule": ["plot-schedule", "--num-steps", "10", "--out", "{d}/p.png"],
    "convert --to noisecraft": ["convert", "{sd}", "{d}/n.safetensors", "--to", "noisecraft"],
    "convert --to single-file": ["convert", "{sd}", "{d}/s.safetensors", "--to", "single-file"],
    "convert --to diffusers": ["convert", "{sd}", "{d}/folder", "--to", "diffusers"],
}
#: the first file each writes (where a user's earlier file sits in the mid-write tests)
FIRST_OUTPUT = {
    "generate": "g.png",
    "sample": "s.png",
    "sample --gif --save-every": "s.png",
    "demo": "digits.png",
    "eval": "e.json",
    "viz forward": "f.png",
    "viz vlb": "v.png",
    "plot-schedule": "p.png",
    "convert --to noisecraft": "n.safetensors",
    "convert --to single-file": "s.safetensors",
    "convert --to diffusers": "folder",
}


def _args(name: str, d: Path, sd: Path) -> list[str]:
    return [a.format(d=d, sd=sd) for a in WRITERS[name]]


def _listing(root: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


def _no_work(monkeypatch):
    """Loading a model fails the test: the output checks must come first."""

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the output was checked")

    for mod, name in [
        ("noisecraft.io.native", "load_pixel_diffusion"),
        ("noisecraft.api.loading", "load"),
        ("noisecraft.io.formats.auto", "load_any"),
    ]:
        monkeypatch.setattr(f"{mod}.{name}", boom)
    import noisecraft

    monkeypatch.setattr(noisecraft, "load", boom)


@pytest.mark.parametrize("name", WRITERS)
def test_output_under_a_file_is_refused_before_the_work(name, sd_file, tmp_path, capsys, mp):
    _no_work(mp)
    blocker = tmp_path / "afile"
    blocker.write_text("mine")
    before = _listing(tmp_path)
    assert main(_args(name, blocker / "sub", sd_file)) == 2
    line = one_error_line(capsys)
    assert f"cannot write {blocker}/sub/" in line and f"{blocker} is a file, not a folder" in line
    assert _listing(tmp_path) == before


@pytest.fixture
def mp(monkeypatch):
    return monkeypatch


def _fake_fs(monkeypatch, root: Path, *, readonly=False, full=False, denied=False):
    """What os.statvfs / os.access say about folders under ``root``."""
    real_statvfs, real_access = os.statvfs, os.access

    def statvfs(p):
        st = real_statvfs(p)
        if not Path(p).absolute().is_relative_to(root):
            return st
        fields = list(st)
        if readonly:
            fields[8] |= os.ST_RDONLY  # f_flag
        if full:
            fields[3] = fields[4] = 0  # f_bfree, f_bavail
        return os.statvfs_result(fields)

    def access(p, mode, *a, **k):
        if denied and Path(p).absolute().is_relative_to(root) and mode & os.W_OK:
            return False
        return real_access(p, mode, *a, **k)

    monkeypatch.setattr(write_errors.os, "statvfs", statvfs)
    monkeypatch.setattr(write_errors.os, "access", access)


@pytest.mark.parametrize(
    "case, expected",
    [
        ("readonly", "is on a read-only file system; choose another folder"),
        ("full", "no space left on the disk of {d}; free some space or choose another disk"),
        ("denied", "permission denied in {d}; choose a folder you can write to"),
    ],
)
@pytest.mark.parametrize("name", WRITERS)
def test_unwritable_folder_is_refused_before_the_work(
    name, case, expected, sd_file, tmp_path, capsys, mp
):
    _no_work(mp)
    d = tmp_path / "out"
    d.mkdir()
    _fake_fs(mp, d, **{case: True})
    assert main(_args(name, d, sd_file)) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: cannot write {d}/") and expected.format(d=d) in line, line
    assert list(d.iterdir()) == []


def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("name", WRITERS)
def test_disk_full_during_the_write_keeps_the_old_file_and_leaves_nothing(
    name, sd_file, tmp_path, capsys, mp
):
    """The user's earlier output (replaced with --overwrite) survives a write that fails
    after the work (the disk filled up: fsync reports ENOSPC, or safetensors' save_file
    does), and no temporary file or half set of outputs is left."""
    d = tmp_path / "out"
    d.mkdir()
    first = d / FIRST_OUTPUT[name]
    if name == "convert --to diffusers":
        first.mkdir()
        (first / "model_index.json").write_text("theirs")
        from safetensors import SafetensorError

        def save_file(*a, **k):
            raise SafetensorError(
                "Error while serializing: I/O error: No space left on device (os error 28)"
            )

        mp.setattr("noisecraft.io.formats.diffusers_write.save_file", save_file)
    else:
        first.write_bytes(b"theirs")
        mp.setattr(os, "fsync", _enospc)
    before = _listing(tmp_path)
    assert main([*_args(name, d, sd_file), "--overwrite"]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: cannot write {d}/"), line
    assert f"no space left on the disk of {d}; free some space or choose another disk" in line
    assert _listing(tmp_path) == before


def test_disk_full_inside_the_image_writer(tmp_path, capsys, mp):
    """PIL writes part of the PNG, then the disk is full: the partial temporary file goes."""

    def save(self, fp, *a, **k):
        Path(fp).write_bytes(b"\x89PNG half")
        _enospc()

    mp.setattr(Image.Image, "save", save)
    out = tmp_path / "s.png"
    assert main(["sample", "mnist", "--n", "2", "--steps", "1", "--out", str(out)]) == 2
    assert f"cannot write {out}: no space left" in one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_safetensors_error_of_a_full_disk_names_the_file(sd_file, tmp_path, capsys, mp):
    from safetensors import SafetensorError

    def save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        )

    mp.setattr("noisecraft.io.checkpoint.save_file", save_file)
    out = tmp_path / "new" / "n.safetensors"
    assert main(["convert", str(sd_file), str(out), "--to", "noisecraft"]) == 2
    assert f"cannot write {out}: no space left" in one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []  # the folder made for it is gone too


def test_read_only_rename_is_answered_in_one_line(tmp_path, capsys, mp):
    """EROFS from the final rename (a folder remounted read-only during the work)."""

    def replace(src, dst):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dst))

    import noisecraft.io.atomic as atomic

    mp.setattr(atomic.os, "replace", replace)
    out = tmp_path / "p.png"
    assert main(["plot-schedule", "--num-steps", "10", "--out", str(out)]) == 2
    assert one_error_line(capsys) == (
        f"error: cannot write {out}: {tmp_path} is on a read-only file system; "
        "choose another folder"
    )
    assert list(tmp_path.iterdir()) == []


def test_a_folder_given_as_the_output_file(tmp_path, capsys):
    assert main(["plot-schedule", "--out", str(tmp_path), "--overwrite"]) == 2
    assert one_error_line(capsys) == f"error: {tmp_path} is a folder; give a file name"
