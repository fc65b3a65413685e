"""The textual_inversion task: only the token's vectors train, the file is an A1111
embedding, the images are the thickest-stroked ones, and a run resumes exactly."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from noisecraft.adapters.embeddings import read_embedding
from noisecraft.errors import ConfigError
from noisecraft.io.checkpoint import read_info
from noisecraft.io.native import load_latent_diffusion, save_model
from noisecraft.metrics.stroke import stroke_thickness
from noisecraft.training.config import ExperimentConfig, load_config
from noisecraft.training.data import load_dataset
from noisecraft.training.trainer import Trainer
from test_latent_pipeline import VAE, WIDTH, tiny_model


@pytest.fixture(scope="module")
def base_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ti_base") / "base.safetensors"
    grey = dataclasses.replace(VAE, in_channels=1, out_channels=1)
    save_model(tiny_model(vae=grey), path)
    return path


def _config(run_dir, base, **train) -> ExperimentConfig:
    return ExperimentConfig.from_dict(
        {
            "task": {"name": "textual_inversion"},
            "data": {"name": "digits", "image_size": 32, "channels": 1, "limit": 200},
            "inversion": {"model": str(base), "token": "<thick>", "init_text": "the cat"},
            "train": {"batch_size": 8, "max_steps": 4, "lr": 1e-2, "device": "cpu", **train},
            "run": {"dir": str(run_dir), "sample_every": 0, "progress": False},
        }
    )


def test_only_the_vectors_train_and_the_file_is_an_a1111_embedding(tmp_path, base_file):
    trainer = Trainer(_config(tmp_path / "a", base_file))
    losses = trainer.train().losses
    assert len(losses) == 4 and all(x > 0 for x in losses)
    assert set(trainer.model.state_dict()) == {"vectors"}  # checkpoints hold the token only
    path = tmp_path / "a" / "model.safetensors"
    e = read_embedding(path)
    assert e.name == "model" and e.vectors.shape == (2, WIDTH)
    torch.testing.assert_close(e.vectors, trainer.ema.model.vectors.detach(), rtol=0, atol=0)
    info = read_info(path)
    assert info.kind == "textual_inversion" and info.config["name"] == "<thick>"
    # initialised from "the cat"'s token embeddings, then moved
    task = trainer.task
    table = task.base.text_encoder.embeddings.token_embedding.weight
    init = table[torch.tensor(task.base.tokenizer.encode("the cat"))]
    assert not torch.equal(trainer.model.vectors.detach(), init)
    # the base model is frozen: equal to its file after training
    fresh = load_latent_diffusion(base_file)
    for name in ("unet", "text_encoder", "vae"):
        mine, theirs = getattr(task.base, name).state_dict(), getattr(fresh, name).state_dict()
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs), name


def test_a_run_resumes_exactly(tmp_path, base_file):
    ref = Trainer(_config(tmp_path / "a", base_file)).train().losses
    first = Trainer(_config(tmp_path / "b", base_file))
    part = first.train(max_steps=2).losses
    del first
    resumed = Trainer(_config(tmp_path / "b", base_file))
    assert resumed.step == 2
    assert part + resumed.train().losses == ref


def test_it_learns_from_the_thickest_tenth_with_captions_naming_the_token(tmp_path, base_file):
    cfg = _config(tmp_path / "c", base_file)
    trainer = Trainer(cfg)
    task = trainer.task
    everything = load_dataset(cfg.data)
    thickness = stroke_thickness(everything.images)
    kept = task.selected
    assert len(kept) == 20  # 10 % of 200
    others = torch.ones(200, dtype=torch.bool)
    others[kept] = False
    assert thickness[kept].min() >= thickness[others].max()
    assert torch.equal(task.dataset.labels, everything.labels[kept])
    batch = task.draw(0, torch.Generator().manual_seed(0))
    vocab = task.base.text_encoder.config.vocab_size
    for row in batch["input_ids"]:
        assert sorted(row[row >= vocab].tolist()) == [vocab, vocab + 1]  # two vectors, once


def test_the_recipe_is_a_textual_inversion_run_and_bad_templates_are_refused():
    cfg = load_config("configs/mnist_text_ti.toml")
    assert cfg.task.name == "textual_inversion" and cfg.inversion.select == "classes"
    assert cfg.inversion.classes == ("4",) and cfg.inversion.token == "unlucky"
    thick = load_config("configs/mnist_text_ti_thick.toml")
    assert thick.inversion.select == "thickest" and thick.run.dir != cfg.run.dir
    with pytest.raises(ConfigError, match="inversion.classes"):
        load_config("configs/mnist_text_ti.toml", ['inversion.select="all"'])
    with pytest.raises(ConfigError, match=r"\{token\}"):
        load_config("configs/mnist_text_ti.toml", ['inversion.templates=["a {digit}"]'])
