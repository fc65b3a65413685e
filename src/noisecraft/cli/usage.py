"""Usage errors as one ``error:`` line that says what to do.

typer/click answer an unknown option or command, a value of the wrong type or a missing
argument with a usage box of five or six lines. The CLI runs typer with
``standalone_mode=False`` and hands its :class:`UsageError` to :func:`usage_message`, which
writes one line naming the command, suggesting the closest option or command
(:func:`noisecraft.errors.closest`) and pointing at ``--help``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

try:  # typer >= 0.2x carries its own copy of click
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - typer on the click package
    from click import exceptions as click_exceptions

from noisecraft.errors import closest

PROG = "noisecraft"

UsageError = click_exceptions.UsageError
NoArgsIsHelpError = getattr(click_exceptions, "NoArgsIsHelpError", ())

#: what a parameter of each Python type takes, for "--steps takes a whole number"
_TYPE_WORDS = {int: "a whole number", float: "a number", Path: "a path", str: "text"}


def usage_message(e: Exception, root: Any, argv: Sequence[str]) -> str:
    """One line (without ``error:``) for the click usage error ``e`` raised while parsing
    ``argv`` against the command tree ``root`` (``typer.main.get_command(app)``)."""
    cmd, path = _command_of(e, root, argv)
    see = f"{path} --help"
    text = " ".join(str(getattr(e, "message", e)).split())
    if isinstance(e, click_exceptions.NoSuchOption):
        opt = e.option_name
        guess = "--help" if opt in ("-h", "-help", "help") else _closest_option(opt, cmd)
        hint = f"did you mean {guess}? ({see} lists the options)" if guess else f"see {see}"
        return f"{path} has no option {opt}; {hint}"
    m = re.match(r"No such command '([^']*)'", text)
    if m and _is_group(cmd):
        name = m.group(1)
        guess = closest(name, _command_names(cmd))
        hint = f"did you mean '{guess}'? ({see} lists them)" if guess else f"see {see}"
        return f"{path} has no command '{name}'; {hint}"
    if isinstance(e, click_exceptions.MissingParameter) and e.param is not None:
        what = _param_label(e.param)
        helptext = getattr(e.param, "help", None)
        about = f" ({helptext})" if helptext else ""
        return f"{path} needs {what}{about}; usage: {_usage(cmd, path)}"
    if isinstance(e, click_exceptions.BadParameter) and e.param is not None:
        return _bad_value(e, argv, see)
    if isinstance(e, click_exceptions.BadOptionUsage):
        return _bad_option_usage(e, cmd, see)
    m = re.match(r"Got unexpected extra argument(?:s|\(s\))? \((.*)\)", text)
    if m:
        quote = ""
        if any(getattr(p, "name", None) == "prompt" for p in getattr(cmd, "params", ())):
            quote = f'; put a prompt of several words in quotes: {path} "a handwritten 7"'
        return f"{path} takes no argument '{m.group(1)}' here{quote or f'; see {see}'}"
    text = text[:1].lower() + text[1:] if text else "invalid usage"
    return f"{text.rstrip('.')}; see {see}"


def _command_of(e: Exception, root: Any, argv: Sequence[str]) -> tuple[Any, str]:
    """The command the error is about and its path as typed (``noisecraft viz forward``)."""
    ctx = getattr(e, "ctx", None)
    if ctx is not None:
        names = []
        while ctx.parent is not None:
            names.append(ctx.info_name)
            ctx = ctx.parent
        cmd = e.ctx.command
        return cmd, " ".join([PROG, *reversed(names)])
    cmd, names = root, []  # no context (an option without its value): follow argv
    for token in argv:
        if token.startswith("-"):
            continue
        sub = cmd.commands.get(token) if _is_group(cmd) else None
        if sub is None:
            break
        cmd, names = sub, [*names, token]
    return cmd, " ".join([PROG, *names])


def _is_group(cmd: Any) -> bool:
    return isinstance(getattr(cmd, "commands", None), dict)


def _option_names(cmd: Any) -> list[str]:
    names = ["--help"]
    for p in getattr(cmd, "params", ()):
        if getattr(p, "param_type_name", "") == "option":
            names += [*p.opts, *p.secondary_opts]
    return names


def _closest_option(opt: str, cmd: Any) -> str | None:
    """The option closest to ``opt``, compared without the dashes they all share."""
    names = {o.lstrip("-"): o for o in _option_names(cmd)}
    guess = closest(opt.lstrip("-"), names)
    return names[guess] if guess else None


def _command_names(group: Any) -> list[str]:
    return [n for n, c in group.commands.items() if not getattr(c, "hidden", False)]


def _param_label(param: Any) -> str:
    if getattr(param, "param_type_name", "") == "argument":
        return param.name.upper()
    return "/".join(param.opts)


def _usage(cmd: Any, path: str) -> str:
    parts = [path, "[OPTIONS]"]
    for p in getattr(cmd, "params", ()):
        if getattr(p, "param_type_name", "") == "argument":
            parts.append(p.name.upper() if p.required else f"[{p.name.upper()}]")
    return " ".join(parts)


def _given_value(opts: Sequence[str], argv: Sequence[str]) -> str | None:
    """The value typed after one of ``opts`` (last one wins, as click reads it)."""
    value = None
    for i, token in enumerate(argv):
        for opt in opts:
            if token == opt and i + 1 < len(argv):
                value = argv[i + 1]
            elif token.startswith(opt + "="):
                value = token[len(opt) + 1 :]
    return value


def _type_word(param: Any) -> str | None:
    ann = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    if ann in _TYPE_WORDS:
        return _TYPE_WORDS[ann]
    name = getattr(getattr(param, "type", None), "name", None)  # typer on click
    return {"integer": _TYPE_WORDS[int], "float": _TYPE_WORDS[float]}.get(name)


def _bad_value(e: Any, argv: Sequence[str], see: str) -> str:
    param = e.param
    label = _param_label(param)
    word = _type_word(param)
    value = _given_value(param.opts, argv) if param.param_type_name == "option" else None
    got = f", got '{value}'" if value is not None else ""
    if word in (_TYPE_WORDS[int], _TYPE_WORDS[float]):
        return f"{label} takes {word}{got}; see {see}"
    reason = " ".join(str(e.message).split()).rstrip(".")
    return f"invalid value for {label}{got}: {reason}; see {see}"


def _bad_option_usage(e: Any, cmd: Any, see: str) -> str:
    opt = e.option_name
    param = next((p for p in getattr(cmd, "params", ()) if opt in p.opts), None)
    helptext = getattr(param, "help", None)
    if "does not take a value" in str(e.message):
        flags = [*param.opts, *param.secondary_opts] if param is not None else [opt]
        return f"{opt} is a switch and takes no value; write {' or '.join(flags)}"
    if "requires an argument" in str(e.message):
        about = f": {helptext}" if helptext else f"; see {see}"
        return f"{opt} needs a value{about}"
    text = " ".join(str(e.message).split()).rstrip(".")
    return f"{text[:1].lower() + text[1:]}; see {see}"


__all__ = ["NoArgsIsHelpError", "UsageError", "usage_message"]
