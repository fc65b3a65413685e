"""The ``controlnet`` training task (training/tasks/controlnet.py) on the shipped mini SD, a
few steps: the ControlNet starts as "no change" (zero convolutions), only it is trained (the
base stays locked), its hints are the pipeline's canny preprocessor's, and the run's
model.safetensors is an original-layout ControlNet file that ``load_controlnet`` reads back
as the trained (EMA) weights. Also ``data.split``, which keeps the held-out digits out."""

from __future__ import annotations

import json

import pytest
import torch

from noisecraft.errors import ConfigError
from noisecraft.io.controlnet_files import load_controlnet
from noisecraft.pipelines.control_preprocess import make_hint
from noisecraft.training.config import DataConfig, ExperimentConfig, load_config
from noisecraft.training.data import load_dataset
from noisecraft.training.trainer import Trainer


def tiny(run_dir, **sets) -> ExperimentConfig:
    over = {
        "data.limit": 12,
        "train.batch_size": 4,
        "train.max_steps": 2,
        "train.warmup_steps": 0,
        "train.threads": 0,
        "run.dir": str(run_dir),
        "run.sample_every": 0,
        "run.checkpoint_every": 0,
        "run.progress": False,
        **sets,
    }
    return load_config(
        "configs/mnist_controlnet.toml", [f"{k}={json.dumps(v)}" for k, v in over.items()]
    )


def test_controlnet_task_trains_only_the_controlnet_and_writes_a_loadable_file(tmp_path):
    trainer = Trainer(tiny(tmp_path / "run"))
    task, net = trainer.task, trainer.model
    base = {k: v.clone() for k, v in task.base_model.unet.state_dict().items()}
    assert all(k.startswith("controlnet.") for k in net.state_dict())  # the U-Net is not saved
    batch = task.draw(0, torch.Generator().manual_seed(0))
    ctx = task.contexts[batch["rows"]]
    x, t, hint = torch.randn_like(batch["z0"]), batch["t"], batch["hint"].expand(-1, 3, -1, -1)
    with torch.no_grad():  # zero convolutions: exactly the locked U-Net at the start
        assert torch.equal(net(x, t, ctx, hint), net.unet(x, t, context=ctx))
    # the hints are the pipeline's canny hints of the training digits
    img = (trainer.dataset.images[3] + 1) / 2
    want = make_hint(img.expand(3, -1, -1)[None], 32, 32, preprocess_name="canny", resize="crop")
    assert torch.equal(task.hints[3].float(), want[0, :1])
    assert task.hints.any()
    res = trainer.train()
    assert len(res.losses) == 2
    for k, v in task.base_model.unet.state_dict().items():  # locked
        assert torch.equal(v, base[k]), k
    loaded = load_controlnet(tmp_path / "run" / "model.safetensors", task.base_model.unet.config)
    ema = trainer.ema.model.controlnet.state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, ema[k]), k
    assert loaded.middle_block_out[0].weight.abs().sum() > 0  # the zero convs were trained
    assert loaded.controlnet_config.hint_channels == (16, 32, 96)


@pytest.mark.slow
def test_controlnet_run_resumes_exactly(tmp_path):
    ref = Trainer(tiny(tmp_path / "a")).train().losses
    part1 = Trainer(tiny(tmp_path / "b")).train(max_steps=1).losses
    resumed = Trainer(tiny(tmp_path / "b"))
    assert resumed.step == 1 and part1 + resumed.train().losses == ref  # bit for bit


def test_split_keeps_the_heldout_digits_out():
    cfg = load_config("configs/mnist_controlnet.toml").data
    train = load_dataset(cfg)
    held = load_dataset(load_config("configs/mnist_controlnet.toml", ['data.split="heldout"']).data)
    assert len(train) == 4000 and len(held) == 1000
    assert torch.bincount(held.labels).tolist() == [100] * 10
    flat = lambda ds: {bytes(x.numpy().tobytes()) for x in ds.images}  # noqa: E731
    a, b = flat(train), flat(held)
    assert not a & b and len(a | b) >= 4990  # disjoint (MNIST has a few duplicate images)
    with pytest.raises(ConfigError, match="mnist only"):
        load_dataset(DataConfig(name="digits", split="train"))


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        ({"controlnet.hint_channels": [16, 32, 96, 256]}, "3 widths"),
        ({"controlnet.preprocess": "depth"}, "preprocess"),
        ({"data.split": "test"}, "split"),
    ],
)
def test_bad_controlnet_settings_are_one_line(tmp_path, sets, message):
    with pytest.raises(ConfigError, match=message) as e:
        Trainer(tiny(tmp_path / "run", **sets))
    assert "\n" not in str(e.value)
