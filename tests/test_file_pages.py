"""Dropping a memory-mapped file's pages once its tensors are copied (noisecraft.io.file_pages):
what build_module, cast_floating_ and so the default load of an fp16 file rely on."""

from __future__ import annotations

import dataclasses
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from noisecraft.io import file_pages
from noisecraft.io.build import build_module, cast_floating_
from noisecraft.io.file_pages import FilePages, page_release_supported
from noisecraft.io.formats.auto import load_any
from noisecraft.io.formats.single_file import save_single_file
from noisecraft.io.safe_read import read_checkpoint
from test_latent_pipeline import UNET, tiny_model

linux_only = pytest.mark.skipif(
    not page_release_supported(), reason="madvise / /proc/self/maps (Linux only)"
)
FEATURES = 1024


def _layers() -> nn.Sequential:
    return nn.Sequential(*(nn.Linear(FEATURES, FEATURES) for _ in range(4)))


def _file(tmp_path: Path, suffix: str, dtype: torch.dtype) -> tuple[Path, dict]:
    """4 Linear(1024, 1024) layers (4.2 M weights: 8 MB in float16) as .safetensors or a zip
    .ckpt (read with torch.load(mmap=True))."""
    torch.manual_seed(0)
    sd = {k: v.to(dtype) for k, v in _layers().state_dict().items()}
    path = tmp_path / f"layers{suffix}"
    if suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return path, sd


def _mapped_rss(path: Path) -> int:
    """Bytes of ``path``'s mappings resident in this process (``/proc/self/smaps`` Rss)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=5)
            if "-" in head[0] and len(head) >= 5:  # a mapping's first line
                inside = len(head) == 6 and head[5].strip() == str(path)
            elif inside and head[0] == "Rss:":
                total += int(head[1]) * 1024
    return total


@linux_only
@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_build_module_drops_the_file_pages_of_widened_tensors(tmp_path, suffix):
    """An fp16 file built as float32: every tensor is copied, and its pages of the file leave
    the process even while the file's tensors are still referenced."""
    path, sd = _file(tmp_path, suffix, torch.float16)
    tensors, _ = read_checkpoint(path)
    assert all(t.sum() is not None for t in tensors.values())  # every page read once
    file_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    assert _mapped_rss(path) >= file_bytes * 0.9
    module = build_module(_layers, tensors, what="layers", source=path)
    assert _mapped_rss(path) < file_bytes * 0.05  # without the release: the whole file
    for k, v in module.state_dict().items():  # the copy and the file's tensor, read back
        assert v.dtype == torch.float32 and torch.equal(v, sd[k].float())
        assert torch.equal(tensors[k], sd[k])


@linux_only
def test_no_copy_no_release_then_cast_releases(tmp_path):
    """A float32 file built as float32 keeps the file's tensors as its weights (no copy,
    pages stay); casting the module to bfloat16 then drops them tensor by tensor."""
    path, sd = _file(tmp_path, ".safetensors", torch.float32)
    tensors, _ = read_checkpoint(path)
    module = build_module(_layers, tensors, what="layers", source=path)
    pages = FilePages()
    assert all(pages.in_file(p) for p in module.parameters())
    assert all(p.sum() is not None for p in module.parameters())
    assert _mapped_rss(path) >= 4 * FEATURES * FEATURES * 4 * 0.9
    params = list(module.parameters())
    cast_floating_(module, torch.bfloat16)
    assert [id(p) for p in module.parameters()] == [id(p) for p in params]
    assert _mapped_rss(path) < 4 * FEATURES * FEATURES * 4 * 0.05
    for k, v in module.state_dict().items():
        assert v.dtype == torch.bfloat16 and torch.equal(v, sd[k].bfloat16())


@linux_only
def test_fp16_single_file_default_load_leaves_no_file_pages(tmp_path, monkeypatch):
    """The default (float32) load of an fp16 SD single file, the file's tensors kept alive
    past the load: none of its pages is left in the process (the load's peak is then the
    float32 weights plus about one tensor, not the file on top)."""
    import noisecraft.io.formats.single_file_read as reader

    big = dataclasses.replace(UNET, model_channels=128, num_heads=4)
    path = tmp_path / "half.safetensors"
    save_single_file(tiny_model(unet=big), path, dtype=torch.float16)
    kept = []

    def read_and_keep(p):
        kept.append(read_checkpoint(p))
        return kept[-1]

    monkeypatch.setattr(reader, "read_checkpoint", read_and_keep)
    model = load_any(path)
    assert next(model.unet.parameters()).dtype == torch.float32
    assert kept and path.stat().st_size > 20e6
    assert _mapped_rss(path) < 0.05 * path.stat().st_size  # without the release: all of it


def test_bf16_load_of_an_fp16_single_file_builds_the_unet_in_bf16(tmp_path, monkeypatch):
    """``load(dtype="bf16")`` on the CPU reads a single file's U-Net straight into bfloat16
    (never a float32 copy of it), the text encoder and VAE in float32; the weights equal the
    float32 load cast to bfloat16 (fp16 -> fp32 is exact)."""
    import noisecraft.io.formats.single_file_read as reader
    from noisecraft.api import load
    from noisecraft.errors import NoisecraftWarning

    path = tmp_path / "half.safetensors"
    save_single_file(tiny_model(), path, dtype=torch.float16)
    built = []

    def spy(factory, sd, **kw):
        built.append((kw["what"], kw["dtype"]))
        return build_module(factory, sd, **kw)

    monkeypatch.setattr(reader, "build_module", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoisecraftWarning)  # a CPU without bf16 instructions
        model = load(path, dtype="bf16").model
    assert ("U-Net", torch.bfloat16) in built and ("U-Net", torch.float32) not in built
    reference = load_any(path)
    for part, dtype in (("unet", torch.bfloat16), ("text_encoder", torch.float32)):
        ours, ref = getattr(model, part).state_dict(), getattr(reference, part).state_dict()
        assert all(torch.equal(ours[k], v.to(dtype)) for k, v in ref.items())
    assert next(model.vae.parameters()).dtype == torch.float32


@linux_only
def test_file_pages_drops_file_pages_and_data_survives(tmp_path):
    """madvise(MADV_DONTNEED) on a private file mapping: RSS pages go, the data is read
    back from the file on the next access; anonymous memory is never touched."""
    path = tmp_path / "t.safetensors"
    x = torch.arange(2**20, dtype=torch.float32)
    save_file({"x": x}, str(path))
    mapped = load_file(str(path))["x"]
    assert torch.equal(mapped, x)  # pages resident
    release = FilePages()
    release(mapped)
    assert release.released >= 2**22 - 2 * 4096
    assert torch.equal(mapped, x)
    anon = x.clone()
    before = release.released
    release(anon)
    assert release.released == before and torch.equal(anon, x)


def test_off_linux_it_is_a_no_op(tmp_path, monkeypatch):
    path, sd = _file(tmp_path, ".safetensors", torch.float16)
    tensors, _ = read_checkpoint(path)
    monkeypatch.setattr(sys, "platform", "darwin")
    file_pages._madvise.cache_clear()
    try:
        assert not page_release_supported()
        pages = FilePages()
        for t in tensors.values():
            pages(t)
        assert pages.released == 0 and pages.ranges == []
    finally:
        monkeypatch.undo()
        file_pages._madvise.cache_clear()
    assert all(torch.equal(tensors[k], v) for k, v in sd.items())
