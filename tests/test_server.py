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


def _png_b64(size: tuple[int, int] = (32, 32)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, "black").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


#: a black 32x32 control image, base64 PNG
PNG = _png_b64()


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


# ---------------------------------------------------------------------------- errors


def detail(r) -> str:
    body = r.json()
    assert "\n" not in body["detail"]
    return body["detail"]


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        ({"sampler_name": "Eular a"}, "did you mean"),
        ({"enable_hr": True}, "enable_hr"),
        ({"tiling": True}, "tiling"),
        ({"subseed_strength": 0.5}, "subseed_strength"),
        ({"steps": 151}, "steps = 151"),
        ({"batch_size": 4, "n_iter": 5}, "20 images"),
        ({"width": 4096, "height": 4096}, "max_pixels"),
        ({"width": 33}, "width"),
        ({"cfg_scale": float("nan")}, "cfg"),
        ({"override_settings": {"sd_vae": "x"}}, "sd_vae"),
        ({"alwayson_scripts": {"controlnet": {"args": [{"module": "canny"}]}}}, "image"),
        (
            {"alwayson_scripts": {"controlnet": {"args": [{"image": PNG, "model": "../x"}]}}},
            "names, not paths",
        ),
        (
            {"alwayson_scripts": {"controlnet": {"args": [{"image": PNG, "module": "hed"}]}}},
            "module",
        ),
        ({"alwayson_scripts": {"ADetailer": {"args": [True, {}]}}}, "ADetailer"),
        ({"prompt": "a 7 <lora:../mnist_tiny>"}, "LoRA"),
        ({"prompt": "a 7 <lora:/etc/passwd>"}, "LoRA"),
    ],
)
def test_mistakes_are_422_with_one_line(client, payload, words):
    body = json.dumps({**FAST, **payload})  # NaN too, as Python writes it
    r = client.post("/sdapi/v1/txt2img", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    if words is not None:
        assert words in detail(r)


def test_disabled_controlnet_units_and_empty_scripts_are_accepted(client):
    scripts = {"ControlNet": {"args": []}, "ADetailer": {"args": [False]}}
    r = client.post("/sdapi/v1/txt2img", json={**FAST, "alwayson_scripts": scripts})
    assert r.status_code == 200, r.text


def test_models_are_names_not_paths(client):
    from noisecraft.io.shipped import SHIPPED_MODELS

    for name in ("../mnist-text", "/etc/passwd", str(SHIPPED_MODELS["mnist-text"]), "..", ""):
        r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": name})
        assert r.status_code == 422, name
        assert "unknown sd_model_checkpoint" in detail(r)
    r = client.post(
        "/sdapi/v1/txt2img", json={**FAST, "override_settings": {"sd_model_checkpoint": "../x"}}
    )
    assert r.status_code == 422


def test_models_dir_is_listed_by_name_and_refreshed(tmp_path):
    from noisecraft.io.shipped import SHIPPED_MODELS

    models = tmp_path / "models"
    (models / "sub").mkdir(parents=True)
    (models / "mine.safetensors").symlink_to(SHIPPED_MODELS["mnist"])
    config = ServerConfig(models_dir=models, outputs_dir=tmp_path / "out")
    with TestClient(create_app(config)) as c:
        names = {m["model_name"] for m in c.get("/sdapi/v1/sd-models").json()}
        assert names == {"mnist", "mnist-text", "mnist-text-lcm", "mine"}
        (models / "sub" / "other.safetensors").symlink_to(SHIPPED_MODELS["mnist"])
        assert c.post("/sdapi/v1/refresh-checkpoints").status_code == 200
        names = {m["model_name"] for m in c.get("/sdapi/v1/sd-models").json()}
        assert "sub/other" in names
        r = c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "../models/mine"})
        assert r.status_code == 422


def test_body_and_image_limits_are_413(tmp_path):
    config = ServerConfig(outputs_dir=tmp_path, max_body_bytes=2000, max_image_bytes=300)
    with TestClient(create_app(config)) as c:
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "x" * 3000})
        assert r.status_code == 413 and "2,000 bytes" in detail(r)

        def chunks():  # no Content-Length: counted as it arrives
            yield b'{"prompt": "'
            for _ in range(10):
                yield b"x" * 500

        r = c.post("/sdapi/v1/txt2img", content=chunks())
        assert r.request.headers.get("transfer-encoding") == "chunked"
        assert r.status_code == 413 and "2,000 bytes" in detail(r)
        big = base64.b64encode(bytes(600)).decode()
        r = c.post("/sdapi/v1/png-info", json={"image": big})
        assert r.status_code == 413 and "300 bytes" in detail(r)
        r = c.post("/sdapi/v1/png-info", json={"image": "not base64!"})
        assert r.status_code == 422


def test_an_image_is_decoded_as_png_jpeg_webp_only(client):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="BMP")
    r = client.post("/sdapi/v1/png-info", json={"image": base64.b64encode(buf.getvalue()).decode()})
    assert r.status_code == 422 and "PNG, JPEG or WebP" in detail(r)


def test_a_full_queue_answers_429_with_retry_after(tmp_path):
    import threading

    app = create_app(ServerConfig(outputs_dir=tmp_path, queue_size=1))
    jobs = app.state.noisecraft.jobs
    release = threading.Event()
    with TestClient(app) as c:
        running = jobs.submit("block", lambda job: release.wait(30))
        while jobs.current is None:  # the worker took it; one more fills the queue
            release.wait(0.01)
        waiting = jobs.submit("wait", lambda job: None)
        try:
            r = c.post("/sdapi/v1/txt2img", json=FAST)
            assert r.status_code == 429
            assert int(r.headers["Retry-After"]) >= 1
            assert "busy" in detail(r)
        finally:
            release.set()
        assert running.future.result(30) is True
        waiting.future.result(30)


def test_auth_basic_and_bearer(tmp_path):
    config = ServerConfig(outputs_dir=tmp_path, api_auth="ann:pw1,bob:pw2", api_token="tok")
    with TestClient(create_app(config)) as c:
        for path in ("/sdapi/v1/options", "/", "/docs", "/openapi.json"):
            r = c.get(path)
            assert r.status_code == 401, path
            assert r.headers["WWW-Authenticate"].startswith("Basic")
        assert c.get("/sdapi/v1/options", auth=("ann", "pw1")).status_code == 200
        assert c.get("/sdapi/v1/options", auth=("bob", "pw2")).status_code == 200
        assert c.get("/sdapi/v1/options", auth=("ann", "pw2")).status_code == 401
        ok = c.get("/sdapi/v1/options", headers={"Authorization": "Bearer tok"})
        assert ok.status_code == 200
        bad = c.get("/sdapi/v1/options", headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401


def test_cors_is_off_unless_origins_are_given(client, tmp_path):
    origin = {"Origin": "http://evil.example"}
    r = client.get("/sdapi/v1/options", headers=origin)
    assert "access-control-allow-origin" not in r.headers
    pre = {**origin, "Access-Control-Request-Method": "POST"}
    r = client.options("/sdapi/v1/txt2img", headers=pre)
    assert "access-control-allow-origin" not in r.headers
    config = ServerConfig(outputs_dir=tmp_path, cors_allow_origins=("http://ok.example",))
    with TestClient(create_app(config)) as c:
        r = c.get("/sdapi/v1/options", headers={"Origin": "http://ok.example"})
        assert r.headers["access-control-allow-origin"] == "http://ok.example"
        r = c.get("/sdapi/v1/options", headers=origin)
        assert "access-control-allow-origin" not in r.headers


def test_config_mistakes_are_one_line_errors(tmp_path):
    from noisecraft.errors import ConfigError, NoisecraftError

    with pytest.raises(ConfigError, match="user:password"):
        ServerConfig(api_auth="nopassword")
    with pytest.raises(ConfigError, match="queue_size"):
        ServerConfig(queue_size=0)
    with pytest.raises(ConfigError, match="not a folder"):
        ServerConfig(models_dir=tmp_path / "missing")
    with pytest.raises(NoisecraftError, match="unknown model"):
        create_app(ServerConfig(model="../mnist-text"))


# ---------------------------------------------------------------------------- listings


def test_listings_have_a1111_shapes(client):
    samplers = client.get("/sdapi/v1/samplers").json()
    euler_a = next(s for s in samplers if s["name"] == "Euler a")
    assert "k_euler_a" in euler_a["aliases"]
    labels = {s["label"] for s in client.get("/sdapi/v1/schedulers").json()}
    assert {"Automatic", "Karras", "Exponential"} <= labels
    models = client.get("/sdapi/v1/sd-models").json()
    assert {"title", "model_name", "hash", "sha256", "filename", "config"} <= set(models[0])
    loras = client.get("/sdapi/v1/loras").json()
    assert {"name": "mnist_tiny", "alias": "mnist_tiny"}.items() <= loras[0].items()
    assert "/" not in loras[0]["path"]  # no server paths
    embeddings = client.get("/sdapi/v1/embeddings").json()
    assert set(embeddings) == {"loaded", "skipped"}
    assert "unlucky" in embeddings["loaded"]
    assert client.get("/sdapi/v1/scripts").json() == {"txt2img": [], "img2img": []}
    idle = client.get("/sdapi/v1/progress").json()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0
    assert client.post("/sdapi/v1/interrupt").json() == {}
    assert client.post("/sdapi/v1/skip").json() == {}


def test_clip_skip_option_reaches_the_engine(client, pipe):
    assert client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2}).json()
    try:
        assert client.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 2
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "a 1", "seed": 2, **FAST})
    finally:
        client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 1})
    want = pipe("a 1", seed=2, clip_skip=2, steps=3, sampler="Euler a", width=32, height=32)
    assert json.loads(r.json()["info"])["infotexts"] == want.infotexts
    assert "Clip skip: 2" in want.infotexts[0]
    assert np.array_equal(pixels(png(r.json()["images"][0])), pixels(want.images[0]))


def test_png_info_reads_the_parameters(client):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a 4", "seed": 9, **FAST})
    image = r.json()["images"][0]
    info = client.post("/sdapi/v1/png-info", json={"image": "data:image/png;base64," + image})
    body = info.json()
    assert body["info"] == json.loads(r.json()["info"])["infotexts"][0]
    assert body["parameters"]["seed"] == 9 and body["parameters"]["prompt"] == "a 4"


def test_serve_command_refuses_mistakes_before_it_listens(capsys):
    from noisecraft.cli.main import main

    assert main(["serve", "--api-auth", "nopassword"]) == 2
    assert "--api-auth must be user:password" in capsys.readouterr().err
    assert main(["serve", "--model", "../mnist-text"]) == 2
    assert "unknown --model '../mnist-text'" in capsys.readouterr().err
    assert main(["serve", "--listen", "--host", "10.0.0.1"]) == 2


def test_a_model_switch_waits_for_the_jobs_before_it(tmp_path):
    import threading

    app = create_app(ServerConfig(outputs_dir=tmp_path))
    s = app.state.noisecraft
    release = threading.Event()
    with TestClient(app) as c:
        running = s.jobs.submit("before", lambda job: release.wait(30) and s.host.use().name)
        while s.jobs.current is None:
            release.wait(0.01)
        answer = {}
        switch = threading.Thread(
            target=lambda: answer.update(
                r=c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "mnist-text-lcm"})
            )
        )
        switch.start()
        while s.jobs.waiting == 0:  # the switch is queued behind the running job
            release.wait(0.01)
        assert s.host.current_name == "mnist-text"
        release.set()
        switch.join(60)
        assert running.future.result(30) == "mnist-text"  # it ran on its own model
        assert answer["r"].status_code == 200
        assert c.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "mnist-text-lcm"
        assert s.host.pipe.name == "mnist-text-lcm"


def test_mask_blur_is_a1111s_separable_gaussian():
    from noisecraft.server.images import blur_mask

    impulse = np.zeros((21, 21), np.uint8)
    impulse[10, 10] = 255
    out = np.asarray(blur_mask(Image.fromarray(impulse), 2, 3), dtype=float)
    # closed form: 255 * g_x(dx) * g_y(dy), kernels 2 * int(2.5 sigma + 0.5) + 1 wide
    gx, gy = np.exp(-(np.arange(-5, 6) ** 2) / 8), np.exp(-(np.arange(-8, 9) ** 2) / 18)
    want = np.zeros((21, 21))
    want[2:19, 5:16] = 255 * np.outer(gy / gy.sum(), gx / gx.sum())
    assert np.array_equal(out, np.rint(want))
    assert np.array_equal(np.asarray(blur_mask(Image.fromarray(impulse), 0, 0)), impulse)


def test_a_scheduler_alone_applies_to_the_engines_default_sampler(client, pipe):
    r = client.post(
        "/sdapi/v1/txt2img",
        json={"prompt": "a 2", "seed": 3, "steps": 3, "scheduler": "Exponential", "eta": 0.5},
    )
    want = pipe("a 2", seed=3, steps=3, schedule="exponential")
    assert json.loads(r.json()["info"])["infotexts"] == want.infotexts
    assert "Sampler: DPM++ 2M, Schedule type: Exponential" in want.infotexts[0]
    assert np.array_equal(pixels(png(r.json()["images"][0])), pixels(want.images[0]))
