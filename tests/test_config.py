import pytest

from noisecraft.errors import ConfigError, UnknownNameError
from noisecraft.training.config import ExperimentConfig, load_config, parse_override


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
