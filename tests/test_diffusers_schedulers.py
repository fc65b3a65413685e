"""Same seed, same image as diffusers for every common scheduler (test-only reference).

One tiny random Stable Diffusion (tests/test_latent_pipeline.py: ``tiny_model`` and its
export to diffusers' pipeline components) is built once; for DDIM, Euler, Euler ancestral,
DPM++ 2M (with and without Karras sigmas, and its SDE variant), LMS and UniPC -- each
built as diffusers users do, ``Scheduler.from_config(SD 1.5's scheduler config)`` --
diffusers' ``StableDiffusionPipeline`` / ``StableDiffusionImg2ImgPipeline`` and
``generate(..., scheduler_config=SD15_SCHEDULER_CONFIG)`` make an image from the same prompt,
negative prompt, seed, steps, size and guidance. Observed max difference: 4e-6 (float
rounding); asserted: 1e-4, well inside the 2/255 that the parity promise is about, because
on a random tiny model some of the rules below move the image by less than 2/255.

The same comparison runs on the model READ FROM FILES (fixture ``imported``): diffusers'
pipeline saved as a folder and loaded by noisecraft, and that folder converted to an SD
single file and loaded again.

The grid tests compare each rule with diffusers' own ``set_timesteps`` / ``init_noise_sigma``
over many step counts, without a model.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from noisecraft.diffusion import DiscreteDenoiser, NoiseSchedule
from noisecraft.errors import ConfigError, UnknownNameError
from noisecraft.pipelines import GenerateRequest, generate
from noisecraft.pipelines.diffusers_schedulers import (
    DIFFUSERS_SAMPLERS,
    SD15_SCHEDULER_CONFIG,
    SD15_SCHEDULERS,
    DiffusersSampling,
    for_sampler,
    from_diffusers,
    scheduler_for,
)
from noisecraft.samplers import SAMPLERS
from test_latent_pipeline import H, W, _diffusers_components, _image, _pil, tiny_model

diffusers = pytest.importorskip("diffusers")

SD15 = dict(SD15_SCHEDULER_CONFIG)
PROMPT, NEGATIVE, CFG, STRENGTH = "the cat", "a dog", 7.5, 0.6
# 8 steps: DPM++ / UniPC round np.linspace(0, 999, 9) and 4 * 124.875 = 499.5 goes to the
# even 500; 10 steps with strength 0.6 start img2img at index 4 (LMS's global order)
STEPS = {"txt2img": 8, "img2img": 10}
ATOL = 1e-4
SAMPLER_NAME = {"dpmpp_2m_karras": "DPM++ 2M Karras"}


def _scheduler(cls: str, config) -> object:
    return getattr(diffusers, cls).from_config(dict(config))


# ---------------------------------------------------------------------------- grids


GRID_CASES = [
    *((cls, dict(cfg)) for cls, cfg in SD15_SCHEDULERS.values()),
    ("DDIMScheduler", {**SD15, "timestep_spacing": "linspace"}),
    ("DDIMScheduler", {**SD15, "timestep_spacing": "trailing", "set_alpha_to_one": True}),
    ("EulerDiscreteScheduler", {**SD15, "timestep_spacing": "leading"}),
    ("EulerDiscreteScheduler", {**SD15, "timestep_spacing": "trailing"}),
    ("EulerDiscreteScheduler", {**SD15, "timestep_spacing": "leading", "use_karras_sigmas": True}),
    ("EulerDiscreteScheduler", {**SD15, "use_exponential_sigmas": True}),
    ("EulerAncestralDiscreteScheduler", {**SD15, "timestep_spacing": "leading"}),
    ("LMSDiscreteScheduler", {**SD15, "use_karras_sigmas": True, "timestep_spacing": "trailing"}),
    ("DPMSolverMultistepScheduler", {**SD15, "timestep_spacing": "leading"}),
    ("DPMSolverMultistepScheduler", {**SD15, "timestep_spacing": "trailing"}),
    ("UniPCMultistepScheduler", {**SD15, "use_karras_sigmas": True}),
    ("UniPCMultistepScheduler", {**SD15, "timestep_spacing": "leading", "solver_order": 3}),
]


def _grid_id(case) -> str:
    cls, cfg = case
    extra = {k: v for k, v in cfg.items() if SD15.get(k, "absent") != v}
    return cls.replace("Scheduler", "") + "".join(f"-{k}={v}" for k, v in extra.items())


@pytest.mark.parametrize("case", GRID_CASES, ids=[_grid_id(c) for c in GRID_CASES])
def test_timesteps_sigmas_and_initial_noise_equal_diffusers(case):
    cls, cfg = case
    ref = _scheduler(cls, cfg)
    ours = from_diffusers(cls, ref.config)
    assert ours == from_diffusers(cls, cfg)  # the full config read back gives the same rules
    sch = NoiseSchedule.scaled_linear()
    for steps in (1, 2, 3, 6, 8, 10, 11, 25, 50):
        ref.set_timesteps(steps)
        ts = ours.timesteps(sch, steps)
        # integer grids exactly; fractional ones (Euler linspace, karras) to float32
        torch.testing.assert_close(ts.float(), ref.timesteps.float(), rtol=0, atol=2e-3)
        if ours.quantize:
            assert torch.equal(ts, ts.round())
        sig = ours.sigmas(sch, steps)
        if hasattr(ref, "sigmas"):
            want = ref.sigmas.float()
        else:  # DDIM: the sigmas of alphas_cumprod at its timesteps
            abar = ref.alphas_cumprod.double()[ref.timesteps]
            want = torch.cat([((1 - abar) / abar).sqrt(), torch.zeros(1, dtype=torch.float64)])
        torch.testing.assert_close(sig, want.float(), rtol=3e-5, atol=0)
        # the pipeline starts from noise * init_noise_sigma, then scales the model input
        s0 = float(sig[0])
        t0 = ref.timesteps[0]
        model_in = float(ref.init_noise_sigma) * float(ref.scale_model_input(torch.ones(1), t0))
        assert ours.initial_sigma(s0) / math.sqrt(1 + s0**2) == pytest.approx(model_in, rel=5e-5)
        if hasattr(ref, "_step_index"):
            ref._step_index = None  # scale_model_input advanced nothing, but reset anyway


def test_ddim_final_sigma_is_alphas_cumprod_zero():
    ref = _scheduler("DDIMScheduler", SD15)
    ours = from_diffusers("DDIMScheduler", SD15)
    sch = NoiseSchedule.scaled_linear()
    opts = ours.sampler_options(sch)
    abar0 = float(ref.final_alpha_cumprod)
    assert opts["final_sigma"] == pytest.approx(math.sqrt((1 - abar0) / abar0), rel=5e-5)
    assert "final_sigma" not in from_diffusers(
        "DDIMScheduler", {**SD15, "set_alpha_to_one": True}
    ).sampler_options(sch)
    assert ours.sampler_options(sch, eta=0.5)["eta"] == 0.5


# ---------------------------------------------------------------------------- mapping


@pytest.mark.parametrize(
    ("spelling", "cls", "sampler", "spacing"),
    [
        ("DDIM", "DDIMScheduler", "ddim", "leading"),
        ("euler", "EulerDiscreteScheduler", "euler", "linspace"),
        ("Euler a", "EulerAncestralDiscreteScheduler", "euler_ancestral", "linspace"),
        ("LMS", "LMSDiscreteScheduler", "lms", "linspace"),
        ("LMS Karras", "LMSDiscreteScheduler", "lms", "karras"),
        ("DPM++ 2M", "DPMSolverMultistepScheduler", "dpmpp_2m", "linspace"),
        ("DPM++ 2M Karras", "DPMSolverMultistepScheduler", "dpmpp_2m", "karras"),
        ("DPM++ 2M SDE", "DPMSolverMultistepScheduler", "dpmpp_2m_sde", "linspace"),
        ("UniPC", "UniPCMultistepScheduler", "unipc", "linspace"),
        ("LCM", "LCMScheduler", "lcm", "lcm"),
        ("k_lcm", "LCMScheduler", "lcm", "lcm"),
    ],
)
def test_sampler_names_map_to_the_scheduler_diffusers_users_swap_in(
    spelling, cls, sampler, spacing
):
    name, cfg = scheduler_for(spelling, SD15)
    assert name == cls
    ref = _scheduler(name, cfg)  # diffusers accepts the config
    got = for_sampler(spelling)
    assert got == from_diffusers(cls, ref.config)
    assert (got.scheduler, got.sampler, got.spacing) == (cls, sampler, spacing)
    assert got.sampler in SAMPLERS and set(DIFFUSERS_SAMPLERS) <= set(SAMPLERS)
    if spacing == "karras":
        assert ref.config.use_karras_sigmas


def test_options_of_each_scheduler():
    assert dict(for_sampler("unipc").options) == {"order": 2, "variant": "bh2"}
    unipc3 = from_diffusers("UniPCMultistepScheduler", {"solver_order": 3, "solver_type": "bh1"})
    assert dict(unipc3.options) == {"order": 3, "variant": "bh1"}
    assert dict(for_sampler("lms").options) == {"order": 4}
    assert dict(for_sampler("DPM++ 2M SDE").options) == {"solver_type": "midpoint"}
    # a pipeline config's own choices carry over, as with diffusers' from_config
    karras_cfg = {**SD15, "_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True}
    assert for_sampler("euler", karras_cfg).spacing == "karras"
    assert for_sampler("euler", karras_cfg, spacing="leading").spacing == "leading"
    assert for_sampler("Euler a", karras_cfg).spacing == "linspace"  # no such key there
    # LMS img2img: the skipped head of the grid goes to the sampler
    lms = for_sampler("lms")
    sch = NoiseSchedule.scaled_linear()
    sig = lms.sigmas(sch, 10)
    torch.testing.assert_close(lms.sampler_options(sch, sig, 4)["history_sigmas"], sig[:4].double())
    assert "history_sigmas" not in lms.sampler_options(sch, sig, 0)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: from_diffusers("DDIMScheduler", {}), "clip_sample=True"),  # DDIM's default
        (lambda: from_diffusers("PNDMSchedulr", SD15), "did you mean 'PNDMScheduler'|unknown"),
        (lambda: for_sampler("heun"), "no diffusers scheduler counterpart"),
        (lambda: for_sampler("Euler a Karras"), "no karras sigmas"),
        (lambda: for_sampler("DDIM", spacing="karras"), "no karras sigmas"),
        (
            lambda: from_diffusers("DPMSolverMultistepScheduler", {"solver_order": 3}),
            "solver_order",
        ),
        (
            lambda: from_diffusers("DPMSolverMultistepScheduler", {"solver_type": "heun"}),
            "solver_type",
        ),
        (
            lambda: from_diffusers(
                "DPMSolverMultistepScheduler", {"final_sigmas_type": "sigma_min"}
            ),
            "final_sigmas_type",
        ),
        (
            lambda: from_diffusers("DPMSolverMultistepScheduler", {"use_exponential_sigmas": True}),
            "use_exponential_sigmas",
        ),
        (
            lambda: from_diffusers("UniPCMultistepScheduler", {"disable_corrector": [0]}),
            "disable_corrector",
        ),
        (
            lambda: from_diffusers("EulerDiscreteScheduler", {"interpolation_type": "log_linear"}),
            "interpolation_type",
        ),
        (
            lambda: from_diffusers("EulerDiscreteScheduler", {"timestep_spacing": "uniform"}),
            "timestep_spacing",
        ),
        (
            lambda: for_sampler("euler").sampler_options(NoiseSchedule.scaled_linear(), eta=0.5),
            "takes no eta",
        ),
        (lambda: from_diffusers("LCMScheduler", {"timestep_scaling": 1.0}), "timestep_scaling"),
        (lambda: for_sampler("LCM Karras"), "only its own lcm timesteps"),
        (lambda: for_sampler("euler", spacing="lcm"), "no lcm timesteps"),
        (
            lambda: from_diffusers(
                "DPMSolverMultistepScheduler", {**SD15, "lambda_min_clipped": 0.0}
            ).sigmas(NoiseSchedule.scaled_linear(), 10),
            "lambda_min_clipped",
        ),
    ],
)
def test_what_is_not_reproduced_is_a_one_line_config_error(call, match):
    with pytest.raises((ConfigError, UnknownNameError), match=match) as e:
        call()
    assert "\n" not in str(e.value)


def test_lambda_min_clipped_that_clips_nothing_is_accepted():
    ds = from_diffusers("DPMSolverMultistepScheduler", {**SD15, "lambda_min_clipped": -5.1})
    sch = NoiseSchedule.scaled_linear()
    torch.testing.assert_close(ds.sigmas(sch, 8), for_sampler("dpmpp_2m").sigmas(sch, 8))


def test_discrete_denoiser_replace_shares_the_model():
    calls = []

    def model(x, t):
        calls.append(t)
        return torch.zeros_like(x)

    den = DiscreteDenoiser(model, NoiseSchedule.scaled_linear(), timestep_interpolation="log")
    q = den.replace(quantize=True)
    assert q.model is model and q.quantize and q.timestep_interpolation == "log"
    assert not den.quantize
    sigma = torch.tensor([3.3])
    den(torch.ones(1, 2), sigma), q(torch.ones(1, 2), sigma)
    assert calls[0] != calls[0].round() and calls[1] == calls[0].round()


# ---------------------------------------------------------------------------- images


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """Our tiny model, diffusers' components with the same weights, and an init image."""
    model = tiny_model()
    parts = _diffusers_components(model, tmp_path_factory.mktemp("sd"))
    init = _pil(_image(3))
    x = torch.from_numpy(np.asarray(init, dtype="float32")).permute(2, 0, 1)[None] / 127.5 - 1
    return model, parts, init, x


@pytest.fixture(scope="module", params=["diffusers-folder", "single-file"])
def imported(request, sd, tmp_path_factory):
    """``sd`` with our model READ FROM FILES: diffusers' pipeline saved with
    ``save_pretrained`` (SD 1.5's PNDM scheduler config) and loaded by
    :func:`load_diffusers_folder`, or that folder converted to an SD single file and loaded
    by :func:`load_single_file`. The images must still be diffusers' images."""
    from noisecraft.io.formats.diffusers_folder import load_diffusers_folder
    from noisecraft.io.formats.single_file import load_single_file, save_single_file

    _, parts, init, x = sd
    tmp = tmp_path_factory.mktemp("imported")
    scheduler = _scheduler("PNDMScheduler", SD15_SCHEDULER_CONFIG)
    diffusers.StableDiffusionPipeline(**{**parts, "scheduler": scheduler}).save_pretrained(
        str(tmp / "folder")
    )
    model = load_diffusers_folder(tmp / "folder")
    if request.param == "single-file":
        save_single_file(model, tmp / "model.safetensors")
        model = load_single_file(tmp / "model.safetensors")
    return model, parts, init, x


def _pair(sd, name, mode, *, seeds=(21,), steps=None, eta=None, scheduler_config=None, size=None):
    """(ours, diffusers') images in [0, 1] for SD15_SCHEDULERS[name] and ``mode``; ``size``
    (height, width): another size than H x W (img2img: of a new init image)."""
    model, parts, init, x = sd
    height, width = size or (H, W)
    if size is not None:
        init, x = _init_image(size)
    cls, cfg = SD15_SCHEDULERS[name]
    steps = steps or STEPS[mode]
    kw = dict(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=steps,
        guidance_scale=CFG,
        num_images_per_prompt=len(seeds),
        generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
        output_type="pt",
    )
    req = dict(
        n=len(seeds),
        sampler=SAMPLER_NAME.get(name, name),
        steps=steps,
        cfg=CFG,
        prompts=[PROMPT],
        negative_prompt=NEGATIVE,
        seeds=list(seeds),
        scheduler_config=cfg if scheduler_config is None else scheduler_config,
        eta=eta,
    )
    if eta is not None:
        kw["eta"] = eta
    pipe_parts = {**parts, "scheduler": _scheduler(cls, cfg)}
    if mode == "txt2img":
        pipe = diffusers.StableDiffusionPipeline(**pipe_parts)
        kw.update(height=height, width=width)
        req.update(height=height, width=width)
    else:
        pipe = diffusers.StableDiffusionImg2ImgPipeline(**pipe_parts)
        kw.update(image=init, strength=STRENGTH)
        req.update(init_image=x, strength=STRENGTH)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        want = pipe(**kw).images.float()
    if scheduler_config is False:
        del req["scheduler_config"]
    got = (generate(model, GenerateRequest(**req)) / 2 + 0.5).clamp(0, 1)
    return got, want


def _init_image(size: tuple[int, int]) -> tuple[object, torch.Tensor]:
    """A random init image of ``size`` (height, width): as PIL (diffusers) and as the tensor
    of its 8-bit pixels in [-1, 1] (ours)."""
    g = torch.Generator().manual_seed(3)
    init = _pil(torch.rand((1, 3, *size), generator=g) * 2 - 1)
    x = torch.from_numpy(np.asarray(init, dtype="float32")).permute(2, 0, 1)[None] / 127.5 - 1
    return init, x


def _check(got, want):
    assert got.shape == want.shape and got.std() > 0.1  # not a flat image
    diff = (got - want).abs().max().item()
    assert diff <= 2 / 255  # the promise
    assert diff <= ATOL, f"max difference {diff * 255:.4f}/255"  # float rounding only


@pytest.mark.parametrize("mode", ["txt2img", "img2img"])
@pytest.mark.parametrize("name", list(SD15_SCHEDULERS))
def test_same_image_as_diffusers(sd, name, mode):
    _check(*_pair(sd, name, mode))


@pytest.mark.parametrize("mode", ["txt2img", "img2img"])
@pytest.mark.parametrize("name", list(SD15_SCHEDULERS))
def test_same_image_as_diffusers_from_a_folder_and_a_single_file(imported, name, mode):
    _check(*_pair(imported, name, mode))


@pytest.mark.parametrize(
    ("name", "mode", "seeds", "eta"),
    [
        ("ddim", "txt2img", (5, 9), 0.7),  # DDIM with eta: one draw per step per image
        ("ddim", "img2img", (5,), 1.0),
        ("euler_ancestral", "txt2img", (5, 9), None),
        ("dpmpp_2m_sde", "txt2img", (5, 9), None),
        ("dpmpp_2m_karras", "txt2img", (5, 9), None),  # deterministic batch: one run
        ("lcm", "txt2img", (5, 9), None),  # LCM: one draw per step per image
    ],
)
def test_stochastic_and_batched_with_per_image_generators(sd, name, mode, seeds, eta):
    got, want = _pair(sd, name, mode, seeds=seeds, eta=eta)
    _check(got, want)
    if len(seeds) == 2:
        assert (got[0] - got[1]).abs().max() > 0.05  # two different images


# The tiny U-Net has two levels (latents h x w, then ceil(h / 2) x ceil(w / 2)):
# 128x96 -> latents 16x12, level 1 8x6 (every level even; SD 1.5's 4 levels refuse it before);
# 136x104 -> latents 17x13, level 1 9x7: level 0 is odd, so the U-Net upsamples 9x7 to 17x13
# (diffusers' forward_upsample_size); 120x88 -> 15x11 and 8x6: odd, and level 1 even.
@pytest.mark.parametrize(
    "size", [(96, 128), (104, 136), (88, 120)], ids=lambda s: "x".join(map(str, s[::-1]))
)
@pytest.mark.parametrize(
    ("name", "mode"), [("dpmpp_2m", "txt2img"), ("euler_ancestral", "txt2img"), ("ddim", "img2img")]
)
def test_same_image_as_diffusers_at_any_multiple_of_8(sd, name, mode, size):
    got, want = _pair(sd, name, mode, size=size)
    assert got.shape[-2:] == size
    _check(got, want)


@pytest.mark.parametrize("steps", [3, 11])
def test_step_counts_with_rounding(sd, steps):
    """3 and 11 steps: DPM++'s np.linspace(0, 999, steps + 1) hits 499.5 / 166.5 / 832.5,
    which round to the even integer."""
    _check(*_pair(sd, "dpmpp_2m", "txt2img", steps=steps))
    _check(*_pair(sd, "unipc", "img2img", steps=steps))


@pytest.mark.parametrize(("name", "mode"), [("ddim", "txt2img"), ("lms", "img2img")])
def test_noisecraft_rules_alone_give_another_image(sd, name, mode):
    """The comparison can fail: without scheduler_config (noisecraft's linspace grid, no
    final alpha, LMS warm-up from order 1) the images differ by more than 2/255."""
    got, want = _pair(sd, name, mode, scheduler_config=False)
    assert (got - want).abs().max() > 2 / 255


def test_request_errors_are_one_line(sd):
    model = sd[0]
    base = dict(n=1, prompts=["a"], steps=4, height=H, width=W, scheduler_config=SD15)
    for kw, match in (
        ({"sampler": "heun"}, "no diffusers scheduler counterpart"),
        ({"sampler": "euler_ancestral", "eta": 0.5}, "takes no eta"),
        ({"sampler": "ddim", "spacing": "karras"}, "no karras sigmas"),
    ):
        with pytest.raises(ConfigError, match=match) as e:
            generate(model, GenerateRequest(**{**base, **kw}))
        assert "\n" not in str(e.value)


def test_mapping_is_a_frozen_value():
    ds = for_sampler("ddim")
    assert isinstance(ds, DiffusersSampling) and hash(ds) == hash(for_sampler("DDIM"))
    with pytest.raises(AttributeError):
        ds.sampler = "euler"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("name", "mode"),
    [
        ("ddim", "txt2img"),
        ("ddim", "img2img"),
        ("dpmpp_2m_karras", "txt2img"),
        ("euler", "txt2img"),
        ("lcm", "txt2img"),
        ("lcm", "img2img"),
    ],
)
def test_the_unet_sees_diffusers_timesteps(sd, name, mode):
    """Integers where diffusers rounds (DDIM, DPM++ with Karras sigmas), fractional for Euler."""
    model, _, _, x = sd
    cls, cfg = SD15_SCHEDULERS[name]
    ref = _scheduler(cls, cfg)
    ref.set_timesteps(STEPS[mode])
    want = ref.timesteps.float()
    req = dict(n=1, prompts=["a"], steps=STEPS[mode], sampler=SAMPLER_NAME.get(name, name))
    req.update(height=H, width=W, scheduler_config=cfg)
    if mode == "img2img":
        req.update(init_image=x, strength=STRENGTH)
        want = want[len(want) - int(STEPS[mode] * STRENGTH) :]
    seen = []
    forward = model.unet.forward
    model.unet.forward = lambda x, t, **kw: seen.append(t.clone()) or forward(x, t, **kw)
    try:
        generate(model, GenerateRequest(**req))
    finally:
        del model.unet.forward
    got = torch.stack([t[0] for t in seen])
    if name == "euler":
        torch.testing.assert_close(got, want, rtol=0, atol=2e-3)
    else:
        assert torch.equal(got, want)


@pytest.mark.parametrize("steps", [1, 2, 50])
def test_lcm_at_one_two_and_fifty_steps(sd, steps):
    """1 step: no noise drawn; 50 steps: every timestep of the distillation grid, down to
    t = 19, where LCM's c_skip (6.9e-6) is largest -- still within float rounding."""
    _check(*_pair(sd, "lcm", "txt2img", steps=steps))


def test_trailing_spacing_with_cfg_1_as_turbo_models_run(sd):
    """SD-Turbo-style sampling: Euler on diffusers' "trailing" timesteps (999, 749, ...) at
    guidance 1, where diffusers skips the unconditional pass; so does generate() (one U-Net
    row per step)."""
    model, parts, _, _ = sd
    cfg = {**SD15, "timestep_spacing": "trailing"}
    pipe = diffusers.StableDiffusionPipeline(
        **{**parts, "scheduler": _scheduler("EulerDiscreteScheduler", cfg)}
    )
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        want = pipe(
            prompt=PROMPT,
            num_inference_steps=2,
            guidance_scale=1.0,
            generator=[torch.Generator().manual_seed(4)],
            output_type="pt",
            height=H,
            width=W,
        ).images.float()
    rows = []
    forward = model.unet.forward
    model.unet.forward = lambda x, t, **kw: rows.append(len(x)) or forward(x, t, **kw)
    try:
        req = GenerateRequest(
            n=1,
            prompts=[PROMPT],
            steps=2,
            cfg=1.0,
            seeds=[4],
            sampler="euler",
            spacing="trailing",
            height=H,
            width=W,
        )
        got = (generate(model, req) / 2 + 0.5).clamp(0, 1)
        with_config = dataclasses.replace(req, scheduler_config=cfg, spacing=None)
        got_config = (generate(model, with_config) / 2 + 0.5).clamp(0, 1)
    finally:
        del model.unet.forward
    assert rows == [1, 1, 1, 1]
    _check(got, want)
    _check(got_config, want)
