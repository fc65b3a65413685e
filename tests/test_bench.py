"""The bench scripts' own logic, on small models: bench/sd_speed.py's rows (the exact ones are
a parity check of ours against diffusers / transformers on the same weights; the fast ones
measure fast mode's error), its float16 path (the dtype a ``--device cuda`` run uses, run
here on the CPU), its refusal of a missing GPU, and bench/sdcpp.py's reading of
stable-diffusion.cpp's log. Timings are printed by the scripts, never asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

import sdcpp  # noqa: E402


def _sd_speed(*args: str) -> dict:
    argv = [sys.executable, str(BENCH / "sd_speed.py"), "--tiny", "--threads", "1", "--json"]
    result = subprocess.run([*argv, *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_sd_speed_exact_rows_match_diffusers_and_fast_rows_stay_close():
    out = _sd_speed(
        *("--only", "unet,vae,text,fast,controlnet", "--sizes", "64", "--pipeline-sizes", "64"),
        *("--repeats", "1", "--pipeline-repeats", "1", "--steps", "4"),
    )
    rows = {r["case"]: r for r in out["rows"]}
    exact = [c for c in rows if c in ("U-Net 64² batch 1", "U-Net 64² batch 2")]
    exact += [c for c in rows if c.startswith(("VAE decode", "text encoder", "U-Net + ControlNet"))]
    assert len(exact) == 5, list(rows)
    for case in exact:  # same weights, same function: float rounding only
        assert rows[case]["rel_diff"] <= 1e-4, (case, rows[case]["rel_diff"])
    fast = [c for c in rows if "int8" in c and c.startswith("U-Net")]
    assert len(fast) == 2, list(rows)
    for case in fast:  # int8 Linear error (the shallow call reproduces its full call)
        assert 1e-6 < rows[case]["rel_diff"] <= 0.05, (case, rows[case]["rel_diff"])
    gen = [r for c, r in rows.items() if c.startswith("generation 64²: ours FAST")]
    assert len(gen) == 1 and gen[0]["max_diff"] is None
    for r in out["rows"]:
        assert r["ours_s"] > 0 and r["theirs_s"] > 0 and r["ratio"] > 0
    assert out["env"]["dtype"] == "float32"


def test_sd_speed_lcm_and_observe_rows():
    """The ``lcm`` section: 4 LCM steps at CFG 1 and the DPM++ 2M CFG generation, each the
    same image as diffusers' (LCMScheduler / DPMSolverMultistepScheduler) on shared weights.
    The ``observe`` section: the observer on leaves the image bit-identical; off, ours is
    still diffusers' image."""
    out = _sd_speed(
        *("--only", "lcm,observe", "--pipeline-sizes", "64", "--pipeline-repeats", "1"),
        *("--steps", "3"),
    )
    cases = [r["case"] for r in out["rows"]]
    head = "generation 64², 3 dpmpp_2m steps: "
    assert cases == [
        "generation 64², 4 lcm steps, CFG 1 + decode",
        "generation 64², 3 dpmpp_2m steps, CFG 7.5 + decode",
        head + "observer off vs off (A/A)",
        head + "observer off vs diffusers",
        head + "attention maps on vs off",
        head + "latents every 5 on vs off",
    ]
    for r in out["rows"]:
        assert r["rel_diff"] <= 1e-4, (r["case"], r["rel_diff"])
        if "vs off" in r["case"]:
            assert r["max_diff"] == 0, r["case"]


def test_sd_speed_float16_path_runs_on_cpu():
    """``--dtype fp16``: the weights and inputs a CUDA run uses, on both sides."""
    out = _sd_speed("--only", "unet,text", "--sizes", "64", "--repeats", "1", "--dtype", "fp16")
    assert out["env"]["dtype"] == "float16"
    assert len(out["rows"]) == 3
    for r in out["rows"]:
        assert r["rel_diff"] <= 1e-2, (r["case"], r["rel_diff"])


def test_sd_speed_refuses_cuda_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    argv = [sys.executable, str(BENCH / "sd_speed.py"), "--device", "cuda"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "torch sees no CUDA device" in result.stderr.strip().splitlines()[-1]


def test_scheduler_driven_loop_gives_our_generations_image():
    """``bench/_sd15_loop.py`` (how bench/openvino.py drives OpenVINO's converted parts with
    diffusers' DPM++ 2M scheduler), run here with our own modules, gives the image of our
    ``generate`` with SD 1.5's scheduler config (which is diffusers' pipeline's image,
    tests/test_bench.py's sd_speed rows): same initial latents, CFG batch order and
    arithmetic, timesteps, decode."""
    import argparse

    import _sd15
    import _sd15_loop
    import torch
    from diffusers import DPMSolverMultistepScheduler
    from sd_speed import PROMPT, _our_generation

    from noisecraft.pipelines.diffusers_schedulers import SD15_SCHEDULER_CONFIG

    parts = _sd15.build_ours(True)
    model = _sd15.latent_diffusion(parts["unet"], parts["vae"], parts["text"])
    with torch.no_grad():
        args = argparse.Namespace(seed=5)
        expected = _our_generation(model, args, 64, sampler="dpmpp_2m", steps=3)
        image = _sd15_loop.generate_with_scheduler(
            lambda ids: model.text_encoder(ids).last_hidden_state,
            lambda x, t, c: model.unet(x, t, context=c),
            model.vae.decode,
            tokenize=model.tokenizer,
            scheduler=DPMSolverMultistepScheduler.from_config(dict(SD15_SCHEDULER_CONFIG)),
            scaling_factor=model.vae.config.scaling_factor,
            prompt=PROMPT,
            size=64,
            steps=3,
            seed=5,
        )
    assert image.shape == expected.shape == (1, 3, 64, 64)
    assert expected.std() > 0.01  # not a constant image
    assert (image - expected).abs().max() <= 1e-5


# Lines of a real ``sd-cli -v`` log (stable-diffusion.cpp from stable-diffusion-cpp-python
# 0.4.7, SD 1.5 random weights, 256x256, 2 Euler steps), cut to the lines the bench reads
# and a neighbour that must not be mistaken for them.
SDCPP_LOG = """\
[DEBUG] conditioner.hpp:541  - computing condition graph completed, taking 110 ms
[INFO ] stable-diffusion.cpp:3168 - get_learned_condition completed, taking 0.22s
  |=========================>                        | 1/2 - 4.29s/it
[INFO ] stable-diffusion.cpp:3432 - sampling completed, taking 8.54s
[INFO ] stable-diffusion.cpp:3450 - generating 1 latent images completed, taking 8.72s
[DEBUG] vae.hpp:207  - computing vae decode graph completed, taking 8.69s
[INFO ] stable-diffusion.cpp:3212 - decode_first_stage completed, taking 8690 ms
"""


def test_sdcpp_log_phases():
    phases = sdcpp.parse_sdcpp_log(SDCPP_LOG, steps=2)
    assert phases == pytest.approx({"text": 0.22, "step": 4.27, "decode": 8.69})


def test_sdcpp_log_without_timings_is_one_line_error():
    with pytest.raises(SystemExit, match="no 'sampling completed' timing"):
        sdcpp.parse_sdcpp_log(SDCPP_LOG.replace("sampling completed", "x"), steps=2)


def test_sdcpp_needs_the_binary(tmp_path):
    result = subprocess.run(
        [sys.executable, str(BENCH / "sdcpp.py"), "--sd-cli", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "--build DIR" in result.stderr


def test_sdcpp_run_process_reports_the_childs_own_peak():
    """A child's peak RSS from ``os.wait4``: a child that touches 300 MB reports about that
    much more than one that does not. Run from a small parent (a fresh interpreter that
    imports only bench/sdcpp.py's standard-library modules), as the bench runs: Linux starts a
    child's peak at its parent's RSS at the fork, and this test process holds torch."""
    touch = "b = bytearray(300_000_000); b[::4096] = bytes(len(b[::4096]))"
    code = (
        f"import sys; sys.path.insert(0, {str(BENCH)!r}); import sdcpp\n"
        "small = sdcpp.run_process([sys.executable, '-c', 'pass'])[1]\n"
        f"big = sdcpp.run_process([sys.executable, '-c', {touch!r}])[1]\n"
        "print(small, big)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    small, big = map(int, out.stdout.split())
    assert small < 100e6, small
    assert 250e6 < big - small < 400e6, (small, big)


def test_sdcpp_markdown_ratio():
    rows = [{"case": "c", "ours": 2.0, "theirs": 5.0, "ours_rss": 2e9, "theirs_rss": None}]
    meta = dict(
        command="x", date="d", threads=2, flash=False, type=None, file_dtype="fp32",
        load_before="0", load_after="0", wall_min=1.0,
    )  # fmt: skip
    table = sdcpp.markdown(rows, meta)
    assert "| c | 2.00 | 5.00 | **2.50×** | 2.00 | - |" in table
