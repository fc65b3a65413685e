"""The HTTP server (noisecraft.server) through FastAPI's TestClient: A1111 shapes, the
engine's images, errors (422 / 413 / 429 / 401), names-not-paths, CORS off, the web page.

Images are compared pixel for pixel with what ``noisecraft.load("mnist-text")`` makes with
the same settings (the server is a shell over that API)."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

import noisecraft  # noqa: E402
from noisecraft.server import ServerConfig, create_app  # noqa: E402

FAST = {"steps": 3, "sampler_name": "Euler a", "width": 32, "height": 32}


@pytest.fixture(scope="module")
def pipe():
    return noisecraft.load("mnist-text")


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    return tmp_path_factory.mktemp("outputs")


@pytest.fixture(scope="module")
def client(outputs):
    with TestClient(create_app(ServerConfig(outputs_dir=outputs, queue_size=2))) as c:
        yield c


def png(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text)))


def pixels(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("RGB"))


def test_txt2img_is_the_engine_image_and_is_saved(client, pipe, outputs):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a 7", "seed": 11, **FAST})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"images", "parameters", "info"}
    info = json.loads(body["info"])
    want = pipe("a 7", seed=11, steps=3, sampler="Euler a", width=32, height=32)
    got = png(body["images"][0])
    assert np.array_equal(pixels(got), pixels(want.images[0]))
    assert info["infotexts"] == want.infotexts
    assert got.info["parameters"] == want.infotexts[0]  # the PNG carries its parameters
    assert (info["seed"], info["all_seeds"], info["sampler_name"]) == (11, [11], "Euler a")
    assert body["parameters"]["prompt"] == "a 7"
    saved = outputs / info["files"][0]
    assert saved.read_bytes() == base64.b64decode(body["images"][0])


def test_batches_and_iterations_number_seeds_as_a1111(client, pipe):
    r = client.post(
        "/sdapi/v1/txt2img",
        json={"prompt": "a 3", "seed": 5, "batch_size": 2, "n_iter": 2, **FAST},
    )
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["all_seeds"] == [5, 6, 7, 8]
    want = pipe("a 3", seed=5, n=4, steps=3, sampler="Euler a", width=32, height=32)
    for got, im in zip(r.json()["images"], want.images, strict=True):
        assert np.array_equal(pixels(png(got)), pixels(im))


def test_static_page_is_served_after_the_api(client):
    r = client.get("/")
    assert r.status_code == 200 and "<html" in r.text.lower()
    assert client.get("/sdapi/v1/samplers").status_code == 200
    assert client.get("/openapi.json").json()["paths"]["/sdapi/v1/txt2img"]["post"]


def test_serve_in_thread_serves_and_shuts_down(tmp_path):
    import urllib.error
    import urllib.request

    from noisecraft.server.testing import serve_in_thread

    with serve_in_thread(ServerConfig(outputs_dir=tmp_path)) as url:
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(url + "/sdapi/v1/options", timeout=10) as r:
            assert json.load(r)["sd_model_checkpoint"] == "mnist-text"
    with pytest.raises(urllib.error.URLError):  # the port is closed
        urllib.request.urlopen(url + "/sdapi/v1/options", timeout=2)
