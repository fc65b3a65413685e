"""A real A1111 client, the PyPI ``webuiapi`` package, against ``noisecraft serve`` on
loopback (serve_in_thread): txt2img, img2img, inpainting, a LoRA tag, model switching,
interrupt, png-info, a ControlNet unit. Every image equals, pixel for pixel, the one the engine
(``noisecraft.load(...)``) or ``noisecraft generate`` makes with the same parameters."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from PIL import Image

webuiapi = pytest.importorskip("webuiapi")
pytest.importorskip("fastapi")

import noisecraft  # noqa: E402
from noisecraft.server import ServerConfig  # noqa: E402
from noisecraft.server.testing import serve_in_thread  # noqa: E402

SMALL = {"steps": 3, "width": 32, "height": 32, "sampler_name": "Euler a"}
ENGINE = {"steps": 3, "width": 32, "height": 32, "sampler": "Euler a", "eta": 1.0}


@pytest.fixture(scope="module")
def pipe():
    return noisecraft.load("mnist-text")


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    return tmp_path_factory.mktemp("outputs")


@pytest.fixture(scope="module")
def url(outputs):
    with serve_in_thread(ServerConfig(outputs_dir=outputs)) as url:
        yield url


@pytest.fixture(scope="module")
def api(url):
    host, port = url.removeprefix("http://").split(":")
    return webuiapi.WebUIApi(host=host, port=int(port))


def same(a: Image.Image, b: Image.Image) -> bool:
    return np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))


def test_txt2img_equals_the_engine_and_noisecraft_generate(api, pipe, tmp_path, outputs):
    from noisecraft.cli.main import main

    r = api.txt2img(prompt="a 7", seed=3, cfg_scale=5.0, **SMALL)
    want = pipe("a 7", seed=3, cfg=5.0, **ENGINE)
    assert same(r.image, want.images[0])
    assert r.info["infotexts"] == want.infotexts
    assert r.info["all_seeds"] == [3] and r.info["sd_model_name"] == "mnist-text"
    assert (outputs / r.info["files"][0]).is_file()
    out = tmp_path / "cli.png"
    args = ["generate", "a 7", "--seed", "3", "--cfg", "5", "--steps", "3", "--size", "32x32"]
    assert main([*args, "--sampler", "Euler a", "--out", str(out)]) == 0
    assert same(r.image, Image.open(out))


def test_img2img_and_inpainting_equal_the_engine(api, pipe):
    init = pipe("a 2", seed=1, **ENGINE).images[0].convert("RGB")
    r = api.img2img(images=[init], prompt="a 8", denoising_strength=0.6, seed=4, **SMALL)
    want = pipe("a 8", init_image=init, strength=0.6, seed=4, **ENGINE)
    assert same(r.image, want.images[0])
    assert r.info["infotexts"] == want.infotexts
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    r = api.img2img(
        images=[init],
        mask_image=mask,
        mask_blur=0,
        inpainting_fill=1,
        inpaint_full_res=False,
        prompt="a 8",
        denoising_strength=0.9,
        seed=5,
        **SMALL,
    )
    want = pipe("a 8", init_image=init, mask=mask, strength=0.9, seed=5, **ENGINE)
    assert same(r.image, want.images[0])
    unmasked = pipe("a 8", init_image=init, strength=0.9, seed=5, **ENGINE)
    assert not same(r.image, unmasked.images[0])  # the mask was applied
    # webuiapi's default mask_blur (4) blurs the mask as A1111 does, before the engine
    from noisecraft.server.images import blur_mask

    inpaint = {"inpainting_fill": 1, "inpaint_full_res": False, "denoising_strength": 0.9}
    r = api.img2img(images=[init], mask_image=mask, prompt="a 8", seed=5, **inpaint, **SMALL)
    blurred = blur_mask(mask, 4, 4)
    want = pipe("a 8", init_image=init, mask=blurred, strength=0.9, seed=5, **ENGINE)
    assert same(r.image, want.images[0])


def test_a_lora_tag_applies_the_shipped_lora(api, pipe):
    assert any(x["name"] == "mnist_tiny" for x in api.get_loras())
    r = api.txt2img(prompt="a 7 <lora:mnist_tiny:1>", seed=6, **SMALL)
    want = pipe("a 7 <lora:mnist_tiny:1>", seed=6, **ENGINE)
    plain = pipe("a 7", seed=6, **ENGINE)
    assert same(r.image, want.images[0]) and not same(r.image, plain.images[0])
    assert "Lora hashes" in r.info["infotexts"][0]


def test_switching_models_through_options(api):
    lcm = noisecraft.load("mnist-text-lcm")
    fast = {"steps": 4, "width": 32, "height": 32, "cfg_scale": 1.0, "sampler_name": "LCM"}
    assert api.util_get_current_model() == "mnist-text"
    # a request may run on another model and switch back afterwards
    r = api.txt2img(
        prompt="a 5", seed=8, override_settings={"sd_model_checkpoint": "mnist-text-lcm"}, **fast
    )
    want = lcm("a 5", seed=8, steps=4, width=32, height=32, cfg=1.0, sampler="LCM")
    assert same(r.image, want.images[0]) and r.info["sd_model_name"] == "mnist-text-lcm"
    assert api.util_get_current_model() == "mnist-text"
    api.util_set_model("mnist-text-lcm")
    try:
        assert api.get_options()["sd_model_checkpoint"] == "mnist-text-lcm"
        r = api.txt2img(prompt="a 5", seed=8, **fast)
        assert same(r.image, want.images[0]) and r.info["infotexts"] == want.infotexts
    finally:
        api.set_options({"sd_model_checkpoint": "mnist-text"})
    assert api.util_get_current_model() == "mnist-text"


def test_interrupt_returns_the_finished_batches(api, pipe):
    answer = {}

    def run():
        answer["r"] = api.txt2img(prompt="a 0", seed=20, n_iter=3, **{**SMALL, "steps": 30})

    thread = threading.Thread(target=run)
    thread.start()
    preview = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        p = api.get_progress()
        if p["current_image"] and preview is None:
            preview = p["current_image"]
        if p["state"]["job_no"] >= 1 and p["state"]["sampling_step"] > 0:
            break
        time.sleep(0.01)
    assert 0 < p["progress"] < 1 and p["state"]["job"] == "txt2img"
    assert p["state"]["sampling_steps"] == 30
    api.interrupt()
    thread.join(60)
    r = answer["r"]
    assert r.info["interrupted"] is True
    assert 1 <= len(r.images) < 3  # the batch being sampled is dropped
    want = pipe("a 0", seed=20, n=len(r.images), **{**ENGINE, "steps": 30})
    for got, im in zip(r.images, want.images, strict=True):
        assert same(got, im)
    assert preview is not None  # a cheap preview came from the sampler callback


def test_png_info(api):
    r = api.txt2img(prompt="a 9", seed=12, **SMALL)
    info = api.png_info(r.image)
    assert info.info == r.info["infotexts"][0]
    assert info.json["parameters"]["seed"] == 12


def test_a_client_that_disconnects_does_not_lose_its_image(url, outputs, pipe):
    import json
    import socket

    body = json.dumps({"prompt": "a 1", "seed": 77, **SMALL}).encode()
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        head = f"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: {host}\r\n"
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        sock.sendall(head.encode() + body)
    # gone before the answer; the image is made and saved all the same
    deadline = time.monotonic() + 60
    while not list(outputs.rglob("*-77.png")) and time.monotonic() < deadline:
        time.sleep(0.05)
    (saved,) = outputs.rglob("*-77.png")
    # written atomically (a temporary name, then renamed): the name appears complete
    want = pipe("a 1", seed=77, **{**ENGINE, "eta": None})
    im = Image.open(saved)
    assert im.info["parameters"] == want.infotexts[0]
    assert same(im, want.images[0])


def test_webuiapi_logs_in_with_api_auth(tmp_path):
    config = ServerConfig(outputs_dir=tmp_path, api_auth="ann:secret")
    with serve_in_thread(config) as url:
        host, port = url.removeprefix("http://").split(":")
        api = webuiapi.WebUIApi(host=host, port=int(port), username="ann", password="secret")
        assert api.get_options()["sd_model_checkpoint"] == "mnist-text"
        api.set_auth("ann", "wrong")
        assert api.session.get(api.baseurl + "/options").status_code == 401


def test_controlnet_unit_equals_the_engine(api, pipe):
    """webuiapi.ControlNetUnit with the shipped canny ControlNet, named as A1111 lists it
    ("name [hash]"): the engine's image for the same unit, its infotext unit included."""
    seven = pipe("a handwritten 7", seed=2, **ENGINE).images[0].convert("RGB")
    unit = webuiapi.ControlNetUnit(
        image=seven,
        module="canny",
        model="mnist_canny [0123abcd]",
        weight=0.8,
        resize_mode="Just Resize",
        guidance_end=0.9,
    )
    r = api.txt2img(prompt="", seed=5, controlnet_units=[unit], **SMALL)
    control = noisecraft.Control(
        "mnist_canny", seven, weight=0.8, end=0.9, preprocess="canny", resize="resize"
    )
    want = pipe("", seed=5, control=[control], **ENGINE)
    assert same(r.image, want.images[0])
    assert r.info["infotexts"] == want.infotexts and "ControlNet 0: " in want.infotexts[0]
    with pytest.raises(RuntimeError, match="My prompt is more important"):
        api.txt2img(
            prompt="",
            controlnet_units=[
                webuiapi.ControlNetUnit(image=seven, model="mnist_canny", control_mode=1)
            ],
            **SMALL,
        )
