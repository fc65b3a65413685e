"""User-facing errors.

Every mistake a user can make (bad size, missing file, unknown name, wrong
checkpoint kind) raises a subclass of :class:`NoisecraftError` whose message
says what to do. The CLI prints ``error: <message>`` and exits with code 2;
no traceback is shown for these.

A message that names a setting writes it as ``@name`` with ``name`` listed in
``settings`` (``ConfigError("@steps must be at least 1", settings=["steps"])``):
``str(error)`` shows the Python API's name ("steps must be at least 1") and
:meth:`NoisecraftError.render` lets a surface show its own (the CLI: "--steps"),
so the core never speaks of command-line flags.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping


class NoisecraftError(Exception):
    """Base class of every error that is the user's to fix."""

    def __init__(self, message: str = "", *, settings: Iterable[str] = ()):
        self.template = message
        self.settings = tuple(settings)
        super().__init__(self.render())

    def render(self, names: Mapping[str, str] | None = None) -> str:
        """The message with each ``@setting`` written as ``names[setting]`` (default: the
        setting's own name)."""
        names = names or {}
        out = self.template
        for s in sorted(self.settings, key=len, reverse=True):  # @n after @negative_prompt
            out = out.replace("@" + s, names.get(s, s))
        # one line, even where the message quotes the user's text (--size $'\n')
        return out.replace("\r", "\\r").replace("\n", "\\n")


class UnknownNameError(NoisecraftError, KeyError):
    """A name (sampler, config key, metric, schedule) that is not known."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ConfigError(NoisecraftError, ValueError):
    """A configuration value that is out of range or malformed."""


class DataError(NoisecraftError):
    """A dataset that is missing, empty or unreadable."""


class CheckpointError(NoisecraftError):
    """A checkpoint that is missing, corrupt or of another kind."""


class OutputExistsError(NoisecraftError, FileExistsError):
    """An output file exists and overwriting was not asked for."""


class OutputError(NoisecraftError):
    """An output that cannot be written: a read-only or full disk, no write permission, a
    parent that is a file."""


class NoisecraftWarning(UserWarning):
    """Base class of warnings for the user; the CLI prints them as ``warning: ...``."""


class PromptWarning(NoisecraftWarning):
    """Something in a prompt that is read differently from what it may look like."""


def closest(name: str, choices: Iterable[str]) -> str | None:
    """The choice closest to ``name`` (difflib ratio >= 0.5), or None."""
    matches = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return matches[0] if matches else None


def unknown_name(
    kind: str, name: str, choices: Iterable[str], *, setting: str | None = None
) -> UnknownNameError:
    """Build the one-line error for an unknown ``name``, suggesting the closest choice.
    ``setting``: the setting it was given as (then named in place of ``kind``)."""
    choices = sorted(choices)
    guess = closest(name, choices)
    hint = f"did you mean '{guess}'? " if guess else ""
    what = f"@{setting}" if setting else kind
    return UnknownNameError(
        f"unknown {what} '{name}'; {hint}choose one of: {', '.join(choices)}",
        settings=[setting] if setting else [],
    )
