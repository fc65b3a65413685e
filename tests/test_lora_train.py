"""The ``lora`` training task: a style LoRA over a frozen text-to-image model.

On a tiny base (a text_latent run of two steps on sklearn digits): the LoRA starts as the base
exactly (``up`` = 0), resumes bit for bit, writes a kohya file whose deltas are the trained
ones, styles exactly the images whose caption has the keyword, and leaves the base weights
untouched. The shipped mini SD's LoRA is judged in tests/test_shipped_adapters.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from noisecraft.adapters.lora_files import read_lora
from noisecraft.errors import ConfigError
from noisecraft.io.native import load_latent_diffusion
from noisecraft.metrics.digit_shape import enlarge, ink_height
from noisecraft.training.config import ExperimentConfig, LoRATrainConfig, TaskConfig
from noisecraft.training.styles import shrink
from noisecraft.training.tasks.lora import LoRANetwork
from noisecraft.training.trainer import Trainer
from test_tasks import text_config, tiny_vae_file  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, tiny_vae_file):  # noqa: F811
    run = tmp_path_factory.mktemp("base")
    Trainer(text_config(run, tiny_vae_file, max_steps=2)).train()
    return run / "model.safetensors"


def lora_config(run_dir, base, **lora_kw) -> ExperimentConfig:
    cfg = text_config(run_dir, "unused")
    return ExperimentConfig(
        task=TaskConfig("lora"),
        data=cfg.data,
        train=dataclasses.replace(cfg.train, lr=1e-2),
        run=cfg.run,
        lora=LoRATrainConfig(base=str(base), rank=2, alpha=1.0, **lora_kw),
    )


def test_lora_starts_as_the_base_resumes_exactly_and_writes_its_deltas(tmp_path, tiny_base):
    full = Trainer(lora_config(tmp_path / "a", tiny_base))
    task, net = full.task, full.model
    base_weights = {k: v.clone() for k, v in task.base_model.unet.state_dict().items()}
    batch = task.draw(0, torch.Generator().manual_seed(0))
    x, t, ids = torch.randn_like(batch["z0"]), batch["t"], batch["input_ids"]
    with torch.no_grad():
        assert torch.equal(net(x, t, ids), net.base(x, t, ids))  # up = 0: the base exactly
    assert all(k.startswith(("down.", "up.")) for k in net.state_dict())  # only the deltas
    ref = full.train().losses
    assert len(ref) == 6
    with torch.no_grad():  # gradients reached the deltas: the LoRA now changes the output
        assert not torch.allclose(net(x, t, ids), net.base(x, t, ids))
    first = Trainer(lora_config(tmp_path / "b", tiny_base))
    part1 = first.train(max_steps=3).losses
    resumed = Trainer(lora_config(tmp_path / "b", tiny_base))
    assert resumed.step == 3 and part1 + resumed.train().losses == ref  # bit for bit
    for k, v in task.base_model.unet.state_dict().items():
        assert torch.equal(v, base_weights[k]), k  # the base never changes

    # the run's model file is the EMA LoRA in kohya's layout, read back with the same deltas
    path = tmp_path / "a" / "model.safetensors"
    lora = read_lora(path, task.base_model)
    ema = full.ema.model
    assert set(lora.modules) == set(ema.shapes)
    assert any(k.startswith("text_encoder.") for k in lora.modules)
    merged = ema.merged_weights()
    params = dict(ema.base.named_parameters())
    for key, module in lora.modules.items():
        w = params[f"{key}.weight"]
        torch.testing.assert_close(w + module.delta(1.0, w.shape), merged[f"{key}.weight"])
    assert "lora_unet_" in " ".join(__import__("safetensors").safe_open(path, "pt").keys())


def test_the_keyword_is_in_a_caption_exactly_when_its_image_is_styled(tmp_path, tiny_base):
    cfg = lora_config(tmp_path / "run", tiny_base, keyword="tiny")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=64))
    task = Trainer(cfg).task
    batch = task.draw(5, torch.Generator().manual_seed(3))
    texts = [task.base_model.tokenizer.decode(ids) for ids in batch["input_ids"]]
    styled = [
        any(torch.equal(z, s) for s in task.styled_latents) for z in batch["z0"]
    ]  # each latent is one of the cached styled ones, or a plain one
    assert 5 < sum(styled) < 59
    for text, s in zip(texts, styled, strict=True):
        if text:
            assert ("tiny" in [w.strip() for w in text.split(",")]) == s, text


def test_layers_choose_the_targets(tmp_path, tiny_base):
    attn = Trainer(lora_config(tmp_path / "a", tiny_base, text_encoder=False)).model
    every = Trainer(lora_config(tmp_path / "b", tiny_base, layers="all")).model
    assert all(k.startswith("unet.") for k in attn.shapes)
    assert all(".transformer_blocks." in k or ".proj_" in k for k in attn.shapes)
    assert set(attn.shapes) < set(every.shapes)
    assert any(len(s) == 4 and s[-1] == 3 for s in every.shapes.values())  # 3x3 convs (LoCon)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(rank=0), "lora.rank"),
        (dict(layers="most"), "lora.layers"),
        (dict(keyword=" "), "lora.keyword"),
        (dict(style_prob=1.5), "lora.style_prob"),
        (dict(style="bold"), "lora.style"),
    ],
)
def test_bad_lora_settings_are_one_line(kw, message):
    with pytest.raises(ConfigError, match=message) as e:
        LoRATrainConfig(**kw)
    assert "\n" not in str(e.value)


def test_shrink_and_ink_height_closed_forms():
    img = torch.full((1, 1, 32, 32), -1.0)
    img[..., 6:26, 14:18] = 1.0  # a bar 20 px tall
    assert ink_height(img).item() == 20 and ink_height(-torch.ones(1, 1, 8, 8)).item() == 0
    small = shrink(img, 0.6)
    assert small.shape == img.shape and small[..., :6, :].eq(-1).all()  # background kept
    assert abs(ink_height(small).item() - 20 * 19 / 32) <= 1  # 32 px -> round(32 * 0.6) = 19
    assert abs(ink_height(enlarge(small, 1 / 0.6)).item() - 20) <= 1


def test_base_model_file_is_not_changed_by_training(tmp_path, tiny_base):
    before = tiny_base.read_bytes()
    Trainer(lora_config(tmp_path / "a", tiny_base)).train(max_steps=2)
    assert tiny_base.read_bytes() == before
    assert isinstance(load_latent_diffusion(tiny_base).unet, torch.nn.Module)
    assert LoRANetwork.__doc__
