"""Safe reading of foreign checkpoint files: malicious pickles are refused without running,
corrupt / lying / truncated safetensors files give a one-line CheckpointError naming the
file, and good files of both formats load (memory-mapped, nesting unwrapped)."""

from __future__ import annotations

import json
import os
import pickle
import struct
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from noisecraft.errors import CheckpointError
from noisecraft.io.safe_read import (
    check_safetensors_header,
    read_checkpoint,
    read_ckpt,
    read_safetensors,
    read_safetensors_metadata,
    sniff_format,
)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(3, 4, generator=g),
        "b.bias": torch.randn(5, generator=g).half(),
        "ids": torch.arange(7),
    }


def _error(path: Path, fn=read_checkpoint) -> str:
    with pytest.raises(CheckpointError) as info:
        fn(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message  # one line, names the file
    return message


def _raw_safetensors(path: Path, header: dict, data: bytes, *, length: int | None = None) -> Path:
    """Write a safetensors file by hand: 8-byte length, JSON header, data."""
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


# ---------------------------------------------------------------------------- good files


def test_safetensors_round_trip_is_memory_mapped(tmp_path):
    path = tmp_path / "m.safetensors"
    want = _tensors()
    save_file(want, str(path), metadata={"note": "hi"})
    got, meta = read_safetensors(path)
    assert meta == {"note": "hi"} and set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k])
    if sys.platform == "linux":  # the file is mapped, not read into a second copy
        maps = Path("/proc/self/maps").read_text()
        assert str(path.resolve()) in maps or path.name in maps


def test_metadata_alone_is_read_after_checking_the_header(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(_tensors(), str(path), metadata={"k": "v"})
    assert read_safetensors_metadata(path) == {"k": "v"}
    path.write_bytes(path.read_bytes()[:-3])
    assert "truncated" in _error(path, read_safetensors_metadata)


def test_ckpt_unwraps_nesting_and_drops_non_tensors(tmp_path):
    sd = _tensors()
    for i, wrap in enumerate(
        [
            {"state_dict": sd, "global_step": 875000, "epoch": 3},
            {"model": sd, "optimizer": {"lr": 0.1}},
            {"module": {**sd, "note": "not a tensor"}},
            {"state_dict": {"state_dict": sd}},
            sd,
        ]
    ):
        path = tmp_path / f"{i}.ckpt"
        torch.save(wrap, path)
        got, meta = read_ckpt(path)
        assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
        if i == 0:
            assert meta == {"global_step": "875000", "epoch": "3"}


def test_legacy_pickle_format_loads(tmp_path):
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": _tensors()}, path, _use_new_zipfile_serialization=False)
    assert sniff_format(path) == "ckpt"
    got, _ = read_checkpoint(path)
    assert torch.equal(got["a.weight"], _tensors()["a.weight"])


def test_lightning_callbacks_and_numpy_scalars_are_allowed(tmp_path, monkeypatch):
    """Real SD .ckpt files hold Lightning's ModelCheckpoint state and numpy scalars; both
    are plain data (AUTOMATIC1111's safe unpickler allows them too)."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks"]
    names.append("pytorch_lightning.callbacks.model_checkpoint")
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    module = sys.modules[names[-1]]

    class ModelCheckpoint:
        pass

    ModelCheckpoint.__module__ = module.__name__
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    callback = ModelCheckpoint()
    callback.best_model_score = np.float64(0.25)
    callback.history = np.arange(3)
    path = tmp_path / "lightning.ckpt"
    torch.save(
        {"callbacks": {"cb": callback}, "global_step": 470000, "state_dict": _tensors()}, path
    )
    for name in names:  # the loader must not need the class
        monkeypatch.delitem(sys.modules, name)
    got, meta = read_ckpt(path)
    assert set(got) == set(_tensors()) and meta["global_step"] == "470000"


def test_format_is_sniffed_from_bytes_not_suffix(tmp_path):
    st, ck = tmp_path / "really_safetensors.ckpt", tmp_path / "really_pickle.safetensors"
    save_file(_tensors(), str(st))
    torch.save(_tensors(), ck)
    assert sniff_format(st) == "safetensors" and sniff_format(ck) == "ckpt"
    for path in (st, ck):
        assert torch.equal(read_checkpoint(path)[0]["ids"], torch.arange(7))


# ---------------------------------------------------------------------------- malicious pickles


class _Payload:
    """Unpickling this would run ``touch <marker>``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("how", ["torch_zip", "torch_legacy", "pickle_p2", "pickle_p4"])
def test_reduce_payload_is_refused_without_running(tmp_path, how):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    obj = {"state_dict": {"w": torch.ones(2)}, "extra": _Payload(marker)}
    if how == "torch_zip":
        torch.save(obj, path)
    elif how == "torch_legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=2 if how == "pickle_p2" else 4))
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Payload(control)))  # the payload does run under plain pickle
    assert control.exists()
    message = _error(path)
    assert not marker.exists()
    assert message.startswith(f"refusing to load {path}: its pickle calls ")
    assert "system" in message and "use a .safetensors file" in message


# ---------------------------------------------------------------------------- corrupt files


def test_lying_header_length(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file(_tensors(), str(good))
    data = good.read_bytes()
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 10**15) + data[8:])
    assert "lying header" in _error(huge) and "100 MB" in _error(huge)
    longer = tmp_path / "longer.safetensors"
    longer.write_bytes(struct.pack("<Q", len(data)) + data[8:])  # beyond the file, under the cap
    assert "lying header" in _error(longer)


def test_truncated_file_names_tensor_and_sizes(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file(_tensors(), str(good))
    data = good.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-10])
    message = _error(cut)
    assert "truncated or corrupt: tensor" in message
    assert f"but the file has {len(data) - 10} bytes; download it again" in message
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(data[:5])
    assert "truncated or corrupt" in _error(tiny, read_safetensors)


@pytest.mark.parametrize(
    ("header", "data", "expect"),
    [
        ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "ends at byte"),
        (
            {"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
            b"\0" * 8,
            "needs 12 bytes",
        ),
        ({"x": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "unknown dtype"),
        (
            {
                "x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
            "overlap",
        ),
        ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, "data_offsets"),
        ({"x": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "shape"),
        ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 12, "after the"),
        ({"__metadata__": {"a": 1}}, b"", "metadata"),
    ],
    ids=[
        "out_of_range",
        "size_mismatch",
        "dtype",
        "overlap",
        "reversed",
        "shape",
        "trailing",
        "meta",
    ],
)
def test_corrupt_headers(tmp_path, header, data, expect):
    path = _raw_safetensors(tmp_path / "bad.safetensors", header, data)
    assert expect in _error(path)
    with pytest.raises(CheckpointError):
        check_safetensors_header(path)


def test_header_that_is_not_json(tmp_path):
    path = tmp_path / "bad.safetensors"
    body = b"{not json at all"
    path.write_bytes(struct.pack("<Q", len(body)) + body)
    assert "not JSON" in _error(path)


def test_random_bytes_empty_and_missing(tmp_path):
    rand = tmp_path / "random.safetensors"
    rand.write_bytes(bytes(range(7, 250)) * 4)  # starts with neither magic
    assert "is not a checkpoint" in _error(rand)
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    assert "is empty (0 bytes)" in _error(empty)
    assert "not found" in _error(tmp_path / "missing.safetensors")


def test_corrupt_pickles(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": _tensors()}, good)
    data = good.read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(data[: len(data) // 2])
    assert "truncated or corrupt" in _error(cut)
    notorch = tmp_path / "archive.ckpt"
    with zipfile.ZipFile(notorch, "w") as z:
        z.writestr("readme.txt", "hello")
    assert "truncated or corrupt" in _error(notorch)
    empty = tmp_path / "nothing.ckpt"
    torch.save({"epoch": 1}, empty)
    assert "holds no tensors" in _error(empty)


def test_load_pickle_tells_a_text_file_from_a_payload(tmp_path):
    """A file that is no pickle at all is "not a PyTorch checkpoint", not "code could run";
    a protocol-4 payload (its FRAME opcode is as unknown to torch as text) still is."""
    from noisecraft.io.safe_read import load_pickle

    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    advice = dict(refused="do R", corrupt="do C")
    message = _error(text, lambda p: load_pickle(p, **advice))
    assert "is not a PyTorch checkpoint or is corrupt" in message and message.endswith("do C")
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"x": _Payload(tmp_path / "pwned")}, protocol=4))
    message = _error(evil, lambda p: load_pickle(p, **advice))
    assert message.startswith(f"refusing to load {evil}") and message.endswith("do R")
    assert not (tmp_path / "pwned").exists()
    nested = tmp_path / "state.pt"
    torch.save({"step": 3, "opt": {"state": {0: {"m": torch.ones(2)}}}}, nested)
    assert load_pickle(nested)["opt"]["state"][0]["m"].tolist() == [1.0, 1.0]
