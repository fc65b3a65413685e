"""Issue 13's contract on the command line: a usage error is ONE `error:` line that says
what to do (the closest option or command), exit code 2, no traceback, no usage box."""

from __future__ import annotations

import subprocess
import sys

import pytest
import typer.main

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
