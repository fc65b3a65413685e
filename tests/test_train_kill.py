"""Kill real training processes and resume them (slow suite: ``make test-slow``).

``kill -9`` at random moments and at named points inside checkpoint writes (the test hook
``NOISECRAFT_DEBUG_PAUSE`` stops the process there, the test then kills it), then resume until
done: no stale temporaries, ``model.safetensors`` at the checkpoint's step, one ``log.csv`` row
per step, and weights and loss curve equal to an uninterrupted run's, bit for bit.
Ctrl-C under torchrun: every rank stops after the same step and the printed command resumes.
"""

from __future__ import annotations

import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import tiny_recipe
from noisecraft.io.checkpoint import read_info

pytestmark = pytest.mark.slow


STEPS = 24
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _recipe(folder: Path, every: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny.toml"
    path.write_text(
        tiny_recipe(
            (folder / "run").as_posix(),
            train={"max_steps": STEPS, "warmup_steps": 2, "device": "cpu", "threads": 1},
            run={"checkpoint_every": every, "sample_every": 8, "sample_steps": 4, "log_every": 1},
        )
    )
    return path


def _start(recipe: Path, log: Path, **env: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "noisecraft", "train", str(recipe)]
    with open(log, "w") as err:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env={**ENV, **env})


def _wait_for(log: Path, text: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if text in log.read_text():
            return
        assert proc.poll() is None, log.read_text()[-2000:]
        time.sleep(0.05)
    raise AssertionError(f"{text!r} never appeared: {log.read_text()[-2000:]}")


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


def _temps(run: Path) -> list[str]:
    return sorted(str(p) for p in run.rglob(".*") if p.name.endswith((".tmp", ".old")))


def _state(run: Path) -> dict:
    return torch.load(run / "checkpoint.pt", weights_only=True)


def _model_step(run: Path) -> int | None:
    path = run / "model.safetensors"
    return read_info(path).training.get("step") if path.exists() else None


def _rows(run: Path) -> list[list[str]]:
    return [r.split(",") for r in (run / "log.csv").read_text().splitlines()[1:]]


def _flat(obj, prefix=""):
    """Every tensor of a nested checkpoint state, by path."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _flat(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _flat(v, f"{prefix}/{i}")


def test_kill_9_anywhere_then_resume_equals_an_uninterrupted_run(tmp_path):
    ref = _recipe(tmp_path / "ref")
    t0 = time.monotonic()
    proc = _start(ref, tmp_path / "ref.log")
    assert proc.wait(timeout=600) == 0, (tmp_path / "ref.log").read_text()[-2000:]
    wall = time.monotonic() - t0

    recipe = _recipe(tmp_path / "killed")
    run = tmp_path / "killed" / "run"
    log = tmp_path / "killed.log"
    windows = 0
    # 1. inside checkpoint writes, at named points
    for point, step in [("checkpoint-partial", 4), ("checkpoint-tmp", 8), ("between-writes", 12)]:
        proc = _start(recipe, log, NOISECRAFT_DEBUG_PAUSE=f"{point}@{step}")
        _wait_for(log, f"debug-pause {point} {step}", proc)
        if point == "between-writes":  # the new checkpoint is in place, the model is not
            assert _state(run)["step"] == step and _model_step(run) != step
        else:  # a partial / complete temporary beside the previous checkpoint
            assert any(".checkpoint.pt." in t for t in _temps(run))
        windows += 1
        _kill(proc)
    # 2. at random moments (start-up, steps, sample grids, writes)
    rng = random.Random(13)
    for _ in range(6):
        before = _state(run)["step"] if (run / "checkpoint.pt").exists() else None
        proc = _start(recipe, log)
        time.sleep(rng.uniform(0.2, wall))
        if proc.poll() is not None:
            break
        _kill(proc)
        if before is not None:  # a kill never loses the checkpoint: it only moves forward
            assert _state(run)["step"] >= before
    # 3. resume to the end
    proc = _start(recipe, log)
    assert proc.wait(timeout=600) == 0, log.read_text()[-2000:]
    assert windows == 3

    assert _temps(run) == []
    state = _state(run)
    assert state["step"] == _model_step(run) == STEPS
    rows, ref_rows = _rows(run), _rows(tmp_path / "ref" / "run")
    assert [int(r[0]) for r in rows] == list(range(1, STEPS + 1))
    assert [r[1] for r in rows] == [r[1] for r in ref_rows]  # the loss curve
    ref_state = _state(tmp_path / "ref" / "run")
    ours, theirs = dict(_flat(state)), dict(_flat(ref_state))
    assert ours.keys() == theirs.keys()
    for k, v in ours.items():
        assert torch.equal(v, theirs[k]), k
    model, ref_model = (
        load_file(p / "run" / "model.safetensors") for p in (recipe.parent, ref.parent)
    )
    assert all(torch.equal(model[k], ref_model[k]) for k in ref_model)
    assert sorted(p.name for p in (run / "samples").iterdir()) == [
        "step_000008.png",
        "step_000016.png",
        "step_000024.png",
    ]


def test_ctrl_c_in_a_real_process_prints_a_command_that_resumes(tmp_path):
    recipe = _recipe(tmp_path, every=500)
    log = tmp_path / "err.log"
    proc = _start(recipe, log)
    run = tmp_path / "run"
    while not (run / "log.csv").exists() or len(_rows(run)) < 5:
        assert proc.poll() is None, log.read_text()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    err = log.read_text()
    assert "Traceback" not in err
    stopped = _state(run)["step"]
    assert f"SIGINT: stopped at step {stopped}" in err and _model_step(run) == stopped
    assert [int(r[0]) for r in _rows(run)] == list(range(1, stopped + 1))
    command = shlex.split(err.split("resume with: ", 1)[1].splitlines()[0])
    assert command == [sys.executable, "-m", "noisecraft", "train", str(recipe)]
    r = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0 and f"resuming {run} from step {stopped}" in r.stdout
    assert _state(run)["step"] == STEPS


def test_ctrl_c_under_torchrun_stops_every_rank_at_the_same_step(tmp_path):
    recipe = _recipe(tmp_path, every=500)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd = [*torchrun, "--nproc_per_node", "2", "-m", "noisecraft.cli.main", "train", str(recipe)]
    out = tmp_path / "out.log"
    with open(out, "w") as f:
        proc = subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, env=ENV, start_new_session=True
        )
    run = tmp_path / "run"
    while not (run / "log.csv").exists() or len(_rows(run)) < 5:
        assert proc.poll() is None, out.read_text()[-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: every process of the group
    proc.wait(timeout=120)  # torchrun's own exit code and message are torchrun's
    text = out.read_text()
    stopped = _state(run)["step"]
    assert text.count(f"SIGINT: stopped at step {stopped}") == 1  # rank 0 reports
    assert _model_step(run) == stopped and _temps(run) == []
    assert [int(r[0]) for r in _rows(run)] == list(range(1, stopped + 1))
    command = shlex.split(text.split("resume with: ", 1)[1].splitlines()[0])
    assert command[: len(torchrun)] == torchrun and command[-2:] == ["train", str(recipe)]
    r = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _state(run)["step"] == STEPS
    assert [int(r[0]) for r in _rows(run)] == list(range(1, STEPS + 1))
