"""Key-rule tables: the names a model's weights have in another format, written as data.

A checkpoint format names the same tensors its own way: our U-Net's
``input_blocks.1.0.in_layers.0.weight`` is diffusers' ``down_blocks.0.resnets.0.norm1.weight``,
our text encoder's ``encoder.layers.3.self_attn.q_proj.weight`` is the first third of
OpenCLIP's ``transformer.resblocks.3.attn.in_proj_weight``. A :class:`Rule` pairs a key
pattern in our names with one in theirs (and, where the tensor changes too, a transform); a
:class:`Table` is an ordered tuple of rules. ONE mapper applies any table, in either
direction: :func:`to_theirs` (our state dict -> their names) and :func:`to_ours` (back). The
per-component modules (``noisecraft.models.vae_keys``, ``noisecraft.io.formats.keys.*``) hold
tables and nothing else, so a new model family or file layout is new tables, not new code.

**Patterns.** ``{name}`` is a field: one integer (``\\d+``), ``{rest}`` any non-empty tail
(``.+``), ``{name:regex}`` whatever ``regex`` matches (declared once, on either side). The
value a field matched on one side is written into the other side's pattern, so both sides
name the same fields (except the part field of a :class:`Split`). Everything else is literal.

**Matching.** The first rule, in table order, whose pattern matches the WHOLE key names it;
so specific rules come before catch-alls (``...nin_shortcut.{rest}`` before ``...{rest}``).
Three kinds of rules:

* :func:`rule`: read and written;
* :func:`read_only`: another spelling of theirs that is read, never written (diffusers'
  legacy ``query`` / ``key`` / ``value`` VAE names);
* :func:`ignore`: a tensor of theirs that is no part of our model (``position_ids``, LDM's
  training-loss weights, OpenCLIP's unused ``text_projection``).

**Result.** A :class:`Mapped`: the renamed tensors in input order, and the input keys that
were ``ignored`` or ``unmapped``. Nothing is dropped silently: a key no rule matches, a split
tensor with a part missing, or a key whose new name another key already took is
``unmapped``, and the caller refuses it (with a message naming its file) or passes it on.
A rename never copies a tensor (the output holds the same object); a reshape returns a view;
only a join (:class:`Split`, ours -> theirs) concatenates.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

__all__ = [
    "Conv1x1",
    "Mapped",
    "Rule",
    "Split",
    "Table",
    "Transform",
    "ignore",
    "read_only",
    "rule",
    "to_ours",
    "to_theirs",
    "under",
]

_FIELD = re.compile(r"\{(\w+)(?::([^{}]+))?\}")
_DEFAULT_FIELD = r"\d+"
_NAMED_FIELDS = {"rest": ".+"}


# ---------------------------------------------------------------------------- transforms


class Transform(Protocol):
    """How a tensor changes between our format and theirs (besides its name)."""

    def to_theirs(self, value: Tensor) -> Tensor: ...

    def to_ours(self, value: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class Conv1x1:
    """Our weight is a 1x1 convolution's ``(out, in, 1, 1)``; theirs a Linear's ``(out, in)``
    when ``linear`` (diffusers' VAE attention), else the same convolution. Reading accepts
    both shapes (some converters store Linear-shaped weights in LDM files). Views, no copy."""

    linear: bool = True

    def to_theirs(self, value: Tensor) -> Tensor:
        return value[:, :, 0, 0] if self.linear and value.ndim == 4 else value

    def to_ours(self, value: Tensor) -> Tensor:
        return value[:, :, None, None] if value.ndim == 2 else value


@dataclass(frozen=True)
class Split:
    """We hold ``len(parts)`` tensors, one per value of the field ``field``; they hold one,
    the parts concatenated along ``dim`` in the order of ``parts``
    (``nn.MultiheadAttention``'s ``in_proj``: q, k, v stacked on dim 0).

    Reading splits into views (no copy); writing concatenates (one copy).
    """

    field: str
    parts: tuple[str, ...]
    dim: int = 0

    def split(self, value: Tensor) -> tuple[Tensor, ...]:
        return value.chunk(len(self.parts), dim=self.dim)

    def join(self, values: Sequence[Tensor]) -> Tensor:
        return torch.cat(list(values), dim=self.dim)


# ---------------------------------------------------------------------------- patterns


@dataclass(frozen=True)
class _Pattern:
    """A compiled key pattern: literal pieces and field names alternate in ``pieces``."""

    text: str
    pieces: tuple[tuple[bool, str], ...]  # (is_field, literal text or field name)
    regex: re.Pattern[str] | None  # None for a literal key
    fields: frozenset[str]
    bucket: str  # literal text before the first field, up to its last "." (index key)

    @property
    def literal(self) -> bool:
        return not self.fields

    def write(self, values: Mapping[str, str]) -> str:
        return "".join(values[s] if is_field else s for is_field, s in self.pieces)


def _declared(text: str) -> dict[str, str]:
    return {m[1]: m[2] for m in _FIELD.finditer(text) if m[2] is not None}


def _compile(text: str, regexes: Mapping[str, str]) -> _Pattern:
    pieces: list[tuple[bool, str]] = []
    parts: list[str] = []
    names: list[str] = []
    pos = 0
    for m in _FIELD.finditer(text):
        if m.start() > pos:
            pieces.append((False, text[pos : m.start()]))
            parts.append(re.escape(text[pos : m.start()]))
        name = m[1]
        if name in names:
            raise ValueError(f"key pattern {text!r} names the field {{{name}}} twice")
        names.append(name)
        pieces.append((True, name))
        parts.append(f"(?P<{name}>{regexes[name]})")
        pos = m.end()
    if pos < len(text):
        pieces.append((False, text[pos:]))
        parts.append(re.escape(text[pos:]))
    if not names:
        return _Pattern(text, tuple(pieces), None, frozenset(), text)
    head = text[: text.index("{")]
    bucket = head[: head.rfind(".") + 1]
    return _Pattern(text, tuple(pieces), re.compile("".join(parts)), frozenset(names), bucket)


@dataclass(frozen=True)
class Rule:
    """One pair of key patterns (see the module docstring); build with :func:`rule`,
    :func:`read_only` or :func:`ignore`. ``ours`` is None for an ignored key of theirs."""

    ours: str | None
    theirs: str
    transform: Transform | Split | None = None
    read_only: bool = False
    _ours: _Pattern | None = field(init=False, repr=False, compare=False, default=None)
    _theirs: _Pattern | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        regexes = dict(_NAMED_FIELDS)
        declared = _declared(self.theirs)
        for name, regex in _declared(self.ours or "").items():
            if declared.get(name, regex) != regex:
                raise ValueError(f"field {{{name}}} has two patterns in {self}")
            declared[name] = regex
        if isinstance(self.transform, Split):
            declared[self.transform.field] = "|".join(map(re.escape, self.transform.parts))
        regexes.update(declared)
        names = {m[1] for m in _FIELD.finditer(self.theirs + (self.ours or ""))}
        for name in names:
            regexes.setdefault(name, _DEFAULT_FIELD)
        theirs = _compile(self.theirs, regexes)
        object.__setattr__(self, "_theirs", theirs)
        if self.ours is None:
            return
        ours = _compile(self.ours, regexes)
        split = {self.transform.field} if isinstance(self.transform, Split) else set()
        if ours.fields != theirs.fields | split or theirs.fields & split:
            raise ValueError(
                f"the two sides of {self} must name the same fields (a Split's field: ours only)"
            )
        object.__setattr__(self, "_ours", ours)


def rule(ours: str, theirs: str, transform: Transform | Split | None = None) -> Rule:
    """A key read and written: ``ours`` <-> ``theirs``, with an optional tensor transform."""
    return Rule(ours, theirs, transform)


def read_only(ours: str, theirs: str, transform: Transform | Split | None = None) -> Rule:
    """Another spelling of theirs: read as ``ours``, never written."""
    return Rule(ours, theirs, transform, read_only=True)


def ignore(theirs: str) -> Rule:
    """A key of theirs that is no part of our model: reported in ``Mapped.ignored``."""
    return Rule(None, theirs)


def under(ours_prefix: str, theirs_prefix: str, rules: Iterable[Rule]) -> tuple[Rule, ...]:
    """``rules`` with ``ours_prefix`` / ``theirs_prefix`` put before their patterns (the
    leaves of a block, the parts of a container)."""
    return tuple(
        Rule(
            None if r.ours is None else ours_prefix + r.ours,
            theirs_prefix + r.theirs,
            r.transform,
            r.read_only,
        )
        for r in rules
    )


# ---------------------------------------------------------------------------- tables


class _Index:
    """One side of a table: literal keys in a dict, patterns bucketed by literal prefix."""

    def __init__(self, entries: list[tuple[int, _Pattern, Rule]]):
        self.exact: dict[str, tuple[int, Rule]] = {}
        self.buckets: dict[str, list[tuple[int, _Pattern, Rule]]] = {}
        for i, pattern, r in entries:
            if pattern.literal:
                self.exact.setdefault(pattern.text, (i, r))
            else:
                self.buckets.setdefault(pattern.bucket, []).append((i, pattern, r))

    def find(self, key: str) -> tuple[Rule, dict[str, str]] | None:
        best: tuple[Rule, dict[str, str]] | None = None
        best_i = 1 << 62
        hit = self.exact.get(key)
        if hit is not None:
            best_i, best = hit[0], (hit[1], {})
        start = 0
        while True:
            for i, pattern, r in self.buckets.get(key[:start], ()):
                if i >= best_i:
                    break
                m = pattern.regex.fullmatch(key)  # type: ignore[union-attr]
                if m is not None:
                    best_i, best = i, (r, m.groupdict())
                    break
            dot = key.find(".", start)
            if dot < 0:
                return best
            start = dot + 1


class Table:
    """An ordered tuple of :class:`Rule` s (nested iterables are flattened), compiled once
    per direction on first use. Concatenate with ``+``."""

    def __init__(self, *rules: Rule | Iterable[Rule]):
        flat: list[Rule] = []
        for item in rules:
            flat.extend([item] if isinstance(item, Rule) else item)
        self.rules: tuple[Rule, ...] = tuple(flat)
        self._indexes: dict[bool, _Index] = {}

    def __iter__(self):
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def __add__(self, other: Iterable[Rule]) -> Table:
        return Table(self.rules, other)

    def __repr__(self) -> str:
        return f"Table({len(self.rules)} rules)"

    def index(self, reading: bool) -> _Index:
        """The side matched when reading theirs (``reading``) or writing ours."""
        found = self._indexes.get(reading)
        if found is None:
            if reading:
                entries = [(i, r._theirs, r) for i, r in enumerate(self.rules)]
            else:
                entries = [
                    (i, r._ours, r)
                    for i, r in enumerate(self.rules)
                    if r._ours is not None and not r.read_only
                ]
            found = self._indexes[reading] = _Index(entries)  # type: ignore[arg-type]
        return found


# ---------------------------------------------------------------------------- the mapper


@dataclass(frozen=True)
class Mapped:
    """What a table made of a state dict: ``tensors`` under the new names (input order), and
    the input keys that were ``ignored`` (an :func:`ignore` rule) or ``unmapped`` (no rule
    matched, a part of a split tensor is missing, or the new name was already taken)."""

    tensors: dict[str, Tensor]
    unmapped: tuple[str, ...]
    ignored: tuple[str, ...]


def to_theirs(table: Table, state_dict: Mapping[str, Tensor]) -> Mapped:
    """Our state dict under their names (see the module docstring)."""
    return _apply(table, state_dict, reading=False)


def to_ours(table: Table, state_dict: Mapping[str, Tensor]) -> Mapped:
    """Their state dict under our names (see the module docstring)."""
    return _apply(table, state_dict, reading=True)


def _apply(table: Table, state_dict: Mapping[str, Tensor], *, reading: bool) -> Mapped:
    index = table.index(reading)
    out: list[tuple[str, str, Tensor | None]] = []  # (input key, new name, tensor or a join)
    joins: dict[str, tuple[Split, dict[str, str]]] = {}  # new name -> (split, part -> key)
    unmapped: set[str] = set()
    ignored: list[str] = []
    for key, value in state_dict.items():
        found = index.find(key)
        if found is None:
            unmapped.add(key)
            continue
        r, values = found
        if r.ours is None:
            ignored.append(key)
            continue
        target = r._ours if reading else r._theirs
        assert target is not None
        t = r.transform
        if isinstance(t, Split) and reading:
            if value.ndim <= t.dim or value.shape[t.dim] % len(t.parts):
                unmapped.add(key)  # cannot hold the parts
                continue
            for part, piece in zip(t.parts, t.split(value), strict=True):
                out.append((key, target.write({**values, t.field: part}), piece))
        elif isinstance(t, Split):
            part = values.pop(t.field)
            name = target.write(values)
            joins.setdefault(name, (t, {}))[1][part] = key
            if part == t.parts[0]:
                out.append((key, name, None))
        else:
            if t is not None:
                value = t.to_ours(value) if reading else t.to_theirs(value)
            out.append((key, target.write(values), value))
    incomplete = {name for name, (split, keys) in joins.items() if set(keys) != set(split.parts)}
    for name in incomplete:
        unmapped.update(joins[name][1].values())
    tensors: dict[str, Tensor] = {}
    for key, name, value in out:
        if value is None:
            if name in incomplete:
                continue
            split, keys = joins[name]
            if name in tensors:
                unmapped.update(keys.values())
                continue
            value = split.join([state_dict[keys[p]] for p in split.parts])
        if name in tensors:
            unmapped.add(key)
            continue
        tensors[name] = value
    order = [k for k in state_dict if k in unmapped]
    return Mapped(tensors, tuple(order), tuple(ignored))
