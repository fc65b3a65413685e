"""Shared test fixtures: tiny configs that train in seconds."""

from __future__ import annotations

import pytest
import torch

from noisecraft.models.unet import UNetConfig
from noisecraft.training.config import (
    DataConfig,
    DiffusionConfig,
    ExperimentConfig,
    RunConfig,
    TrainConfig,
)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)  # tiny test models: one thread is fastest and immune to load


def tiny_config(run_dir, **train_kw) -> ExperimentConfig:
    """sklearn digits at 8x8, a 2-level U-Net with 8 base channels."""
    return ExperimentConfig(
        data=DataConfig(name="digits", image_size=8, channels=1, limit=256),
        model=UNetConfig(
            in_channels=1,
            out_channels=1,
            model_channels=8,
            channel_mult=(1, 2),
            num_res_blocks=1,
            attention_levels=(1,),
            num_heads=2,
            num_classes=10,
            norm_groups=4,
        ),
        diffusion=DiffusionConfig(schedule="cosine", num_steps=100),
        train=TrainConfig(
            **{
                "batch_size": 16,
                "warmup_steps": 2,
                "max_steps": 6,
                "lr": 1e-3,
                "device": "cpu",
                **train_kw,
            }
        ),
        run=RunConfig(
            dir=str(run_dir),
            checkpoint_every=3,
            sample_every=0,
            log_every=1,
            progress=False,
            sample_steps=4,
        ),
    )


@pytest.fixture
def tiny_cfg(tmp_path):
    return tiny_config(tmp_path / "run")
