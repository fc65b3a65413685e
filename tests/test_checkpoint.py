import json

import pytest
import torch
from safetensors.torch import save_file

from noisecraft.errors import CheckpointError, OutputExistsError
from noisecraft.io.checkpoint import CheckpointInfo, load_checkpoint, read_info, save_checkpoint


def test_round_trip_is_bit_exact(tmp_path):
    sd = {"a.weight": torch.randn(3, 4), "b.bias": torch.arange(5, dtype=torch.float32)}
    info = CheckpointInfo(kind="unet", config={"x": [1, 2]}, diffusion={"prediction": "v"})
    path = save_checkpoint(tmp_path / "m.safetensors", sd, info)
    tensors, back = load_checkpoint(path, expect_kind="unet")
    assert set(tensors) == set(sd)
    for k in sd:
        assert torch.equal(tensors[k], sd[k])
    assert back.config == {"x": [1, 2]} and back.diffusion == {"prediction": "v"}
    assert read_info(path).kind == "unet"


def test_refuses_to_overwrite_and_leaves_file(tmp_path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, {"w": torch.ones(2)}, CheckpointInfo("unet", {}))
    before = path.read_bytes()
    with pytest.raises(OutputExistsError, match="pass overwrite to replace"):
        save_checkpoint(path, {"w": torch.zeros(2)}, CheckpointInfo("unet", {}))
    assert path.read_bytes() == before
    save_checkpoint(path, {"w": torch.zeros(2)}, CheckpointInfo("unet", {}), overwrite=True)
    assert torch.equal(load_checkpoint(path)[0]["w"], torch.zeros(2))
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp files left


def test_wrong_kind_missing_and_foreign_files(tmp_path):
    path = save_checkpoint(
        tmp_path / "v.safetensors", {"w": torch.ones(1)}, CheckpointInfo("vae", {})
    )
    with pytest.raises(CheckpointError, match="'vae' model"):
        load_checkpoint(path, expect_kind="unet")
    with pytest.raises(CheckpointError, match="not found"):
        read_info(tmp_path / "nope.safetensors")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.ones(1)}, str(foreign))
    with pytest.raises(CheckpointError, match="not a native checkpoint"):
        read_info(foreign)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError):
        read_info(junk)


def test_truncated_file_gives_checkpoint_error(tmp_path):
    path = save_checkpoint(
        tmp_path / "m.safetensors", {"w": torch.randn(1000)}, CheckpointInfo("unet", {})
    )
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_metadata_is_json_with_format(tmp_path):
    from safetensors import safe_open

    path = save_checkpoint(
        tmp_path / "m.safetensors", {"w": torch.ones(1)}, CheckpointInfo("unet", {"a": 1})
    )
    with safe_open(str(path), "pt") as f:
        doc = json.loads(f.metadata()["noisecraft"])
    assert (
        doc["format"] == 1 and doc["kind"] == "unet" and doc["produced_by"].startswith("noisecraft")
    )
