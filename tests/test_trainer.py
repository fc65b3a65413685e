import dataclasses
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from conftest import tiny_config
from noisecraft.errors import ConfigError, OutputExistsError
from noisecraft.io.native import load_pixel_diffusion
from noisecraft.training.ema import EMA
from noisecraft.training.trainer import Trainer


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resume_continues_the_same_loss_sequence(tmp_path):
    full = Trainer(tiny_config(tmp_path / "a"))
    ref = full.train().losses
    assert len(ref) == 6

    first = Trainer(tiny_config(tmp_path / "b"))
    part1 = first.train(max_steps=3).losses
    del first
    resumed = Trainer(tiny_config(tmp_path / "b"))
    assert resumed.step == 3
    part2 = resumed.train().losses
    assert part1 + part2 == ref  # bit-identical
    for k, v in _params(full.model).items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    for k, v in _params(full.ema.model).items():
        assert torch.equal(v, resumed.ema.model.state_dict()[k]), k


def test_run_dir_outputs_and_sampling_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path / "run")
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, sample_every=6))
    Trainer(cfg).train()
    run = tmp_path / "run"
    assert (run / "checkpoint.pt").is_file() and (run / "config.json").is_file()
    rows = (run / "log.csv").read_text().splitlines()
    assert rows[0] == "step,loss,lr,samples_per_s,elapsed_s" and len(rows) == 7
    assert (run / "samples" / "step_000006.png").is_file()
    model = load_pixel_diffusion(run / "model.safetensors")
    assert model.image_size == 8 and model.num_classes == 10
    # the shipped weights are the EMA weights
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    for k, v in model.unet.state_dict().items():
        assert torch.equal(v, state["ema"]["model"][k])


def test_new_run_in_foreign_dir_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "precious.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="pass overwrite or set run.dir"):
        Trainer(tiny_config(tmp_path / "run"))
    assert (tmp_path / "run" / "precious.txt").read_text() == "keep me"


def test_resume_with_other_model_config_is_refused(tmp_path):
    Trainer(tiny_config(tmp_path / "run")).train(max_steps=1)
    cfg = tiny_config(tmp_path / "run")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, model_channels=16))
    with pytest.raises(ConfigError, match="different \\[model\\]"):
        Trainer(cfg)


def test_gradient_accumulation_equals_full_batch(tmp_path):
    a = Trainer(tiny_config(tmp_path / "a", grad_accum=1))
    b = Trainer(tiny_config(tmp_path / "b", grad_accum=4))
    la, lb = a.train_step(), b.train_step()
    assert abs(la - lb) < 1e-6
    for k, v in a.model.state_dict().items():
        torch.testing.assert_close(v, b.model.state_dict()[k], rtol=1e-5, atol=1e-6)


def test_ema_formula():
    lin = torch.nn.Linear(2, 2)
    ema = EMA(lin, decay=0.9, warmup=False)
    old = lin.weight.detach().clone()
    with torch.no_grad():
        lin.weight.add_(1.0)
    ema.update(lin)
    torch.testing.assert_close(ema.model.weight, 0.9 * old + 0.1 * lin.weight)
    warm = EMA(lin, decay=0.999)
    assert warm.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0)


def test_training_lowers_the_loss(tmp_path):
    cfg = tiny_config(tmp_path / "run", max_steps=60, lr=3e-3, warmup_steps=5)
    losses = Trainer(cfg).train().losses
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.7 * first, (first, last)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, run_dir: str, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    from noisecraft.training import distributed

    trainer = Trainer(tiny_config(run_dir, cond_drop_prob=0.5))
    losses = [trainer.train_step() for _ in range(2)]
    if rank == 0:
        torch.save({"params": _params(trainer.model), "losses": losses}, out)
    distributed.teardown(trainer.dist)


def test_ddp_two_gloo_processes_equal_single_process(tmp_path):
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path / "ddp"), out), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)
    single = Trainer(tiny_config(tmp_path / "single", cond_drop_prob=0.5))
    losses = [single.train_step() for _ in range(2)]
    assert ddp["losses"] == pytest.approx(losses, rel=1e-5)
    for k, v in single.model.state_dict().items():
        torch.testing.assert_close(ddp["params"][k], v, rtol=1e-5, atol=1e-6)
