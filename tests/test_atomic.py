"""Atomic writes: all or nothing, and the file mode a plain open() would give."""

from __future__ import annotations

import os

import pytest

from noisecraft.errors import OutputExistsError
from noisecraft.io.atomic import atomic_path, check_writable, free_path


def test_failed_write_leaves_old_file_and_no_temporaries(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_successful_write_replaces_and_uses_umask_mode(tmp_path):
    target = tmp_path / "sub" / "b.txt"
    old = os.umask(0o022)
    try:
        with atomic_path(target) as tmp:
            tmp.write_text("new")
    finally:
        os.umask(old)
    assert target.read_text() == "new"
    assert target.stat().st_mode & 0o777 == 0o644


def test_check_writable_refuses_existing(tmp_path):
    target = tmp_path / "c.txt"
    assert check_writable(target, overwrite=False) == target
    target.write_text("x")
    with pytest.raises(OutputExistsError, match="pass overwrite to replace"):
        check_writable(target, overwrite=False)
    assert check_writable(target, overwrite=True) == target


def test_free_path_numbers_instead_of_overwriting(tmp_path):
    target = tmp_path / "digits.png"
    assert free_path(target) == target
    target.write_bytes(b"1")
    assert free_path(target) == tmp_path / "digits_2.png"
    (tmp_path / "digits_2.png").write_bytes(b"2")
    assert free_path(target) == tmp_path / "digits_3.png"


def test_safetensors_written_through_atomic_path_get_the_umask_mode(tmp_path):
    """safetensors' save_file replaces the file with a 0600 one; the mode is set after it."""
    import torch

    from noisecraft.io.checkpoint import CheckpointInfo, save_checkpoint

    old = os.umask(0o022)
    try:
        path = save_checkpoint(
            tmp_path / "m.safetensors", {"w": torch.zeros(2)}, CheckpointInfo("t", {})
        )
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_remove_stale_temps_takes_only_our_names(tmp_path):
    """What a kill -9 inside atomic_path / atomic_folder leaves, next to a user's files."""
    from noisecraft.io.atomic import remove_stale_temps

    (tmp_path / ".model.safetensors.ab12cd34.tmp").write_bytes(b"partial")
    (tmp_path / ".out.zzzzzzzz.tmp").mkdir()
    (tmp_path / ".out.zzzzzzzz.tmp" / "unet.bin").write_bytes(b"half a folder")
    keep = [".notes.tmp", "a.tmp", ".x.TOOLONG123.tmp", ".x.short.tmp", "model.safetensors"]
    for name in keep:
        (tmp_path / name).write_text("mine")
    removed = remove_stale_temps(tmp_path)
    assert sorted(p.name for p in removed) == [
        ".model.safetensors.ab12cd34.tmp",
        ".out.zzzzzzzz.tmp",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)
    assert remove_stale_temps(tmp_path / "missing") == []


def test_remove_stale_temps_restores_a_folder_moved_aside(tmp_path):
    """A kill between atomic_folder's two renames: the old folder is only in `.old`."""
    from noisecraft.io.atomic import remove_stale_temps

    old = tmp_path / ".model.abcdefgh.old"
    (old / "folder").mkdir(parents=True)
    (old / "folder" / "weights").write_text("the user's model")
    (tmp_path / ".model.12345678.tmp").mkdir()  # the new folder, never renamed in
    remove_stale_temps(tmp_path)
    assert (tmp_path / "model" / "weights").read_text() == "the user's model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    # when the replacement did land, the moved-aside copy is removed
    (old / "folder").mkdir(parents=True)
    remove_stale_temps(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
