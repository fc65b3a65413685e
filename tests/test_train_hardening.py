"""``noisecraft train`` under user mistakes, kills, signals and failing disks (issue 13).

Every user mistake: exit 2, one ``error:`` line, no traceback, and the run directory exactly
as it was (same files, same bytes). Interruptions: the run resumes to the same loss curve.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import pickle
import resource
import shlex
import signal
import time

import pytest
import torch
from safetensors import SafetensorError

from helpers import tiny_recipe
from noisecraft.cli.main import main
from noisecraft.io.checkpoint import read_info
from noisecraft.training import run_files
from noisecraft.training.run_dir import RunLock
from noisecraft.training.trainer import Trainer


@pytest.fixture
def recipe(tmp_path):
    """A tiny recipe whose run goes to tmp_path/run (checkpoints every 3 steps)."""
    return _recipe(tmp_path, "tiny.toml", every=3)


def _recipe(tmp_path, name, every):
    path = tmp_path / name
    path.write_text(
        tiny_recipe(
            (tmp_path / "run").as_posix(),
            train={"max_steps": 6, "device": "cpu", "threads": 1},
            run={"checkpoint_every": every, "log_every": 1},
        )
    )
    return path


def _one_error(capsys) -> str:
    out = capsys.readouterr()
    err = out.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), out.err
    assert "Traceback" not in out.err + out.out
    return err[0]


def _snapshot(folder) -> dict[str, bytes]:
    """Every file below ``folder`` with its bytes (a refused command must not change any)."""
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _temps(folder) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*") if p.name.endswith((".tmp", ".old")))


def _log_steps(run) -> list[int]:
    rows = (run / "log.csv").read_text().splitlines()[1:]
    return [int(r.split(",")[0]) for r in rows]


def _losses(run) -> list[str]:
    return [r.split(",")[1] for r in (run / "log.csv").read_text().splitlines()[1:]]


def _ckpt_step(run) -> int:
    return torch.load(run / "checkpoint.pt", weights_only=True)["step"]


def _model_step(run) -> int:
    return read_info(run / "model.safetensors").training["step"]


# ---------------------------------------------------------------- case 7: the recipe


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--set", "data.image_size=0"], "data.image_size must be at least 1"),
        (["--set", "train.lr=nan"], "train.lr must be a finite number, got nan"),
        (["--set", "train.lr=inf"], "train.lr must be a finite number, got inf"),
        (["--set", "train.betas=5"], "train.betas must be a list"),
        (["--max-steps", "-5"], "--max-steps must be at least 1, got -5"),
        (["--max-steps", "0"], "--max-steps must be at least 1, got 0"),
        (["--set", "run.checkpoint_every=-1"], "run.checkpoint_every must be at least 0"),
        (["--set", "train.device='gpu0'"], "train.device = 'gpu0' is not a device"),
        (["--set", "run.sample_sampler='eulr'"], "did you mean 'euler'"),
        (["--set", "train.seed=-1"], "train.seed must be an integer in 0..4294967295"),
    ],
)
def test_bad_settings_are_one_line_and_create_nothing(tmp_path, recipe, capsys, extra, needle):
    before = _snapshot(tmp_path)
    assert main(["train", str(recipe), *extra]) == 2
    assert needle in _one_error(capsys)
    assert _snapshot(tmp_path) == before  # no run directory, nothing else


def test_binary_recipe_is_one_line(tmp_path, capsys):
    recipe = tmp_path / "bin.toml"
    recipe.write_bytes(bytes(range(256)))
    assert main(["train", str(recipe)]) == 2
    assert "is not a TOML text file" in _one_error(capsys)


@pytest.mark.parametrize("where", ["file", "below_file"])
def test_run_dir_on_a_file_is_one_line(tmp_path, recipe, capsys, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("keep")
    run_dir = blocker if where == "file" else blocker / "run"
    assert main(["train", str(recipe), "--set", f"run.dir='{run_dir.as_posix()}'"]) == 2
    assert "set run.dir to a folder" in _one_error(capsys)
    assert blocker.read_text() == "keep"


def test_diverging_loss_is_one_line(recipe, capsys):
    args = ["--set", "train.lr=1e12", "--set", "train.grad_clip=0.0"]
    assert main(["train", str(recipe), *args]) == 2
    assert "lower train.lr" in _one_error(capsys)


# ---------------------------------------------------------------- case 8: resume


@pytest.fixture
def trained(tmp_path, recipe, capsys):
    """A run trained to step 3 (its checkpoint and model at step 3)."""
    assert main(["train", str(recipe), "--max-steps", "3"]) == 0
    capsys.readouterr()
    return tmp_path / "run"


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize(
    "kind", ["truncated", "empty", "malicious", "text", "not_ours", "other_shapes"]
)
def test_bad_checkpoint_is_one_line_and_nothing_changes(tmp_path, trained, recipe, capsys, kind):
    ckpt = trained / "checkpoint.pt"
    marker = tmp_path / "pwned"
    if kind == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[:5000])
    elif kind == "empty":
        ckpt.write_bytes(b"")
    elif kind == "malicious":
        ckpt.write_bytes(pickle.dumps({"step": _Payload(marker)}))
    elif kind == "text":
        ckpt.write_text("not a checkpoint\n")
    elif kind == "not_ours":
        torch.save({"weights": torch.ones(2)}, ckpt)
    else:
        state = torch.load(ckpt, weights_only=True)
        state["model"] = {k: v[..., :1] for k, v in state["model"].items()}
        torch.save(state, ckpt)
    before = _snapshot(trained)
    assert main(["train", str(recipe)]) == 2
    line = _one_error(capsys)
    assert str(ckpt) in line and "--overwrite" in line
    if kind == "malicious":
        assert "refusing to load" in line and "system" in line
    assert not marker.exists()
    assert _snapshot(trained) == before


def test_changed_train_settings_are_refused_naming_the_keys(trained, recipe, capsys):
    before = _snapshot(trained)
    args = ["--set", "train.batch_size=32", "--set", "train.lr=0.002"]
    assert main(["train", str(recipe), *args]) == 2
    line = _one_error(capsys)
    assert "train.batch_size: 16 -> 32" in line and "train.lr: 0.0002 -> 0.002" in line
    assert "--allow-config-change train.batch_size,train.lr" in line
    assert _snapshot(trained) == before  # config.json is not rewritten


def test_changed_model_is_refused_even_when_allowed(trained, recipe, capsys):
    args = ["--set", "model.model_channels=16", "--allow-config-change", "model.model_channels"]
    assert main(["train", str(recipe), *args]) == 2
    assert "different [model] config (model.model_channels: 8 -> 16)" in _one_error(capsys)


def test_allow_config_change_names_known_keys(trained, recipe, capsys):
    args = ["--set", "train.batch_size=32", "--allow-config-change", "train.bach_size"]
    assert main(["train", str(recipe), *args]) == 2
    assert "did you mean 'train.batch_size'" in _one_error(capsys)


def test_an_allowed_change_resumes_and_is_reported(trained, recipe, capsys):
    args = ["--set", "train.batch_size=32", "--allow-config-change", "train.batch_size"]
    assert main(["train", str(recipe), *args]) == 0
    assert "train.batch_size changed: 16 -> 32" in capsys.readouterr().out
    assert '"batch_size": 32' in (trained / "config.json").read_text()
    assert _log_steps(trained) == [1, 2, 3, 4, 5, 6]


def test_free_keys_change_without_asking(trained, recipe, capsys):
    args = ["--set", "run.checkpoint_every=2", "--set", "train.max_steps=5"]
    assert main(["train", str(recipe), *args]) == 0
    assert "run.checkpoint_every changed: 3 -> 2" in capsys.readouterr().out
    assert _ckpt_step(trained) == 5


# ---------------------------------------------------------------- case 10: after kill -9


def test_kill_leftovers_are_cleaned_and_the_pair_made_consistent(trained, recipe, capsys):
    model_at_3 = (trained / "model.safetensors").read_bytes()
    assert main(["train", str(recipe)]) == 0  # to step 6
    # what a kill -9 leaves: temporaries (file, folder, in samples/), a model older than the
    # checkpoint (killed between the two writes), log rows past the checkpoint + a torn row
    (trained / ".checkpoint.pt.ab12cd34.tmp").write_bytes(b"x" * 100_000)
    (trained / ".model.safetensors.q9w8e7r6.tmp").write_bytes(b"partial")
    (trained / "samples" / ".step_000006.png.zzzzzzzz.tmp").write_bytes(b"p")
    (trained / ".diffusers.abcdefgh.tmp").mkdir()
    (trained / ".mine.tmp").write_text("a user's file that only looks like a temp")
    (trained / "model.safetensors").write_bytes(model_at_3)
    with open(trained / "log.csv", "a") as f:
        f.write("7,0.5,1e-3,1,1\n8,0.5,1e-3,1,1\n9,0.4")
    assert _model_step(trained) == 3 and _ckpt_step(trained) == 6
    assert main(["train", str(recipe), "--max-steps", "8"]) == 0
    assert _temps(trained) == [".mine.tmp"]
    assert (trained / ".mine.tmp").exists()
    assert _log_steps(trained) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert _model_step(trained) == _ckpt_step(trained) == 8


def test_resume_rewrites_an_older_model_even_without_steps_to_train(trained, recipe):
    model_at_3 = (trained / "model.safetensors").read_bytes()
    assert main(["train", str(recipe)]) == 0
    model_at_6 = (trained / "model.safetensors").read_bytes()
    (trained / "model.safetensors").write_bytes(model_at_3)
    assert main(["train", str(recipe)]) == 0  # already at step 6
    assert (trained / "model.safetensors").read_bytes() == model_at_6


def test_run_killed_before_its_first_checkpoint_starts_over(tmp_path, recipe, capsys):
    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    (run / "log.csv").write_text("step,loss,lr,samples_per_s,elapsed_s\n1,1.0,1,1,1\n2,0.9")
    (run / "samples" / "step_000002.png").write_bytes(b"png")
    (run / ".log.csv.abcd1234.tmp").write_text("x")
    assert main(["train", str(recipe)]) == 0
    assert "resuming" not in capsys.readouterr().out
    assert _log_steps(run) == [1, 2, 3, 4, 5, 6] and _temps(run) == []


def test_a_second_trainer_on_the_same_run_is_refused(trained, recipe, capsys):
    before = _snapshot(trained)
    with RunLock(trained):
        assert main(["train", str(recipe)]) == 2
    assert "in use by another training process" in _one_error(capsys)
    assert _snapshot(trained) == before


# ---------------------------------------------------------------- case 11: SIGINT / SIGTERM


def _signal_at(monkeypatch, step: int, signum: int) -> None:
    """Send ``signum`` to this process in the middle of step ``step`` (after the forward and
    backward pass), as a Ctrl-C would arrive."""
    real = Trainer.train_step

    def train_step(self):
        loss = real(self)
        if self.step == step:
            os.kill(os.getpid(), signum)
        return loss

    monkeypatch.setattr(Trainer, "train_step", train_step)


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_prints_the_resume_command_and_resumes_exactly(
    tmp_path, monkeypatch, capsys, signum, code
):
    recipe = _recipe(tmp_path, "r.toml", every=500)  # the default-like: no checkpoint by step 6
    _signal_at(monkeypatch, 4, signum)
    assert main(["train", str(recipe), "--set", "train.max_steps=7", "--overwrite"]) == code
    err = capsys.readouterr().err
    assert f"{signal.Signals(signum).name}: stopped at step 4" in err
    command = err.split("resume with: ", 1)[1].strip()
    # the same command, less --overwrite (which would start over)
    assert shlex.split(command) == [
        "noisecraft",
        "train",
        str(recipe),
        "--set",
        "train.max_steps=7",
    ]
    run = tmp_path / "run"
    assert _ckpt_step(run) == _model_step(run) == 4 and _log_steps(run) == [1, 2, 3, 4]
    assert _temps(run) == []
    monkeypatch.undo()
    assert main(shlex.split(command)[1:]) == 0
    assert _log_steps(run) == list(range(1, 8))
    # the same curve as a run that was never stopped
    other = tmp_path / "other"
    other.mkdir()
    assert main(["train", str(_recipe(other, "r.toml", every=500)), "--max-steps", "7"]) == 0
    assert _losses(run) == _losses(other / "run")


def test_a_second_ctrl_c_abandons_the_save_and_keeps_the_last_checkpoint(
    trained, recipe, monkeypatch, capsys
):
    before = (trained / "checkpoint.pt").read_bytes()
    _signal_at(monkeypatch, 4, signal.SIGINT)
    real_save = run_files.torch_save

    def slow_save(obj, path, on_first_write=None):
        time.sleep(0.7)  # past the grace period of a doubled signal
        os.kill(os.getpid(), signal.SIGINT)
        real_save(obj, path, on_first_write)

    monkeypatch.setattr(run_files, "torch_save", slow_save)
    assert main(["train", str(recipe)]) == 130
    assert "interrupted again" in capsys.readouterr().err
    assert (trained / "checkpoint.pt").read_bytes() == before and _temps(trained) == []


# ---------------------------------------------------------------- case 6: full disk, read-only


def test_full_disk_during_checkpoint_write(trained, recipe, monkeypatch, capsys):
    before = {n: (trained / n).read_bytes() for n in ("checkpoint.pt", "model.safetensors")}

    def full(obj, path, on_first_write=None):
        path.write_bytes(b"half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(run_files, "torch_save", full)
    assert main(["train", str(recipe)]) == 2
    line = _one_error(capsys)
    assert f"could not write {trained / 'checkpoint.pt'} (No space left on device)" in line
    assert "the checkpoint of step 3 is intact" in line
    assert {n: (trained / n).read_bytes() for n in before} == before and _temps(trained) == []
    monkeypatch.undo()
    assert main(["train", str(recipe)]) == 0  # space freed: resumes from step 3
    assert _log_steps(trained) == [1, 2, 3, 4, 5, 6]


def test_full_disk_during_model_write(trained, recipe, monkeypatch, capsys):
    import noisecraft.io.checkpoint as checkpoint_io

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left (os error 28)")

    monkeypatch.setattr(checkpoint_io, "save_file", full)
    assert main(["train", str(recipe)]) == 2
    line = _one_error(capsys)
    assert f"could not write {trained / 'model.safetensors'} (No space left on device)" in line
    assert _ckpt_step(trained) == 6 and _model_step(trained) == 3 and _temps(trained) == []
    monkeypatch.undo()
    assert main(["train", str(recipe)]) == 0  # the resume rewrites the model
    assert _model_step(trained) == 6


def test_real_write_failure_from_torch_save(tmp_path, recipe, capsys):
    """A write that really fails inside torch's zip writer (file size limit: EFBIG)."""
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (400_000, hard))  # checkpoint.pt is ~900 kB
    try:
        rc = main(["train", str(recipe)])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert rc == 2
    assert "checkpoint.pt (File too large)" in _one_error(capsys)
    run = tmp_path / "run"
    assert not (run / "checkpoint.pt").exists() and _temps(run) == []


class _Caps(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inh", ctypes.c_uint32),
    ]


@contextlib.contextmanager
def _read_only(folder):
    """``chmod 555`` that holds for root too: root ignores permissions through
    CAP_DAC_OVERRIDE, so this thread drops that capability until the block ends."""
    folder.chmod(0o555)
    restore = None
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
        data = (_Caps * 2)()
        if libc.capget(header, data) != 0:
            folder.chmod(0o755)
            pytest.skip("cannot read capabilities")
        restore = data[0].effective
        data[0].effective &= ~(1 << 1)  # CAP_DAC_OVERRIDE
        if libc.capset(header, data) != 0:
            folder.chmod(0o755)
            pytest.skip("cannot drop CAP_DAC_OVERRIDE")
    try:
        yield
    finally:
        if restore is not None:
            data[0].effective = restore
            libc.capset(header, data)
        folder.chmod(0o755)


def test_read_only_run_dir_is_refused_before_training(trained, recipe, capsys):
    before = _snapshot(trained)
    with _read_only(trained):
        assert main(["train", str(recipe)]) == 2
    assert "is not writable (Permission denied)" in _one_error(capsys)
    assert _snapshot(trained) == before


def test_new_run_dir_in_a_read_only_folder_is_refused(tmp_path, recipe, capsys):
    parent = tmp_path / "ro"
    parent.mkdir()
    with _read_only(parent):
        rc = main(["train", str(recipe), "--set", f"run.dir='{(parent / 'run').as_posix()}'"])
    assert rc == 2
    assert "is not writable (Permission denied)" in _one_error(capsys)
    assert list(parent.iterdir()) == []


def test_run_dir_turning_read_only_mid_run(trained, recipe, monkeypatch, capsys):
    before = (trained / "checkpoint.pt").read_bytes()
    real = Trainer.train_step
    stack = contextlib.ExitStack()

    def train_step(self):
        if self.step == 4:
            stack.enter_context(_read_only(trained))
        return real(self)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    with stack:
        assert main(["train", str(recipe)]) == 2
    line = _one_error(capsys)
    assert "checkpoint.pt (Permission denied)" in line and "step 3 is intact" in line
    assert (trained / "checkpoint.pt").read_bytes() == before and _temps(trained) == []
