"""The text side of CLIP's tokenizer: clean-up, pre-tokenisation and the byte-level alphabet.

The first three of the four steps from text to token ids, as OpenAI's
``clip/simple_tokenizer.py`` (the fourth, BPE, is :class:`~noisecraft.models.tokenizer.
CLIPTokenizer`):

1. **Clean-up.** CLIP runs ``ftfy.fix_text``, then ``html.unescape`` twice, collapses
   runs of whitespace to one space, strips, and lower-cases. ftfy is optional here:
   with ``use_ftfy=None`` (the default) it is used when installed; without it the
   text is only NFC-normalised (ftfy's last step), so the mojibake and typography
   repairs of ftfy (curly quotes -> straight, full-width -> ASCII, ligatures
   split, ...) are not made. ``cleanup="transformers"`` instead reproduces
   transformers' ``CLIPTokenizer`` (>= 5, the `tokenizers` backend used by
   diffusers): NFC, whitespace collapse and a per-character lower-case, **no HTML
   unescaping** (``"&amp;"`` stays four characters) and no final-sigma rule
   (``"Σ"`` is always ``"σ"``, where Python's ``str.lower`` gives ``"ς"`` at a
   word's end). The start / end token strings typed in a prompt become their ids:
   CLIP finds them as words of the cleaned text (so ``"<|ENDOFTEXT|>"`` counts too),
   transformers in the raw text before clean-up (so ``"x,<|endoftext|>"`` counts too).
2. **Pre-tokenisation.** CLIP's pattern
   ``<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+``
   splits the text into words. ``\\p{L}`` and ``\\p{N}`` need the third-party ``regex``
   module; here they are written with the standard ``re``: Python's ``\\w`` is exactly
   letters, numbers and ``_``, ``\\d`` is exactly ``Nd``, so letters are ``[^\\W\\d_]+``
   minus the other numbers (``Nl``, ``No``: ``²``, ``½``, ``Ⅻ``), which are split off
   as one-character words afterwards, and the punctuation class is
   ``(?:[^\\w\\s]|_)+``. ``\\s`` is spelled out as Unicode ``White_Space`` (Python's own
   ``\\s`` also matches the separators U+001C..U+001F, ``regex`` and Rust do not).
   OpenAI compiles the pattern case-insensitively (``"'ſ"`` with a long s is then a
   contraction), transformers does not; each cleanup mode follows its reference.
   Characters that the running Python's Unicode database (3.11: Unicode 14) does not
   know yet may be classed differently from a newer ``regex`` / Rust build.
3. **Bytes -> symbols.** Each word's UTF-8 bytes are mapped to 256 printable
   characters (the GPT-2 byte-level table, Radford et al. 2019), so every string is
   representable without an unknown token; the last symbol of a word gets the
   suffix ``</w>``.
"""

from __future__ import annotations

import html
import re
import unicodedata
from functools import cache
from typing import Literal

from noisecraft.errors import unknown_name

__all__ = [
    "BOS_TOKEN",
    "CLEANUPS",
    "EOS_TOKEN",
    "EOW",
    "Cleanup",
    "bytes_to_unicode",
    "clean_text",
    "pretokenize",
]

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
#: Suffix of a word's last symbol.
EOW = "</w>"

Cleanup = Literal["clip", "transformers"]
CLEANUPS = ("clip", "transformers")

# Unicode White_Space (what `regex`'s and Rust's \s match); Python's \s adds U+001C..U+001F.
_WS = r"\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_RE_WS = re.compile(f"[{_WS}]+")
_WORD_PATTERN = (
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"
    r"|[^\W\d_]+"  # letters, plus Nl/No numbers that are split off in pretokenize
    r"|\d"  # Nd, one digit per word
    rf"|(?:[^\w{_WS}]|_)+"  # neither whitespace nor letter nor number
)
# OpenAI compiles its pattern with IGNORECASE (so "'ſ", long s, is a contraction);
# transformers' is case-sensitive. Both run on lower-cased text.
_RE_WORD = {
    "clip": re.compile(_WORD_PATTERN, re.IGNORECASE),
    "transformers": re.compile(_WORD_PATTERN),
}


@cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table, in CLIP's vocabulary order.

    The 188 printable Latin-1 bytes map to themselves; the other 68 (controls,
    space, soft hyphen, ...) map to U+0100 onwards. The insertion order (printable
    bytes first) is the order of the first 256 vocabulary entries.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


def _ftfy_available() -> bool:
    try:
        import ftfy  # noqa: F401
    except ImportError:
        return False
    return True


def clean_text(text: str, *, cleanup: Cleanup = "clip", use_ftfy: bool | None = None) -> str:
    """Normalise a prompt the way CLIP (``"clip"``) or transformers (``"transformers"``) does.

    ``"clip"``: ``ftfy.fix_text`` (or NFC only, when ftfy is not used), ``html.unescape``
    twice, whitespace collapse, strip, ``str.lower``; as OpenAI's ``basic_clean`` +
    ``whitespace_clean``. ``"transformers"``: NFC, whitespace collapse, per-character
    lower-case; as the normaliser of transformers' ``CLIPTokenizer`` (no HTML
    unescaping, no final sigma). ``use_ftfy=None`` uses ftfy when it is installed.
    """
    if cleanup == "clip":
        if use_ftfy is None:
            use_ftfy = _ftfy_available()
        if use_ftfy:
            import ftfy

            text = ftfy.fix_text(text)
        else:
            text = unicodedata.normalize("NFC", text)
        text = html.unescape(html.unescape(text))
        return _RE_WS.sub(" ", text).strip().lower()
    if cleanup == "transformers":
        text = _RE_WS.sub(" ", unicodedata.normalize("NFC", text))
        # Rust lower-cases char by char; only Σ has a context rule in str.lower.
        return "".join(c.lower() for c in text) if "Σ" in text else text.lower()
    raise unknown_name("tokenizer cleanup", str(cleanup), CLEANUPS)


def pretokenize(text: str, cleanup: Cleanup = "clip") -> list[str]:
    """CLIP's word split of already cleaned text (see the module docstring)."""
    words: list[str] = []
    for word in _RE_WORD[cleanup].findall(text):
        if len(word) > 1 and word.isalnum() and not word.isalpha():
            # A [^\W\d_]+ match holding Nl/No numbers: letters stay runs, numbers single.
            run: list[str] = []
            for c in word:
                if c.isalpha():
                    run.append(c)
                else:
                    if run:
                        words.append("".join(run))
                        run = []
                    words.append(c)
            if run:
                words.append("".join(run))
        else:
            words.append(word)
    return words
