"""The LoRAs of a pipeline: loaded ones, AUTOMATIC1111's ``<lora:NAME:W>`` prompt tags, and
what the PNG parameters say about them.

Policy shared by every surface, as A1111 behaves (``extensions-builtin/Lora``):

* ``pipe.load_lora(path, weight)`` / ``noisecraft.load(..., loras=[(path, weight)])`` keep a
  LoRA applied to every call until ``unload_lora(name)`` / ``unload_loras()``.
* ``<lora:NAME>``, ``<lora:NAME:W>`` or ``<lora:NAME:TE:UNET>`` (``te=`` / ``unet=`` named
  too) in a prompt applies ``NAME`` (a file ``NAME.safetensors`` / ``.pt`` / ``.ckpt`` in the
  LoRA folder, ``lora_dir``, searched recursively; or a loaded LoRA of that name) for that call
  only; the tag is removed from the text before it is encoded (A1111 removes it and leaves the
  spaces around it). A tag for a loaded LoRA sets its weight for the call. Only the positive
  prompt is read, as A1111 does; the prompts of one call must name the same LoRAs (they are
  merged into the weights the whole batch shares).
* Weights are merged for the call (:class:`~noisecraft.adapters.MergedLoRAs`) and stay
  merged until a call asks for another set: a LoRA not in the next prompt is no longer
  applied, and an unchanged set costs nothing.
* The infotext keeps the prompt's tags, adds a tag for each loaded LoRA the prompt does not
  name (so A1111 and :meth:`Pipeline.replay` apply it too) and writes ``Lora hashes: "name:
  <short hash>, ..."`` (A1111's ``network_hash``: the tensor bytes of a ``.safetensors``).
  Replaying finds each LoRA by name; a file whose hash differs from the recorded one gives a
  :class:`LoRAHashWarning` (the image may differ; a newer version of a LoRA is common).
* Fast mode's int8 U-Net is quantised after the load-time LoRAs are merged; the set cannot
  change afterwards (refused in one line). Low-memory mode merges into the stored fp16 / int8
  weights (requantised), offload into the CPU weights.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from noisecraft.adapters import AppliedLoRA, LoRAFile, MergedLoRAs, read_lora
from noisecraft.errors import CheckpointError, ConfigError, NoisecraftWarning, unknown_name
from noisecraft.io.file_hash import network_hash, short_hash
from noisecraft.io.shipped import SHIPPED_LORA_DIR

__all__ = [
    "LORA_HASHES",
    "LORA_SUFFIXES",
    "LoRAHashWarning",
    "LoRATag",
    "LoadedLoRA",
    "PipelineLoRAs",
    "format_lora_hashes",
    "lora_spec",
    "parse_lora_hashes",
    "parse_lora_tags",
]

#: Suffixes of LoRA files found by name, in the order preferred.
LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")
#: The infotext field A1111 writes.
LORA_HASHES = "Lora hashes"
# A1111's extra-network tag: <type:arg1:arg2...> (modules/extra_networks.py re_extra_net)
_TAG = re.compile(r"<(\w+):([^>]+)>")


class LoRAHashWarning(NoisecraftWarning):
    """A LoRA found by name is not the file an image was made with."""


@dataclass(frozen=True)
class LoRATag:
    """One ``<lora:...>`` tag: the LoRA's name and its text-encoder / U-Net weights."""

    name: str
    te_weight: float = 1.0
    unet_weight: float = 1.0


@dataclass(frozen=True)
class LoadedLoRA:
    """A LoRA a pipeline applies: its ``name`` (file stem), ``path``, weights and A1111 hash."""

    name: str
    path: Path
    te_weight: float
    unet_weight: float
    short_hash: str

    @property
    def weight(self) -> float:
        return self.unet_weight


def _number(text: str, tag: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{tag}: the weight '{text}' is not a number") from None


def parse_lora_tags(prompt: str) -> tuple[str, list[LoRATag]]:
    """The prompt without its ``<lora:...>`` tags, and the tags (A1111's syntax: ``<lora:NAME>``,
    ``<lora:NAME:W>``, ``<lora:NAME:TE:UNET>``, ``te=`` / ``unet=``; weight 1 by default, the
    U-Net's equal to the text encoder's unless given). Tags of other types are left as text."""
    tags: list[LoRATag] = []

    def take(m: re.Match[str]) -> str:
        if m[1] not in ("lora", "lyco"):  # A1111 reads <lyco:...> (LyCORIS) as a LoRA tag
            return m[0]
        name, *args = m[2].split(":")
        positional = [a for a in args if "=" not in a]
        named = dict(a.split("=", 1) for a in args if "=" in a)
        unknown = set(named) - {"te", "unet"}
        if not name.strip() or len(positional) > 2 or unknown:
            raise ConfigError(
                f"{m[0]}: write <lora:NAME>, <lora:NAME:WEIGHT> or <lora:NAME:TE:UNET>"
            )
        te = _number(named.get("te", positional[0] if positional else "1"), m[0])
        unet_text = named.get("unet", positional[1] if len(positional) > 1 else None)
        unet = te if unet_text is None else _number(unet_text, m[0])
        tags.append(LoRATag(name.strip(), te, unet))
        return ""

    return _TAG.sub(take, prompt), tags


def _weight_text(w: float) -> str:
    return f"{w:g}"


def format_tag(name: str, te: float, unet: float) -> str:
    """The ``<lora:...>`` tag of a LoRA with these weights."""
    if te == unet:
        return f"<lora:{name}:{_weight_text(te)}>"
    return f"<lora:{name}:{_weight_text(te)}:{_weight_text(unet)}>"


def lora_spec(item: Any) -> tuple[Path, float]:
    """A load-time LoRA as (path, weight): a path, ``(path, weight)``, or ``"FILE[:WEIGHT]"``
    (the weight after the last colon when it is a number)."""
    if isinstance(item, (tuple, list)):
        if len(item) != 2:
            raise ConfigError(f"@loras items are (path, weight), got {item!r}", settings=["loras"])
        path, weight = item
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ConfigError(f"LoRA weight must be a number, got {weight!r}", settings=["loras"])
        return Path(path), float(weight)
    text = os.fspath(item)
    head, sep, tail = text.rpartition(":")
    if sep and head and not Path(text).exists():
        try:
            return Path(head), float(tail)
        except ValueError:
            pass
    return Path(text), 1.0


def format_lora_hashes(loras: Iterable[LoadedLoRA]) -> str:
    """A1111's ``Lora hashes`` value: ``name: hash, name2: hash2`` (``:`` / ``,`` dropped
    from names)."""
    return ", ".join(
        f"{lo.name.replace(':', '').replace(',', '')}: {lo.short_hash}" for lo in loras
    )


def parse_lora_hashes(text: str) -> dict[str, str]:
    """Inverse of :func:`format_lora_hashes`."""
    out = {}
    for item in text.split(","):
        name, sep, h = item.rpartition(":")
        if sep and name.strip():
            out[name.strip()] = h.strip()
    return out


def _scan(folder: Path | None) -> dict[str, Path]:
    """LoRA files under ``folder`` (recursively) by file stem; {} for None or no folder."""
    found: dict[str, Path] = {}
    if folder is None or not folder.is_dir():
        return found
    for suffix in reversed(LORA_SUFFIXES):
        for p in sorted(folder.rglob("*" + suffix)):
            found[p.stem] = p
    return found


class PipelineLoRAs:
    """The LoRA state of one pipeline (module docstring)."""

    def __init__(self, lora_dir: str | os.PathLike | None = None):
        self.lora_dir = None if lora_dir is None else Path(lora_dir)
        self.model: Any = None
        self.merged: MergedLoRAs | None = None
        self.frozen: str | None = None  # why the merged set cannot change
        self._loaded: dict[str, LoadedLoRA] = {}
        self._files: dict[tuple[str, int, int], LoRAFile] = {}
        self._hashes: dict[tuple[str, int, int], str] = {}
        self._signature: list[tuple[str, float, float]] = []

    def bind(self, model: Any, requantize: Any = None) -> None:
        """Work on ``model`` (``requantize``: for low-memory int8 weights)."""
        if self.model is not model and self.frozen is None:
            self.model = model
            self.merged = MergedLoRAs(model, requantize)

    # ------------------------------------------------------------------ files
    def _stat_key(self, path: Path) -> tuple[str, int, int]:
        try:
            st = path.stat()
        except OSError:
            raise CheckpointError(f"LoRA file {path} does not exist") from None
        return (str(path.resolve()), st.st_mtime_ns, st.st_size)

    def _read(self, path: Path) -> LoRAFile:
        key = self._stat_key(path)
        if key not in self._files:
            self._files[key] = read_lora(path, self.model)
        return self._files[key]

    def file_hash(self, path: Path) -> str:
        key = self._stat_key(path)
        if key not in self._hashes:
            self._hashes[key] = short_hash(network_hash(path))
        return self._hashes[key]

    def available(self) -> dict[str, Path]:
        """LoRA files by name: the shipped ones (:data:`SHIPPED_LORA_DIR`), then the LoRA
        folder's, which win (first suffix of :data:`LORA_SUFFIXES`)."""
        return {**_scan(SHIPPED_LORA_DIR), **_scan(self.lora_dir)}

    def resolve(self, name: str) -> Path:
        """The file a ``<lora:NAME>`` tag names: a loaded LoRA's, else the LoRA folder's or a
        shipped one."""
        if name in self._loaded:
            return self._loaded[name].path
        files = self.available()
        if name in files:
            return files[name]
        if self.lora_dir is None:
            raise ConfigError(
                f"<lora:{name}> needs the folder of LoRA files: set @lora_dir",
                settings=["lora_dir"],
            )
        if not _scan(self.lora_dir):
            raise ConfigError(
                f"unknown LoRA '{name}': {self.lora_dir} holds no LoRA files "
                f"({', '.join(LORA_SUFFIXES)})",
                settings=["lora_dir"],
            )
        raise unknown_name("LoRA", name, files)

    # ------------------------------------------------------------------ state
    def _check_can_change(self) -> None:
        if self.frozen:
            raise ConfigError(self.frozen, settings=["loras", "fast"])

    def _require_model(self) -> None:
        if self.merged is None:
            raise ConfigError(
                "LoRAs are for latent (Stable Diffusion-type) models", settings=["loras"]
            )

    def load(self, path: str | os.PathLike, weight: float = 1.0, *, unet: float | None = None):
        """Apply the LoRA file ``path`` to every call from now on; returns its entry."""
        self._require_model()
        self._check_can_change()
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ConfigError(f"LoRA weight must be a number, got {weight!r}")
        path = Path(path)
        self._read(path)  # refused here if it does not fit
        entry = LoadedLoRA(
            path.stem,
            path,
            float(weight),
            float(weight if unet is None else unet),
            self.file_hash(path),
        )
        previous = dict(self._loaded)
        self._loaded[entry.name] = entry
        try:
            self.apply(list(self._loaded.values()))
        except BaseException:
            self._loaded = previous
            raise
        return entry

    def unload(self, name: str | None = None) -> None:
        """Stop applying the LoRA ``name`` (None: all of them)."""
        self._check_can_change()
        if name is None:
            self._loaded.clear()
        elif name not in self._loaded:
            raise unknown_name("loaded LoRA", name, self._loaded or ["(none)"])
        else:
            del self._loaded[name]
        self.apply(list(self._loaded.values()))

    @property
    def loaded(self) -> list[LoadedLoRA]:
        return list(self._loaded.values())

    def apply(self, loras: Sequence[LoadedLoRA]) -> None:
        """Merge exactly ``loras`` into the model (nothing to do when they are merged now)."""
        signature = [(str(lo.path), lo.te_weight, lo.unet_weight) for lo in loras]
        if signature == self._signature:
            return
        self._check_can_change()
        self._require_model()
        assert self.merged is not None
        self.merged.apply(
            [AppliedLoRA(self._read(lo.path), lo.te_weight, lo.unet_weight) for lo in loras]
        )
        self._signature = signature
        # keep the files in use only (a server cycling through LoRAs must not hoard them)
        used = {str(lo.path.resolve()) for lo in [*loras, *self._loaded.values()]}
        self._files = {k: v for k, v in self._files.items() if k[0] in used}

    def freeze(self, reason: str, model: Any) -> None:
        """The merged set is baked into ``model`` (fast mode's int8 copy of the weights): keep
        it, drop the originals, refuse changes with ``reason``."""
        self.frozen = reason
        self.model = model
        if self.merged is not None:
            self.merged.bake()

    # ------------------------------------------------------------------ one call
    def for_call(self, prompts: list[str]) -> tuple[list[str], list[LoadedLoRA]]:
        """The prompts without their tags, and the LoRAs this call applies (merged now)."""
        stripped, tag_sets = [], []
        for p in prompts:
            text, tags = parse_lora_tags(p)
            stripped.append(text)
            tag_sets.append(tags)
        if any(t != tag_sets[0] for t in tag_sets):
            raise ConfigError(
                "the prompts of one call name different LoRAs (<lora:...>); LoRAs are merged "
                "into the weights the whole batch shares: make one call per set"
            )
        wanted = dict(self._loaded)
        for tag in tag_sets[0] if tag_sets else []:
            self._require_model()
            path = self.resolve(tag.name)
            h = wanted[tag.name].short_hash if tag.name in wanted else self.file_hash(path)
            wanted[tag.name] = LoadedLoRA(tag.name, path, tag.te_weight, tag.unet_weight, h)
        loras = list(wanted.values())
        self.apply(loras)
        return stripped, loras

    def written_prompt(self, prompt: str, loras: Sequence[LoadedLoRA]) -> str:
        """The prompt as the infotext writes it: its own tags kept, a tag added for each
        applied LoRA it does not name."""
        named = {t.name for t in parse_lora_tags(prompt)[1]}
        extra = [format_tag(lo.name, lo.te_weight, lo.unet_weight) for lo in loras]
        extra = [t for lo, t in zip(loras, extra, strict=True) if lo.name not in named]
        return " ".join([prompt, *extra]) if extra else prompt

    def check_hashes(self, recorded: str) -> None:
        """Warn (:class:`LoRAHashWarning`) for each LoRA whose file found by name has another
        hash than the one an image records."""
        for name, h in parse_lora_hashes(recorded).items():
            try:
                path = self.resolve(name)
            except (ConfigError, KeyError):
                continue  # the replay itself says that the name is unknown
            mine = self.file_hash(path)
            if mine != h:
                warnings.warn(
                    f"LoRA '{name}' ({path}) has hash {mine}, the image was made with {h}; "
                    "the image may differ",
                    LoRAHashWarning,
                    stacklevel=3,
                )
