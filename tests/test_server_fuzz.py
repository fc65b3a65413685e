"""Fuzzing the HTTP API from its own OpenAPI schema (``/openapi.json``) with schemathesis:
for every operation, schema-valid requests (positive) and schema-breaking ones (negative),
sent to the real server on loopback. No answer may be a 5xx, and none may take longer than
the per-request timeout (a hang fails as a timeout).

The server runs with low limits (a few steps, small images) so that the generation
endpoints answer quickly; what is refused must be refused with a 4xx. A larger run is
slow-marked.
"""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

#: Seconds one request may take before it counts as a hang (a generation here takes well
#: under one second; a busy 2-core machine stretches that).
TIMEOUT = 20.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from noisecraft.server.config import ServerConfig
    from noisecraft.server.testing import serve_in_thread

    config = ServerConfig(
        model="mnist-text",
        outputs_dir=tmp_path_factory.mktemp("outputs"),
        max_steps=3,
        max_images=2,
        max_pixels=64 * 64,
        max_body_bytes=2**20,
        max_image_bytes=2**18,
        queue_size=2,
    )
    with serve_in_thread(config) as url:
        yield url


def _png_base64(width: int, height: int, value: int) -> str:
    buffer = io.BytesIO()
    Image.new("L", (width, height), value).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _with_picture(case, picture: str, mask: str):
    """An img2img case whose ``init_images`` is a real PNG; every other one also a mask."""
    if isinstance(case.body, dict):
        case.body = {**case.body, "init_images": [picture]}
        if len(str(case.body)) % 2:  # with the inpainting fields the engine takes
            case.body.update(mask=mask, inpainting_fill=1, inpaint_full_res=False)
    return case


def fuzz(base_url: str, examples: int) -> list[str]:
    """Send ``examples`` positive and negative cases per operation (and for img2img, positive
    ones with a real picture); the failures, one line each (operation, status or exception,
    and the request that caused it)."""
    schema = schemathesis.openapi.from_url(base_url + "/openapi.json")
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10  # the A1111 endpoints are in the schema
    picture = _png_base64(32, 32, 0)
    mask = _png_base64(32, 32, 255)
    for operation in operations:
        strategies = {
            mode.value: operation.as_strategy(generation_mode=mode)
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
        }
        if operation.path == "/sdapi/v1/img2img":  # random strings are never a picture:
            strategies["positive, a real picture"] = strategies["positive"].map(  # give one
                lambda case, p=picture, m=mask: _with_picture(case, p, m)
            )
        for mode, strategy in strategies.items():

            @given(case=strategy)
            @settings(
                max_examples=examples,
                deadline=None,
                database=None,
                derandomize=True,  # the same cases every run: a failure repeats
                phases=[Phase.explicit, Phase.generate],  # no shrinking: each try is a request
                suppress_health_check=list(HealthCheck),
            )
            def send(case):
                try:
                    response = case.call(base_url=base_url, timeout=TIMEOUT)
                except Exception as exc:  # a timeout (hang) or a dropped connection
                    raise AssertionError(f"{type(exc).__name__}: {exc}") from exc
                assert response.status_code < 500, (
                    f"{response.status_code} {response.text[:300]!r} for body {case.body!r:.300}"
                )

            try:
                send()
            except Unsatisfiable:  # nothing to break: an operation without parameters
                continue
            except AssertionError as failure:
                failures.append(f"{operation.label} ({mode}): {failure}")
    return failures


def test_no_server_errors_and_no_hangs(server):
    failures = fuzz(server, examples=6)
    assert not failures, "\n".join(failures)


@pytest.mark.slow
def test_no_server_errors_and_no_hangs_longer(server):
    failures = fuzz(server, examples=100)
    assert not failures, "\n".join(failures)


#: Found by the 100-example run: an ``alwayson_scripts`` entry that is a number (or whose
#: ``args`` is one) is iterated by noisecraft.server.a1111 (``_check_scripts``,
#: ``controlnet_units``) and raises TypeError: a 500 instead of a 422.
SCRIPT_BODIES = (
    {"alwayson_scripts": {"foo": 3.2}},
    {"alwayson_scripts": {"controlnet": 3.2}},
    {"alwayson_scripts": {"foo": {"args": 5}}},
)


@pytest.mark.parametrize("body", SCRIPT_BODIES)
def test_alwayson_scripts_that_are_numbers_are_refused_not_500(server, body):
    import requests

    answer = requests.post(server + "/sdapi/v1/txt2img", json=body, timeout=TIMEOUT)
    assert 400 <= answer.status_code < 500, answer.text[:300]
