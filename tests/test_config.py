import re

import pytest

from noisecraft.errors import ConfigError, UnknownNameError
from noisecraft.training.config import (
    ExperimentConfig,
    config_changes,
    is_free_key,
    load_config,
    parse_override,
)


def test_mnist_recipe_loads_and_round_trips():
    cfg = load_config("configs/mnist.toml")
    assert cfg.data.name == "mnist" and cfg.model.num_classes == 10
    assert ExperimentConfig.from_dict(cfg.to_dict()) == cfg


def test_overrides_parse_toml_literals():
    cfg = load_config(
        "configs/mnist.toml",
        ["train.lr=3e-4", "model.channel_mult=[1, 2, 4]", "run.dir=elsewhere", "data.flip=true"],
    )
    assert cfg.train.lr == 3e-4
    assert cfg.model.channel_mult == (1, 2, 4)
    assert cfg.run.dir == "elsewhere"
    assert cfg.data.flip is True
    assert parse_override("a.b=1") == (["a", "b"], 1)


def test_unknown_key_suggests_closest():
    with pytest.raises(UnknownNameError, match="did you mean 'lr'"):
        load_config("configs/mnist.toml", ["train.lrr=1"])
    with pytest.raises(UnknownNameError, match="did you mean 'train'"):
        load_config("configs/mnist.toml", ["trian.lr=1"])


def test_bad_values_and_files(tmp_path):
    with pytest.raises(ConfigError, match="must be a int"):
        load_config(None, ["train.batch_size=abc"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["nonsense"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


# ---------------------------------------------------------------- hardening (issue 13, case 7)


def test_binary_or_unreadable_recipe_is_one_config_error(tmp_path):
    binary = tmp_path / "bin.toml"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError, match="not a TOML text file"):
        load_config(binary)
    with pytest.raises(ConfigError, match="is a folder; give a TOML recipe file"):
        load_config(tmp_path)
    huge = tmp_path / "huge.toml"
    huge.write_bytes(b"# " + b"x" * 2_000_000)
    with pytest.raises(ConfigError, match="not a TOML recipe"):
        load_config(huge)
    deep = tmp_path / "deep.toml"
    deep.write_text("[train]\nbetas = " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError):
        load_config(deep)


@pytest.mark.parametrize("literal", ["nan", "inf", "-inf", "+nan"])
@pytest.mark.parametrize(
    "key",
    ["train.lr", "train.ema_decay", "diffusion.min_snr_gamma", "run.sample_cfg", "model.dropout"],
)
def test_non_finite_floats_are_refused_in_set_and_toml(tmp_path, key, literal):
    with pytest.raises(ConfigError, match=f"{key} must be a finite number"):
        load_config(None, [f"{key}={literal}"])
    section, name = key.split(".")
    toml = tmp_path / "c.toml"
    toml.write_text(f"[{section}]\n{name} = {literal}\n")
    with pytest.raises(ConfigError, match=f"{key} must be a finite number"):
        load_config(toml)


def test_non_finite_inside_a_list_is_refused():
    with pytest.raises(ConfigError, match="train.betas must be a finite number"):
        load_config(None, ["train.betas=[0.9, nan]"])


@pytest.mark.parametrize(
    "item, needle",
    [
        ("data.image_size=0", "data.image_size must be at least 1"),
        ("data.channels=2", "data.channels must be 1 or 3"),
        ("data.limit=-1", "data.limit must be at least 0"),
        ("data.pad=-2", "data.pad must be at least 0"),
        ("diffusion.num_steps=1", "diffusion.num_steps must be an integer in 2..100000"),
        ("diffusion.offset_noise=-0.1", "diffusion.offset_noise must be >= 0"),
        ("diffusion.min_snr_gamma=0", "diffusion.min_snr_gamma must be > 0"),
        ("diffusion.vlb_weight=-1", "diffusion.vlb_weight must be >= 0"),
        ("train.seed=-1", "train.seed must be an integer in 0..4294967295"),
        ("train.seed=18446744073709551616", "train.seed must be an integer in 0..4294967295"),
        ("train.batch_size=0", "train.batch_size must be at least 1"),
        ("train.grad_accum=0", "train.grad_accum must be at least 1"),
        ("train.grad_accum=3", "divisible by train.grad_accum"),
        ("train.lr=0", "train.lr must be > 0"),
        ("train.lr=-1e-4", "train.lr must be > 0"),
        ("train.weight_decay=-1", "train.weight_decay must be >= 0"),
        ("train.betas=[0.9, 1.0]", "train.betas must be two numbers in [0, 1)"),
        ("train.betas=[0.9]", "train.betas must be two numbers in [0, 1)"),
        ("train.betas=5", "train.betas must be a list"),
        ("train.warmup_steps=-1", "train.warmup_steps must be at least 0"),
        ("train.max_steps=-5", "train.max_steps must be at least 1"),
        ("train.max_steps=0", "train.max_steps must be at least 1"),
        ("train.grad_clip=-1", "train.grad_clip must be >= 0"),
        ("train.ema_decay=1.5", "train.ema_decay must be in [0, 1]"),
        ("train.cond_drop_prob=-0.1", "train.cond_drop_prob must be in [0, 1]"),
        ("train.threads=-1", "train.threads must be an integer in 0..1024"),
        ("train.threads=1000000", "train.threads must be an integer in 0..1024"),
        ("train.mixed_precision='fp8'", "train.mixed_precision must be one of: no, fp16, bf16"),
        ("run.dir=''", "run.dir must name a folder"),
        ("run.checkpoint_every=-1", "run.checkpoint_every must be at least 0"),
        ("run.sample_every=-1", "run.sample_every must be at least 0"),
        ("run.sample_steps=0", "run.sample_steps must be at least 1"),
        ("run.sample_steps=5000", "run.sample_steps (5000) must be at most diffusion.num_steps"),
        ("run.log_every=0", "run.log_every must be at least 1"),
        ("run.sample_sampler='eulr'", "run.sample_sampler: unknown sampler 'eulr'"),
    ],
)
def test_every_number_is_checked_against_its_range(item, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config("configs/mnist.toml", [item])


@pytest.mark.parametrize(
    "toml, needle",
    [
        ('[task]\nname = "vae"\n[vae_loss]\nkl_weight = nan\n', "vae_loss.kl_weight"),
        ('[task]\nname = "vae"\n[vae_loss]\ndisc_start = -1\n', "vae_loss.disc_start"),
        ('[task]\nname = "vae"\n[vae]\nscaling_factor = inf\n', "scaling_factor"),
        ('[task]\nname = "text_latent"\n[latent]\nencode_batch_size = 0\n', "encode_batch_size"),
        ('[task]\nname = "tiny_decoder"\n[distill]\nlatent_noise = -1.0\n', "latent_noise"),
        ('[task]\nname = "tiny_decoder"\n[distill]\ngradient_weight = nan\n', "gradient_weight"),
    ],
)
def test_task_sections_are_range_checked_too(tmp_path, toml, needle):
    path = tmp_path / "t.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=needle):
        load_config(path)


def test_dataclass_validation_applies_to_python_construction():
    import dataclasses

    cfg = load_config(None)
    with pytest.raises(ConfigError, match="train.lr must be a finite number"):
        dataclasses.replace(cfg.train, lr=float("nan"))
    with pytest.raises(ConfigError, match="run.checkpoint_every must be at least 0"):
        dataclasses.replace(cfg.run, checkpoint_every=-1)


def test_override_value_that_is_not_one_toml_value_stays_text():
    assert parse_override("run.dir=a\n[x]") == (["run", "dir"], "a\n[x]")
    assert parse_override(" train . lr =1") == (["train", "lr"], 1)


def test_config_changes_and_free_keys():
    a = load_config(None).to_dict()
    b = load_config(None, ["train.batch_size=32", "run.log_every=5", "train.max_steps=9"])
    changes = config_changes(a, b.to_dict())
    assert changes == {
        "run.log_every": (10, 5),
        "train.batch_size": (64, 32),
        "train.max_steps": (4000, 9),
    }
    assert is_free_key("run.log_every") and is_free_key("train.max_steps")
    assert is_free_key("train.device") and is_free_key("train.threads")
    assert not is_free_key("train.batch_size") and not is_free_key("train.lr")
    # tuples and lists compare as JSON does; a key missing on one side is not a change
    a["train"]["betas"] = [0.9, 0.999]
    del a["train"]["seed"]
    assert config_changes(a, load_config(None).to_dict()) == {}
