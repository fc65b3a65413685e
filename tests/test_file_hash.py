"""A1111's file hashes: the addnet hash ignores the safetensors header (metadata edits keep it),
the full hash does not; both equal hashlib over the documented byte ranges."""

import hashlib

import torch
from safetensors.torch import save_file

from noisecraft.io.file_hash import addnet_hash, network_hash, sha256_file, short_hash


def test_addnet_hash_is_the_tensor_bytes_and_ignores_metadata(tmp_path):
    t = {"a": torch.arange(6, dtype=torch.float32)}
    p1, p2 = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(t, p1, metadata={"ss_note": "one"})
    save_file(t, p2, metadata={"ss_note": "a longer note"})
    assert sha256_file(p1) != sha256_file(p2)
    assert addnet_hash(p1) == addnet_hash(p2) == network_hash(p1)
    raw = p1.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert addnet_hash(p1) == hashlib.sha256(raw[8 + n :]).hexdigest()
    assert raw[8 + n :] == t["a"].numpy().tobytes()


def test_pickles_get_the_whole_file_hash(tmp_path):
    p = tmp_path / "x.pt"
    torch.save({"a": torch.ones(3)}, p)
    assert network_hash(p) == sha256_file(p) == hashlib.sha256(p.read_bytes()).hexdigest()
    assert short_hash(sha256_file(p)) == sha256_file(p)[:12] and len(short_hash("f" * 64)) == 12


def test_legacy_model_hash_reads_64_kib_at_1_mib(tmp_path):
    """A1111's ``sd_models.model_hash``: sha256 of bytes 0x100000..0x110000, 8 hex digits (a
    file shorter than 1 MiB hashes nothing: e3b0c442, the empty string's)."""
    from noisecraft.io.file_hash import legacy_model_hash

    data = bytes(i % 251 for i in range(0x120000))
    (tmp_path / "m.safetensors").write_bytes(data)
    want = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert legacy_model_hash(tmp_path / "m.safetensors") == want
    (tmp_path / "small.pth").write_bytes(data[:1000])
    assert legacy_model_hash(tmp_path / "small.pth") == "e3b0c442"
    assert legacy_model_hash(None) is None
