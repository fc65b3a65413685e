"""The shipped canny ControlNet of the mini SD (``assets/controlnets/mnist_canny.safetensors``,
configs/mnist_controlnet.toml) steers the image, on held-out digits it was not trained on.

Full measurement (``bench/controlnet_quality.py``: the 1,000 held-out digits, seed i, 20 steps
of DPM++ 2M; docs/controlnet.md "A ControlNet trained here"), and on this file's small set
(30 held-out digits, 3 per class, 10 steps; 10 held-out 7s for the conflict):

* (a) empty prompt, read as the hint's digit: 97.4 % with the ControlNet, 10.9 % without
  (here 96.7 % / 23.3 %);
* (b) edge F1 within 1 px against the hint: 0.998 with, 0.676 without (here 1.000 / 0.675);
* (c) "a handwritten 3" with a 7's hint (100 held-out 7s): read as 7 at weight 1.0: 95 %,
  at 0.5: 9 % (86 % read as 3), at 0.2: 0 % (100 % read as 3) (here 100 % / 20 % / 0 %,
  read as 3 at 0.2: 100 %).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import noisecraft
from noisecraft.io.controlnet_files import load_controlnet
from noisecraft.io.native import load_latent_diffusion
from noisecraft.io.shipped import SHIPPED_CONTROLNET_DIR, resolve_model
from noisecraft.training.tasks.controlnet import image_hints

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import controlnet_quality as cq  # noqa: E402

FILE = SHIPPED_CONTROLNET_DIR / "mnist_canny.safetensors"


@pytest.fixture(scope="module")
def base():
    return load_latent_diffusion(resolve_model("mnist-text"))


@pytest.fixture(scope="module")
def net(base):
    return load_controlnet(FILE, base.unet.config)


@pytest.fixture(scope="module")
def heldout():
    images, digits = cq.heldout_digits(30)
    return images, digits, image_hints(images, "canny").float().expand(-1, 3, -1, -1)


def test_the_shipped_file_is_small_and_found_by_name(heldout):
    assert FILE.stat().st_size <= 10e6
    images, _, hints = heldout
    pipe = noisecraft.load("mnist-text")  # no controlnet_dir: the shipped one is known by name
    digit = ((images[0] + 1) / 2).expand(3, -1, -1)[None]
    out = pipe(
        "",
        control=[noisecraft.Control("mnist_canny", digit, preprocess="canny")],
        steps=4,
        seed=0,
        progress=False,
    )
    assert torch.equal(torch.from_numpy(np.array(out.hints[0]))[..., 0].bool(), hints[0, 0].bool())
    assert "Model: mnist_canny [" in out.infotexts[0]


def test_a_file_of_the_same_name_in_controlnet_dir_wins(tmp_path):
    from noisecraft.api.controls import PipelineControlNets

    assert PipelineControlNets().available()["mnist_canny"] == FILE
    (tmp_path / "mnist_canny.safetensors").write_bytes(FILE.read_bytes())
    found = PipelineControlNets(tmp_path).available()["mnist_canny"]
    assert found == tmp_path / "mnist_canny.safetensors"


def test_one_batch_with_per_image_hints_equals_one_call_per_image(base, net, heldout):
    _, _, hints = heldout
    batch = cq.controlled(
        base, net, hints[:2], prompt="a handwritten 3", seeds=[5, 6], cfg=5.0, steps=4
    )
    for i in range(2):
        one = cq.controlled(
            base, net, hints[i : i + 1], prompt="a handwritten 3", seeds=[5 + i], cfg=5.0, steps=4
        )
        torch.testing.assert_close(batch[i : i + 1], one, atol=1e-4, rtol=0)


def test_the_hint_carries_the_digit_and_its_edges(base, net, heldout):
    images, digits, hints = heldout
    seeds = list(range(30))
    without = cq.hint_scores(cq.controlled(base, None, hints, seeds=seeds, steps=10), digits, hints)
    with_cn = cq.hint_scores(cq.controlled(base, net, hints, seeds=seeds, steps=10), digits, hints)
    assert with_cn["read"] >= 0.9 and without["read"] <= 0.4
    assert with_cn["f1"] >= 0.95 and without["f1"] <= 0.8


def test_a_conflicting_prompt_gives_way_as_the_weight_rises(base, net):
    images, labels = cq.heldout_digits(300)
    sevens = images[labels == 7][:10]
    h7 = image_hints(sevens, "canny").float().expand(-1, 3, -1, -1)
    res = cq.conflict_reads(base, net, h7, list(range(10)), weights=(1.0, 0.2))
    assert res[1.0][0] >= 0.8  # the hint wins at full weight
    assert res[0.2][1] >= 0.8  # the prompt wins at a low weight
