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


def test_check_writable_refuses_what_cannot_be_written_and_creates_nothing(tmp_path, monkeypatch):
    import errno

    import noisecraft.io.write_errors as we
    from noisecraft.errors import OutputError

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match=f"cannot write {blocker}/a/b.png: a part of {blocker}"):
        check_writable(blocker / "a" / "b.png", overwrite=False)
    with pytest.raises(OutputError, match="is a folder; give a file name"):
        check_writable(tmp_path, overwrite=True)
    with pytest.raises(OutputError, match="is a file; give a folder path"):
        check_writable(blocker, overwrite=True, folder=True)
    assert check_writable(tmp_path, overwrite=True, folder=True) == tmp_path
    deep = tmp_path / "new" / "deeper" / "x.png"
    assert check_writable(deep, overwrite=False) == deep  # a folder that can be created
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    # the file-system facts it reads: read-only, full, no permission
    assert we.folder_problem(tmp_path / "new") is None
    real = os.statvfs(tmp_path)
    ro = list(real)
    ro[8] |= os.ST_RDONLY
    monkeypatch.setattr(we.os, "statvfs", lambda p: os.statvfs_result(ro))
    assert we.folder_problem(tmp_path / "new") == errno.EROFS
    full = list(real)
    full[3] = full[4] = 0
    monkeypatch.setattr(we.os, "statvfs", lambda p: os.statvfs_result(full))
    assert we.folder_problem(tmp_path) == errno.ENOSPC
    monkeypatch.undo()
    monkeypatch.setattr(we.os, "access", lambda p, mode: False)
    assert we.folder_problem(tmp_path) == errno.EACCES
    with pytest.raises(OutputError, match="permission denied in"):
        check_writable(tmp_path / "y.png", overwrite=False)


@pytest.mark.parametrize(
    "code, advice",
    [
        ("ENOSPC", "no space left on the disk of"),
        ("EDQUOT", "the disk quota of"),
        ("EROFS", "is on a read-only file system"),
        ("EACCES", "permission denied in"),
        ("EIO", "Input/output error; choose another path"),
    ],
)
def test_writing_turns_os_errors_into_one_line_and_removes_what_it_created(tmp_path, code, advice):
    import errno

    from noisecraft.errors import OutputError
    from noisecraft.io.write_errors import writing

    target = tmp_path / "a" / "b" / "c.png"
    with pytest.raises(OutputError) as e, writing(target), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        err = getattr(errno, code)
        raise OSError(err, os.strerror(err))
    msg = str(e.value)
    assert msg.startswith(f"cannot write {target}: ") and advice in msg and "\n" not in msg
    assert list(tmp_path.iterdir()) == []  # the temporary file and the folders a/b are gone


def test_writing_passes_other_errors_through_and_keeps_existing_folders(tmp_path):
    from noisecraft.io.write_errors import writing

    (tmp_path / "kept").mkdir()
    target = tmp_path / "kept" / "x.txt"
    with pytest.raises(ValueError), writing(target), atomic_path(target):
        raise ValueError("not an OS error")
    assert [p.name for p in tmp_path.iterdir()] == ["kept"] and not any(
        (tmp_path / "kept").iterdir()
    )


def test_new_outputs_removed_on_error_keeps_what_existed(tmp_path):
    from noisecraft.io.write_errors import new_outputs_removed_on_error

    old, new, folder = tmp_path / "old.png", tmp_path / "new.gif", tmp_path / "steps"
    old.write_text("theirs")
    with pytest.raises(KeyboardInterrupt), new_outputs_removed_on_error(old, new, folder):
        old.write_text("replaced")
        new.write_text("half a set")
        folder.mkdir()
        (folder / "step_000.png").write_text("x")
        raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["old.png"]


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
