"""Model configs round-trip through the JSON dicts kept in checkpoint metadata."""

from __future__ import annotations

import json

import pytest

from noisecraft.errors import ConfigError
from noisecraft.models.text_encoder import TextEncoderConfig
from noisecraft.models.unet import UNetConfig
from noisecraft.models.vae import VAEConfig


@pytest.mark.parametrize("config", [UNetConfig(), VAEConfig.sd(), TextEncoderConfig.sd15()])
def test_json_round_trip(config):
    d = json.loads(json.dumps(config.to_dict()))
    assert type(config).from_dict(d) == config


@pytest.mark.parametrize(
    "cls, key, guess",
    [(UNetConfig, "model_chanels", "model_channels"), (VAEConfig, "z_chanels", "z_channels")],
)
def test_unknown_key_names_the_closest(cls, key, guess):
    with pytest.raises(ConfigError, match=f"did you mean '{guess}'"):
        cls.from_dict({key: 1})
