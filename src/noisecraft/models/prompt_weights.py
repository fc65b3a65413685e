"""Prompt emphasis syntax of the AUTOMATIC1111 Stable Diffusion web UI.

A1111 (``modules/prompt_parser.py``, ``parse_prompt_attention``) lets a prompt
raise or lower the weight of a stretch of text:

=====================  ==========================================
``(word)``             weight x 1.1; nesting multiplies: ``((word))`` x 1.21
``[word]``             weight / 1.1; ``[[word]]`` / 1.21
``(word:1.3)``         weight x 1.3 (an explicit factor, may be < 1)
``\\(`` ``\\)`` ...    a literal bracket (also ``\\[``, ``\\]``, ``\\\\``)
``BREAK``              (upper case, a whole word) ends the 75-token chunk
=====================  ==========================================

Unbalanced brackets are text: an unmatched closing bracket is kept as text (as in
A1111), and so is an opening bracket that is never closed, with a
:class:`~noisecraft.errors.PromptWarning` (A1111 would silently weight the rest of the
prompt; a forgotten ``)`` is more often a typo than a wish). Runs with the same weight are
merged. The weights are
applied after the text encoder (A1111 scales each token's hidden state and
then restores the mean); this module only parses.
"""

from __future__ import annotations

import math
import re
import warnings

from noisecraft.errors import ConfigError, PromptWarning

__all__ = ["BREAK", "parse_prompt_attention"]

#: The text of the marker entry that ``parse_prompt_attention`` emits for ``BREAK``
#: (its weight is ``-1.0``, as in A1111).
BREAK = "BREAK"

# The token pattern of A1111's prompt_parser.py (the version that allows spaces
# around an explicit weight, `(word : 1.3 )`); the order of the alternatives matters.
_RE_ATTENTION = re.compile(
    r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|
]|
[^\\()\[\]:]+|
:
""",
    re.X,
)

_RE_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)

_ROUND = 1.1
_SQUARE = 1 / 1.1


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split ``text`` into ``(fragment, weight)`` pairs, as A1111's function of this name.

    The arithmetic is done in the same order as A1111's, so the floats are equal,
    down to the last bit:

    >>> parse_prompt_attention("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    >>> parse_prompt_attention("a ((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")[:4]
    [('a ', 1.0), ('house', 1.4300000000000002), (' ', 1.0), ('on', 0.9090909090909091)]
    >>> parse_prompt_attention(r"\\(literal\\]")
    [('(literal]', 1.0)]
    >>> parse_prompt_attention("a (cat")  # doctest: +SKIP
    [('a (cat', 1.0)]
    >>> parse_prompt_attention("a BREAK b")
    [('a', 1.0), ('BREAK', -1.0), ('b', 1.0)]

    ``BREAK`` yields the entry ``("BREAK", -1.0)``. Inside brackets A1111 multiplies
    that marker's weight too (``(a BREAK b)`` gives ``("BREAK", -1.1)``); this function
    does the same, and :meth:`CLIPTokenizer.encode_weighted
    <noisecraft.models.tokenizer.CLIPTokenizer.encode_weighted>` treats any
    ``"BREAK"`` entry with a negative weight as a break.

    Raises:
        ConfigError: an explicit weight that is not a number, e.g. ``(word:1.2.3)``
            (A1111 fails there with a bare ``ValueError``), or weights that overflow a
            float (A1111 would encode with an infinite weight).
    """
    res: list[list] = []
    # an opening bracket leaves its own text in ``res`` (a placeholder), emptied when it is
    # closed; one never closed stays as literal text
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    for m in _RE_ATTENTION.finditer(text):
        piece = m.group(0)
        weight = m.group(1)
        if piece.startswith("\\"):
            res.append([piece[1:], 1.0])
        elif piece == "(":
            round_brackets.append(len(res))
            res.append([piece, 1.0])
        elif piece == "[":
            square_brackets.append(len(res))
            res.append([piece, 1.0])
        elif weight is not None and round_brackets:
            try:
                factor = float(weight)
            except ValueError:
                factor = math.nan
            if not math.isfinite(factor):  # "1.2.3", or 400 digits (inf)
                raise ConfigError(
                    f"bad emphasis weight '{weight}' in prompt; write it as (text:1.3)"
                ) from None
            _close(res, round_brackets.pop(), factor)
        elif piece == ")" and round_brackets:
            _close(res, round_brackets.pop(), _ROUND)
        elif piece == "]" and square_brackets:
            _close(res, square_brackets.pop(), _SQUARE)
        else:
            for i, part in enumerate(_RE_BREAK.split(piece)):
                if i > 0:
                    res.append([BREAK, -1.0])
                res.append([part, 1.0])

    if round_brackets or square_brackets:
        warnings.warn(
            PromptWarning(
                f"prompt {text!r} has {len(round_brackets) + len(square_brackets)} unclosed "
                "bracket(s); they are read as literal text (close them to weight the words, "
                "or write \\( to mean the bracket itself)"
            ),
            stacklevel=2,
        )
    res = [r for r in res if r[0]] or [["", 1.0]]
    if not all(math.isfinite(r[1]) for r in res):
        raise ConfigError(
            "the emphasis weights of the prompt multiply beyond any float (thousands of nested "
            "brackets, or huge weights inside each other); use fewer brackets"
        )

    # Merge runs of identical weights.
    i = 0
    while i + 1 < len(res):
        if res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return [(str(t), float(w)) for t, w in res]


def _close(res: list[list], start: int, multiplier: float) -> None:
    """Close the bracket whose placeholder is ``res[start]``: weight what it encloses."""
    res[start][0] = ""
    for p in range(start, len(res)):
        res[p][1] *= multiplier
