"""The web page in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``) driven by selenium against the server on loopback with the shipped mini
SD. What a user does: fill the form, generate, see the images and their parameters, reuse
them, draw a mask and inpaint, interrupt a long run, read a refusal's message.

Screenshots go to the test's tmp_path (the generation one also to docs/server/page.png, the
README's picture, when the test runs from a checkout).
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
DOCS_PICTURE = Path(__file__).resolve().parents[1] / "docs" / "server" / "page.png"
#: Flags that keep Chromium from reaching out (a closed network refuses it otherwise).
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1200,1000",
)
#: The run that is interrupted: 4 images of 128x128 for 1000 steps (the model's training
#: timesteps, the most it takes) sample for minutes, so only the interrupt ends it within
#: the test's wait.
LONG_RUN = {"steps": 1000, "width": 128, "height": 128, "batch_size": 4}
WAIT = 60  # seconds a step may take before the test fails (a wait, not a timing assertion)

pytestmark = pytest.mark.skipif(
    not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
    reason="no headless browser: install Debian's chromium and chromium-driver",
)
selenium = pytest.importorskip("selenium", reason="selenium is not installed")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from noisecraft.server.config import ServerConfig
    from noisecraft.server.testing import serve_in_thread

    outputs = tmp_path_factory.mktemp("outputs")
    config = ServerConfig(model="mnist-text", outputs_dir=outputs, max_steps=LONG_RUN["steps"])
    with serve_in_thread(config) as url:
        yield url.rstrip("/")


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="noisecraft-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
    driver = webdriver.Chrome(service=service, options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def page(server, browser):
    """The page freshly loaded, its pickers filled, every POST it makes recorded."""
    browser.get(server + "/")
    wait_for(
        browser, lambda d: d.execute_script("return document.getElementById('sampler').length")
    )
    browser.execute_script(
        """window.posts = [];
        const f = window.fetch;
        window.fetch = (url, init) => {
          if (init && init.method === 'POST') {
            window.posts.push({url: String(url), body: init.body});
          }
          return f(url, init);
        };"""
    )
    return browser


def wait_for(driver, condition, timeout=WAIT):
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)


def by_id(driver, name):
    return driver.find_element(By.ID, name)


def fill(driver, name, value):
    element = by_id(driver, name)
    element.clear()
    element.send_keys(str(value))


def results(driver):
    return driver.find_elements(By.CSS_SELECTOR, "#gallery .result")


def generate(driver, count_before):
    by_id(driver, "generate").click()
    wait_for(driver, lambda d: len(results(d)) > count_before or by_id(d, "error").is_displayed())
    wait_for(driver, lambda d: by_id(d, "generate").is_enabled())


def post_json(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=WAIT) as answer:
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as refused:
        return refused.code, json.load(refused)


def png_of(img_element) -> Image.Image:
    src = img_element.get_attribute("src")
    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))


def last_post(driver, endpoint):
    posts = [p for p in driver.execute_script("return window.posts") if endpoint in p["url"]]
    return json.loads(posts[-1]["body"])


def test_generate_see_parameters_and_reuse(page, tmp_path):
    d = page
    fill(d, "prompt", "a handwritten 7")
    Select(by_id(d, "lora")).select_by_value("mnist_tiny")
    assert by_id(d, "prompt").get_attribute("value") == "a handwritten 7 <lora:mnist_tiny:1>"
    Select(by_id(d, "embedding")).select_by_index(1)
    prompt_with_embedding = by_id(d, "prompt").get_attribute("value")
    assert prompt_with_embedding.startswith("a handwritten 7 <lora:mnist_tiny:1> ")
    fill(d, "prompt", "a handwritten 7 <lora:mnist_tiny:1>")
    fill(d, "negative_prompt", "a thin 7")
    Select(by_id(d, "sampler")).select_by_visible_text("Euler a")
    fill(d, "steps", 8)
    fill(d, "cfg_scale", 5)
    fill(d, "seed", 1234)
    fill(d, "batch_size", 2)
    generate(d, 0)
    assert not by_id(d, "error").is_displayed(), by_id(d, "error").text
    shown = results(d)
    assert len(shown) == 2
    for figure in shown:
        assert png_of(figure.find_element(By.TAG_NAME, "img")).size == (32, 32)
    # the gallery puts the newest first: the batch's second image (seed 1235) leads
    text = shown[0].find_element(By.CLASS_NAME, "infotext").text
    assert text.startswith("a handwritten 7 <lora:mnist_tiny:1>\nNegative prompt: a thin 7\n")
    for field in ("Steps: 8", "Sampler: Euler a", "CFG scale: 5.0", "Seed: 1235", "Size: 32x32"):
        assert field in text
    assert "Seed: 1234" in shown[1].find_element(By.CLASS_NAME, "infotext").text
    d.save_screenshot(str(tmp_path / "generated.png"))
    if DOCS_PICTURE.parent.parent.is_dir():
        DOCS_PICTURE.parent.mkdir(exist_ok=True)
        shutil.copy(tmp_path / "generated.png", DOCS_PICTURE)

    # change everything, then reuse the first image's parameters: the form is as it was
    fill(d, "prompt", "something else")
    fill(d, "negative_prompt", "")
    Select(by_id(d, "sampler")).select_by_visible_text("DPM++ 2M")
    for name, value in (("steps", 3), ("cfg_scale", 1), ("seed", -1), ("width", 64)):
        fill(d, name, value)
    shown[1].find_element(By.CLASS_NAME, "reuse").click()
    value = lambda name: by_id(d, name).get_attribute("value")  # noqa: E731
    assert value("prompt") == "a handwritten 7 <lora:mnist_tiny:1>"
    assert value("negative_prompt") == "a thin 7"
    assert value("sampler") == "Euler a"
    assert (value("steps"), value("seed"), value("width"), value("height")) == (
        "8",
        "1234",
        "32",
        "32",
    )
    assert float(value("cfg_scale")) == 5.0
    # and generating again with them makes the same image
    fill(d, "batch_size", 1)
    generate(d, 2)
    again = results(d)[0]
    assert (
        again.find_element(By.CLASS_NAME, "infotext").text
        == shown[1].find_element(By.CLASS_NAME, "infotext").text
    )
    assert (
        png_of(again.find_element(By.TAG_NAME, "img")).tobytes()
        == png_of(shown[1].find_element(By.TAG_NAME, "img")).tobytes()
    )


def test_draw_a_mask_and_inpaint(page, tmp_path):
    d = page
    fill(d, "prompt", "a handwritten 3")
    fill(d, "steps", 10)
    fill(d, "seed", 7)
    generate(d, len(results(d)))
    source = results(d)[0]
    source.find_element(By.CLASS_NAME, "to-source").click()
    wait_for(d, lambda d: by_id(d, "canvas-box").is_displayed())
    fill(d, "brush", 6)
    canvas = by_id(d, "mask-canvas")  # 32x32 pixels shown at 256x256: 8 screen px each
    # a stroke along row 16 from column 4 to column 14 (screen offsets from the centre)
    ActionChains(d).move_to_element_with_offset(canvas, -96, 0).click_and_hold().move_by_offset(
        40, 0
    ).move_by_offset(40, 0).release().perform()
    fill(d, "strength", 0.9)
    fill(d, "mask_blur", 0)
    generate(d, len(results(d)))
    assert not by_id(d, "error").is_displayed(), by_id(d, "error").text
    d.save_screenshot(str(tmp_path / "inpainted.png"))
    sent = last_post(d, "img2img")
    assert sent["denoising_strength"] == 0.9 and sent["mask_blur"] == 0
    assert Image.open(io.BytesIO(base64.b64decode(sent["init_images"][0]))).size == (32, 32)
    mask = Image.open(io.BytesIO(base64.b64decode(sent["mask"]))).convert("L")
    assert mask.size == (32, 32)
    # white (repaint) along the stroke, black far from it
    assert all(mask.getpixel((x, y)) == 255 for x in (5, 9, 13) for y in (15, 16))
    assert all(mask.getpixel(p) == 0 for p in ((9, 4), (9, 24), (20, 16), (28, 16)))
    text = results(d)[0].find_element(By.CLASS_NAME, "infotext").text
    assert "Denoising strength: 0.9" in text and "Seed: 7" in text
    # the picture changed under the stroke, and kept (up to the VAE's round trip) far from it
    # (measured: 9.1 / 255 on average over rows 14-17, 0.5 and 1.0 over the top and bottom six)
    before, after = (
        np.asarray(png_of(f.find_element(By.TAG_NAME, "img")).convert("L"), dtype=float)
        for f in results(d)[1::-1]
    )
    change = np.abs(after - before)
    assert change[14:18, 4:14].mean() > 3 * max(change[:6].mean(), change[26:].mean())


def test_interrupt_a_long_run(page, tmp_path):
    d = page
    fill(d, "prompt", "a handwritten 1")
    for name, value in LONG_RUN.items():
        fill(d, name, value)
    by_id(d, "generate").click()
    # the progress bar moves and the preview shows while sampling
    wait_for(d, lambda d: by_id(d, "progress-text").text.startswith("step "))
    wait_for(d, lambda d: by_id(d, "preview").is_displayed())
    d.save_screenshot(str(tmp_path / "sampling.png"))
    running = by_id(d, "progress-text").text
    assert running.endswith(f"of {LONG_RUN['steps']}"), running
    assert 0 < float(by_id(d, "progress").get_attribute("value")) < 1
    by_id(d, "interrupt").click()
    # without the interrupt the run would take minutes, longer than this wait
    wait_for(d, lambda d: by_id(d, "generate").is_enabled())
    assert by_id(d, "progress-text").text.startswith("interrupted: ")
    assert any("interrupt" in p["url"] for p in d.execute_script("return window.posts"))
    assert not by_id(d, "error").is_displayed(), by_id(d, "error").text


def test_model_picker_switches_the_model(page, server):
    d = page

    def embeddings():
        options = Select(by_id(d, "embedding")).options
        return [o.get_attribute("value") for o in options if o.get_attribute("value")]

    assert Select(by_id(d, "model")).first_selected_option.get_attribute("value") == "mnist-text"
    assert embeddings() == ["unlucky"]
    try:
        Select(by_id(d, "model")).select_by_value("mnist")  # the class model: no text encoder
        wait_for(d, lambda d: embeddings() == [])
        assert last_post(d, "options") == {"sd_model_checkpoint": "mnist"}
        with urllib.request.urlopen(server + "/sdapi/v1/options", timeout=WAIT) as answer:
            assert json.load(answer)["sd_model_checkpoint"] == "mnist"
    finally:
        Select(by_id(d, "model")).select_by_value("mnist-text")
        wait_for(d, lambda d: embeddings() == ["unlucky"])
    assert not by_id(d, "error").is_displayed(), by_id(d, "error").text


def test_refusal_shows_the_servers_message(page, server, tmp_path):
    d = page
    fill(d, "prompt", "a handwritten 2")
    fill(d, "steps", 100000)
    by_id(d, "generate").click()
    wait_for(d, lambda d: by_id(d, "error").is_displayed())
    d.save_screenshot(str(tmp_path / "refused.png"))
    shown = by_id(d, "error").text
    sent = last_post(d, "txt2img")
    status, answer = post_json(server + "/sdapi/v1/txt2img", sent)
    assert status in (413, 422)
    detail = answer["detail"]
    message = detail if isinstance(detail, str) else detail[0]["msg"]
    assert f"({status})" in shown and message in shown
    assert by_id(d, "generate").is_enabled()
