"""Speed of noisecraft against diffusers on Stable Diffusion 1.5's architecture (random weights).

Both sides compute the same function: the diffusers / transformers modules are built from
noisecraft's random weights through the converters and SHARE them (``bench/_sd15.py``). In one
process per section the calls ALTERNATE (ours, theirs, ours, theirs, ...) after one untimed
warm-up call each, so a change of machine load hits both sides alike; each row reports the
median time of each side and

* ``ratio`` = diffusers' median / ours: above 1 we are faster;
* ``max |diff|`` and ``rel`` = max |ours - theirs| / max |theirs| on the warm-up outputs;
* peak RSS: ``ours`` / ``theirs`` is the process's peak resident memory DURING that side's
  calls (``VmHWM`` reset through ``/proc/self/clear_refs`` before every call and freed heap
  returned to the system with ``malloc_trim``), so it includes the shared weights once, the
  inputs, and the call's working memory; ``section`` is the peak RSS of the whole child
  process of the section (model construction included). On CUDA the memory columns are
  ``torch.cuda.max_memory_allocated`` per side instead.

Sections (``--only``):

* ``unet``: one U-Net pass, latents of ``--sizes`` / 8, batch 1 and 2 (2 = one
  classifier-free-guidance step), 77-token context;
* ``vae``: one VAE decode of a ``--sizes`` image;
* ``text``: the text encoder on 2 x 77 tokens (a prompt and the empty negative prompt);
* ``pipeline``: a whole text-to-image generation at ``--pipeline-sizes``: prompt encoding,
  ``--steps`` DPM++ 2M (or ``--sampler euler``) steps with CFG 7.5, VAE decode. Ours:
  ``noisecraft.pipelines.generate`` with SD 1.5's scheduler config (diffusers' grid and noise);
  theirs: ``StableDiffusionPipeline`` built from the same modules, same seed.
* ``fast`` (not in the default run): ours in fast mode (:data:`noisecraft.pipelines.fast.FAST`
  and, on CPU, int8 Linear layers, as ``noisecraft generate --fast``) against diffusers' exact
  passes, at ``--sizes`` with batch 2: one int8 U-Net pass against one of diffusers'; and two
  U-Net calls of a DeepCache N = 2 cycle (a full int8 pass, then a shallow one, branch 2, on
  the same input) against two of diffusers' passes: half its time is fast mode's time per
  U-Net call (NFE) over a sampling run. Its "diff" is fast mode's error at equal input (int8
  only: a shallow call on the input of the full call before it reproduces that call). Then a
  whole generation at ``--pipeline-sizes``: fast mode (10 DPM++ 2M Karras steps) against
  diffusers' ``--steps`` DPM++ 2M steps, different images by design (no diff).
* ``lcm`` (not in the default run): few-step sampling at ``--pipeline-sizes``, as an LCM-LoRA
  or LCM student runs: 4 LCM steps at CFG 1 (one U-Net row per step, no negative prompt)
  against diffusers' ``LCMScheduler`` at guidance 1 (the same image: max diff is float
  rounding), next to the ``--steps`` DPM++ 2M generation with CFG 7.5 (batch-2 U-Net calls)
  of the ``pipeline`` section. With random weights the images are noise; the times are those
  of real weights of this architecture.
* ``observe`` (not in the default run): what seeing inside costs
  (:mod:`noisecraft.pipelines.observe`), whole ``--steps`` DPM++ 2M CFG 7.5 generations at
  ``--pipeline-sizes``: ours with the observer off against itself (an A/A row: the ratio's
  spread is the noise of this measure), against diffusers, and with attention maps or the
  latents every 5 steps recorded (``ratio`` < 1: the observer's cost; ``max |diff|`` 0: the
  image is unchanged). Decoding the recorded latents (API level) is not included.
* ``controlnet`` (not in the default run): one sampling step with a ControlNet, at
  ``--sizes``, batch 2 (a CFG step): the ControlNet's residuals from a hint image, then the
  U-Net with them added to its skips and middle block; ours (``models/controlnet.py``)
  against diffusers' ``ControlNetModel`` + ``UNet2DConditionModel`` with the same weights.

Each section runs in its own child process (so peaks and allocator state do not mix).

    python bench/sd_speed.py                                  # the table of docs/performance.md
    python bench/sd_speed.py --sizes 256 --only unet          # one row set, minutes
    python bench/sd_speed.py --tiny --sizes 64 --repeats 2    # develop on a loaded machine
    python bench/sd_speed.py --device cuda                    # fp16 weights on both sides
    python bench/sd_speed.py --only fast --pipeline-sizes 512 # fast mode against diffusers
    python bench/sd_speed.py --only lcm --pipeline-sizes 512  # 4 LCM steps vs 20 DPM++ 2M CFG
    python bench/sd_speed.py --only observe --steps 10         # the observer's cost, on and off
    python bench/sd_speed.py --only controlnet --sizes 512     # a U-Net + ControlNet step

``--write docs/performance.md --block NAME`` replaces the generated block NAME of that page
(between its ``<!-- sd_speed:NAME:begin -->`` / ``:end -->`` markers) with this run's table.
``--compile`` adds rows for our U-Net under ``torch.compile`` (compile time reported
separately; diffusers stays eager).
``--reference-kernels`` runs ours with :func:`noisecraft.nn.kernels.set_fast_kernels` off
(plain ``F.linear`` / ``F.conv2d``), to see what those fast paths are worth.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

SECTIONS = ("unet", "vae", "text", "pipeline", "fast", "lcm", "observe", "controlnet")
DEFAULT_SECTIONS = SECTIONS[:4]
DTYPES = {"fp32": "float32", "fp16": "float16"}  # --dtype -> torch dtype name
PROMPT = "a photograph of an astronaut riding a horse"
MARKER = "<!-- sd_speed:{name}:{end} -->"

# ---------------------------------------------------------------------------- memory


def _status(key: str) -> int | None:
    """A ``/proc/self/status`` field in bytes (Linux), None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _libc() -> Any:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_LIBC = _libc()
_PEAK_SEEN = 0  # the largest VmHWM before any reset: the process's peak


def _reset_peak_rss(trim: bool = True) -> bool:
    """Return freed heap to the system (``trim``) and reset ``VmHWM`` to the current RSS
    (Linux >= 4.0). The trim makes the next call page-fault its working memory in again
    (``--no-trim`` of bench/openvino.py leaves it out).

    The peak so far is remembered first (:func:`_section_peak`): the reset also resets
    ``getrusage``'s ``ru_maxrss``."""
    global _PEAK_SEEN
    _PEAK_SEEN = max(_PEAK_SEEN, _status("VmHWM") or 0)
    if trim and _LIBC is not None:
        _LIBC.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Meter:
    """Time and peak memory of one call on ``device``."""

    def __init__(self, device: str, trim: bool = True):
        import torch

        self.torch = torch
        self.cuda = device.startswith("cuda")
        self.trim = trim
        self.per_call_rss = _reset_peak_rss(trim) and _status("VmHWM") is not None

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def __call__(self, fn: Callable[[], Any]) -> tuple[float, int | None, Any]:
        self.sync()
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()
        elif self.per_call_rss:
            _reset_peak_rss(self.trim)
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        dt = time.perf_counter() - t0
        if self.cuda:
            peak = self.torch.cuda.max_memory_allocated()
        else:
            peak = _status("VmHWM") if self.per_call_rss else None
        return dt, peak, out


def _diff(ours: Any, theirs: Any) -> tuple[float, float]:
    a, b = ours.float().cpu(), theirs.float().cpu()
    if a.shape != b.shape:
        raise RuntimeError(f"output shapes differ: ours {tuple(a.shape)}, theirs {tuple(b.shape)}")
    d = float((a - b).abs().max())
    return d, d / max(float(b.abs().max()), 1e-30)


def alternate(
    name: str,
    sides: Mapping[str, Callable[[], Any]],
    meter: Meter,
    repeats: int,
    label: Callable[[int], str] = lambda i: "",
) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """``repeats`` rounds calling every side in turn (so a change of machine load hits all
    sides alike): each side's times and per-call peaks; outputs are dropped. ``label(i)``
    names round ``i`` in the progress lines on stderr."""
    times: dict[str, list[float]] = {side: [] for side in sides}
    peaks: dict[str, list[int]] = {side: [] for side in sides}
    for i in range(repeats):
        for side, fn in sides.items():
            dt, peak, out = meter(fn)
            del out
            times[side].append(dt)
            if peak is not None:
                peaks[side].append(peak)
            print(f"  {name}: {side}{label(i)} {dt:.3f} s", file=sys.stderr, flush=True)
    return times, peaks


def compare(
    name: str,
    ours: Callable[[], Any],
    theirs: Callable[[], Any],
    meter: Meter,
    repeats: int,
    warmup: tuple[Callable[[], Any], Callable[[], Any]] | None = None,
) -> dict[str, Any]:
    """One row: an untimed warm-up call each (outputs compared), then ``repeats`` alternating
    timed calls, ours first. ``warmup`` replaces the warm-up calls (then their outputs are
    compared); the timed outputs are dropped."""
    wo, wt = warmup or (ours, theirs)
    a = meter(wo)[2]
    b = meter(wt)[2]
    diff, rel = _diff(a, b)
    del a, b
    times, peaks = alternate(name, {"ours": ours, "theirs": theirs}, meter, repeats)
    med = {side: statistics.median(t) for side, t in times.items()}
    return {
        "case": name,
        "ours_s": med["ours"],
        "theirs_s": med["theirs"],
        "ratio": med["theirs"] / med["ours"],
        "ours_all": times["ours"],
        "theirs_all": times["theirs"],
        "max_diff": diff,
        "rel_diff": rel,
        "ours_peak": max(peaks["ours"]) if peaks["ours"] else None,
        "theirs_peak": max(peaks["theirs"]) if peaks["theirs"] else None,
    }


# ---------------------------------------------------------------------------- sections


def _section(args: argparse.Namespace, section: str) -> list[dict[str, Any]]:
    import _sd15
    import torch

    from noisecraft.models.tokenizer import CLIPTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.reference_kernels:
        from noisecraft.nn.kernels import set_fast_kernels

        set_fast_kernels(False)
    device = args.device
    dtype = getattr(torch, DTYPES[args.dtype])
    meter = Meter(device)
    cfg = _sd15.configs(args.tiny)
    rows: list[dict[str, Any]] = []
    g = torch.Generator().manual_seed(0)
    torch.set_grad_enabled(False)

    if section == "unet":
        ours = _sd15.build_ours(args.tiny, parts=("unet",), device=device, dtype=dtype)["unet"]
        theirs = _sd15.diffusers_unet(ours)
        for size in args.sizes:
            for batch in (1, 2):
                x = torch.randn(batch, 4, size // 8, size // 8, generator=g).to(device, dtype)
                t = torch.full((batch,), 500, device=device)
                ctx = torch.randn(batch, 77, cfg.unet.context_dim, generator=g).to(device, dtype)
                rows.append(
                    compare(
                        f"U-Net {size}² batch {batch}",
                        lambda x=x, t=t, c=ctx: ours(x, t, context=c),
                        lambda x=x, t=t, c=ctx: theirs(x, t, encoder_hidden_states=c).sample,
                        meter,
                        args.repeats,
                    )
                )
                if args.compile:
                    # one static-shape graph per case, weights frozen into it (inductor's
                    # "freezing": constant-folded and prepacked for oneDNN; set in the config,
                    # torch.compile(options={"freezing": True}) did not freeze: 2.3x slower)
                    import torch._inductor.config

                    torch._inductor.config.freezing = True
                    compiled = torch.compile(ours, dynamic=False)
                    t0 = time.perf_counter()
                    compiled(x, t, context=ctx)
                    meter.sync()
                    first = time.perf_counter() - t0
                    row = compare(
                        f"U-Net {size}² batch {batch}, ours compiled",
                        lambda x=x, t=t, c=ctx, m=compiled: m(x, t, context=c),
                        lambda x=x, t=t, c=ctx: theirs(x, t, encoder_hidden_states=c).sample,
                        meter,
                        args.repeats,
                    )
                    row["compile_s"] = first
                    rows.append(row)
    elif section == "vae":
        ours = _sd15.build_ours(args.tiny, parts=("vae",), device=device, dtype=dtype)["vae"]
        theirs = _sd15.diffusers_vae(ours)
        for size in args.sizes:
            z = torch.randn(1, 4, size // 8, size // 8, generator=g).to(device, dtype)
            rows.append(
                compare(
                    f"VAE decode {size}²",
                    lambda z=z: ours.decode(z),
                    lambda z=z: theirs.decode(z).sample,
                    meter,
                    args.repeats,
                )
            )
    elif section == "text":
        ours = _sd15.build_ours(args.tiny, parts=("text",), device=device, dtype=dtype)["text"]
        tok = CLIPTokenizer.default()
        theirs = _sd15.transformers_text_encoder(ours, tok)
        ids = tok([PROMPT, ""]).to(device)
        rows.append(
            compare(
                "text encoder 2 x 77 tokens",
                lambda: ours(ids).last_hidden_state,
                lambda: theirs(ids).last_hidden_state,
                meter,
                args.repeats,
            )
        )
    elif section == "pipeline":
        rows += _pipeline_rows(args, device, dtype, meter)
    elif section == "fast":
        rows += _fast_rows(args, device, dtype, meter)
    elif section == "lcm":
        rows += _lcm_rows(args, device, dtype, meter)
    elif section == "observe":
        rows += _observe_rows(args, device, dtype, meter)
    elif section == "controlnet":
        rows += _controlnet_rows(args, device, dtype, meter)
    else:
        raise ValueError(section)
    return rows


def _diffusers_generation(
    pipe: Any, size: int, steps: int, seed: int, guidance: float = 7.5
) -> Any:
    """One image of ``PROMPT`` from diffusers' pipeline: CFG 7.5, pixels in [0, 1]."""
    import torch

    return pipe(
        prompt=PROMPT,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=[torch.Generator().manual_seed(seed)],
        output_type="pt",
        height=size,
        width=size,
    ).images


def _our_generation(
    model: Any,
    args: argparse.Namespace,
    size: int,
    *,
    sampler: str,
    steps: int,
    cfg: float = 7.5,
    observer: Any = None,
) -> Any:
    """One image of ``PROMPT`` from ``generate`` with SD 1.5's scheduler config, pixels in
    [0, 1]; ``observer``: a :class:`noisecraft.api.Observer` recording during the run."""
    from noisecraft.pipelines import GenerateRequest, generate
    from noisecraft.pipelines.diffusers_schedulers import SD15_SCHEDULER_CONFIG
    from noisecraft.pipelines.observe import Observation

    request = GenerateRequest(
        n=1,
        prompts=[PROMPT],
        sampler=sampler,
        steps=steps,
        cfg=cfg,
        width=size,
        height=size,
        seeds=[args.seed],
        scheduler_config=SD15_SCHEDULER_CONFIG,
    )
    observation = None if observer is None else Observation(observer)
    return (generate(model, request, observation=observation) / 2 + 0.5).clamp(0, 1)


def _pipeline_rows(args: argparse.Namespace, device: str, dtype: Any, meter: Meter) -> list[dict]:
    import _sd15
    import torch

    parts = _sd15.build_ours(args.tiny, device=device, dtype=dtype)
    model = _sd15.latent_diffusion(parts["unet"], parts["vae"], parts["text"])
    scheduler = {"dpmpp_2m": "DPMSolverMultistepScheduler", "euler": "EulerDiscreteScheduler"}
    pipe = _sd15.diffusers_pipeline(model, scheduler[args.sampler])
    rows = []
    for size in args.pipeline_sizes:

        def ours(size: int = size, steps: int = args.steps) -> torch.Tensor:
            return _our_generation(model, args, size, sampler=args.sampler, steps=steps)

        def theirs(size: int = size) -> torch.Tensor:
            return _diffusers_generation(pipe, size, args.steps, args.seed)

        rows.append(
            compare(
                f"generation {size}², {args.steps} {args.sampler} steps + decode",
                ours,
                theirs,
                meter,
                args.pipeline_repeats,
            )
        )
    return rows


def _lcm_rows(args: argparse.Namespace, device: str, dtype: Any, meter: Meter) -> list[dict]:
    """The ``lcm`` section (module docstring): 4 LCM steps at CFG 1, then ``--steps``
    DPM++ 2M steps at CFG 7.5, each against diffusers on the same weights."""
    import _sd15
    import torch

    parts = _sd15.build_ours(args.tiny, device=device, dtype=dtype)
    model = _sd15.latent_diffusion(parts["unet"], parts["vae"], parts["text"])
    pipes = {
        name: _sd15.diffusers_pipeline(model, cls)
        for name, cls in (("lcm", "LCMScheduler"), ("dpmpp_2m", "DPMSolverMultistepScheduler"))
    }
    cases = (("lcm", 4, 1.0), ("dpmpp_2m", args.steps, 7.5))
    rows = []
    for size in args.pipeline_sizes:
        for sampler, steps, cfg in cases:

            def ours(size=size, sampler=sampler, steps=steps, cfg=cfg) -> torch.Tensor:
                return _our_generation(model, args, size, sampler=sampler, steps=steps, cfg=cfg)

            def theirs(size=size, sampler=sampler, steps=steps, cfg=cfg) -> torch.Tensor:
                return _diffusers_generation(pipes[sampler], size, steps, args.seed, cfg)

            rows.append(
                compare(
                    f"generation {size}², {steps} {sampler} steps, CFG {cfg:g} + decode",
                    ours,
                    theirs,
                    meter,
                    args.pipeline_repeats,
                )
            )
    return rows


def _observe_rows(args: argparse.Namespace, device: str, dtype: Any, meter: Meter) -> list[dict]:
    """The ``observe`` section (module docstring): a generation with the observer off against
    itself (the noise of the measure), against diffusers, and against the observer on."""
    import _sd15

    from noisecraft.pipelines.observe import Observer

    parts = _sd15.build_ours(args.tiny, device=device, dtype=dtype)
    model = _sd15.latent_diffusion(parts["unet"], parts["vae"], parts["text"])
    pipe = _sd15.diffusers_pipeline(model, "DPMSolverMultistepScheduler")
    rows = []
    for size in args.pipeline_sizes:

        def run(observer: Any = None, size: int = size) -> Any:
            return _our_generation(
                model, args, size, sampler="dpmpp_2m", steps=args.steps, observer=observer
            )

        head = f"generation {size}², {args.steps} dpmpp_2m steps"
        cases = (
            (f"{head}: observer off vs off (A/A)", run, run),
            (
                f"{head}: observer off vs diffusers",
                run,
                lambda size=size: _diffusers_generation(pipe, size, args.steps, args.seed),
            ),
            (
                f"{head}: attention maps on vs off",
                lambda: run(Observer(attention=True)),
                run,
            ),
            (f"{head}: latents every 5 on vs off", lambda: run(Observer(every=5)), run),
        )
        for name, ours, theirs in cases:
            rows.append(compare(name, ours, theirs, meter, args.pipeline_repeats))
    return rows


def _controlnet_rows(args: argparse.Namespace, device: str, dtype: Any, meter: Meter) -> list[dict]:
    """The ``controlnet`` section (module docstring)."""
    import _sd15
    import torch

    unet = _sd15.build_ours(args.tiny, parts=("unet",), device=device, dtype=dtype)["unet"]
    cn = _sd15.build_controlnet(unet).to(device=device, dtype=dtype)
    their_unet, their_cn = _sd15.diffusers_unet(unet), _sd15.diffusers_controlnet(cn)
    g = torch.Generator().manual_seed(0)
    rows = []
    for size in args.sizes:
        x = torch.randn(2, 4, size // 8, size // 8, generator=g).to(device, dtype)
        t = torch.full((2,), 500, device=device)
        ctx = torch.randn(2, 77, unet.config.context_dim, generator=g).to(device, dtype)
        hint = torch.rand(2, 3, size, size, generator=g).to(device, dtype)

        def ours(x=x, t=t, c=ctx, h=hint) -> Any:
            down, mid = cn(x, t, c, h)
            return unet(x, t, context=c, down_residuals=down, mid_residual=mid)

        def theirs(x=x, t=t, c=ctx, h=hint) -> Any:
            down, mid = their_cn(
                x, t, encoder_hidden_states=c, controlnet_cond=h, return_dict=False
            )
            return their_unet(
                x,
                t,
                encoder_hidden_states=c,
                down_block_additional_residuals=down,
                mid_block_additional_residual=mid,
            ).sample

        rows.append(
            compare(f"U-Net + ControlNet {size}² batch 2", ours, theirs, meter, args.repeats)
        )
    return rows


def _fast_rows(args: argparse.Namespace, device: str, dtype: Any, meter: Meter) -> list[dict]:
    """The ``fast`` section (module docstring)."""
    import _sd15
    import torch

    from noisecraft.pipelines.deepcache import DeepCacheState, deepcache_forward
    from noisecraft.pipelines.fast import FAST
    from noisecraft.pipelines.generate import generate

    parts = _sd15.build_ours(args.tiny, device=device, dtype=dtype)
    exact = _sd15.latent_diffusion(parts["unet"], parts["vae"], parts["text"])
    # diffusers' modules take the float weights first; our modules are then quantised in
    # place (the float tensors stay alive through diffusers', the int8 ones are added)
    pipe = _sd15.diffusers_pipeline(exact, "DPMSolverMultistepScheduler")
    quantise = device == "cpu" and dtype == torch.float32  # int8: float32 CPU models only
    model = exact.int8(inplace=True) if quantise else exact
    unet, theirs = model.unet, pipe.unet
    int8 = "int8 Linear" if quantise else "no int8 (float32 CPU only)"
    cfg = _sd15.configs(args.tiny)
    g = torch.Generator().manual_seed(0)
    rows = []
    for size in args.sizes:
        x = torch.randn(2, 4, size // 8, size // 8, generator=g).to(device, dtype)
        t = torch.full((2,), 500, device=device)
        ctx = torch.randn(2, 77, cfg.unet.context_dim, generator=g).to(device, dtype)

        def exact_pass(x: torch.Tensor = x, t: torch.Tensor = t, c: torch.Tensor = ctx) -> Any:
            return theirs(x, t, encoder_hidden_states=c).sample

        def cycle(x: torch.Tensor = x, t: torch.Tensor = t, c: torch.Tensor = ctx) -> Any:
            state = DeepCacheState(FAST.deepcache)
            deepcache_forward(unet, state, x, t, context=c)  # full: fills the cache
            out = deepcache_forward(unet, state, x, t, context=c)  # shallow
            if state.shallow_calls != 1:
                raise RuntimeError("the second DeepCache call was not a shallow one")
            return out

        rows.append(
            compare(
                f"U-Net {size}² batch 2, ours {int8}",
                lambda x=x, t=t, c=ctx: unet(x, t, context=c),
                exact_pass,
                meter,
                args.repeats,
            )
        )
        b = FAST.deepcache.branch
        rows.append(
            compare(
                f"U-Net {size}² batch 2, 2 calls: ours FAST ({int8}, DeepCache full + shallow "
                f"b={b}) / diffusers 2 passes",
                cycle,
                lambda: (exact_pass(), exact_pass())[1],
                meter,
                args.repeats,
            )
        )
    for size in args.pipeline_sizes:

        def ours(size: int = size) -> torch.Tensor:
            request = FAST.request(
                n=1, prompts=[PROMPT], cfg=7.5, width=size, height=size, seeds=[args.seed]
            )
            return (generate(model, request) / 2 + 0.5).clamp(0, 1)

        def theirs_gen(size: int = size) -> torch.Tensor:
            return _diffusers_generation(pipe, size, args.steps, args.seed)

        row = compare(
            f"generation {size}²: ours FAST ({FAST.steps} steps, {int8}) / diffusers "
            f"{args.steps} dpmpp_2m steps",
            ours,
            theirs_gen,
            meter,
            args.pipeline_repeats,
        )
        row["max_diff"] = row["rel_diff"] = None  # different samplers: not the same image
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------- driver


def _child(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    rows = _section(args, args.child)
    peak = _section_peak()
    for row in rows:
        row["section"] = args.child
        row["section_peak"] = peak
    print(json.dumps(rows))


def _section_peak() -> int | None:
    """Peak RSS of this whole process: the largest ``VmHWM`` seen before and after resets."""
    peak = max(_PEAK_SEEN, _status("VmHWM") or 0)
    return peak or None


def _child_argv(args: argparse.Namespace, section: str) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", section]
    argv += ["--sizes", ",".join(map(str, args.sizes))]
    argv += ["--pipeline-sizes", ",".join(map(str, args.pipeline_sizes))]
    argv += ["--repeats", str(args.repeats), "--pipeline-repeats", str(args.pipeline_repeats)]
    argv += ["--device", args.device, "--dtype", args.dtype]
    argv += ["--steps", str(args.steps), "--sampler", args.sampler]
    argv += ["--seed", str(args.seed)]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    if args.tiny:
        argv.append("--tiny")
    if args.compile:
        argv.append("--compile")
    if args.reference_kernels:
        argv.append("--reference-kernels")
    return argv


def _sci(v: float | None) -> str:
    return "-" if v is None else f"{v:.1e}"


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def _environment(args: argparse.Namespace) -> dict[str, Any]:
    import diffusers
    import torch
    import transformers

    env = {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "threads": args.threads or torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "device": args.device,
        "dtype": DTYPES[args.dtype],
    }
    if args.device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(0)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    env["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return env


def markdown(rows: list[dict[str, Any]], env: dict[str, Any], meta: dict[str, Any]) -> str:
    """The table (and how it was made) as Markdown."""
    mem = "peak GPU memory" if env["device"].startswith("cuda") else "peak RSS"
    lines = [
        f"Command: `{meta['command']}`",
        "",
        f"- {meta['date']}; torch {env['torch']}, diffusers {env['diffusers']}, transformers "
        f"{env['transformers']}; {env['device']} ({env.get('gpu', env['cpu'])}), "
        f"{env['threads']} threads of {env['cpus']} CPUs, {env['dtype']} weights; ours with "
        f"{meta['kernels']} kernels.",
        f"- Load average (1 min) before / after the run: {meta['load_before']} / "
        f"{meta['load_after']}; wall time {meta['wall_s'] / 60:.1f} min.",
        "",
        f"| case | ours s | diffusers s | ratio (diffusers / ours) | max abs diff | rel diff "
        f"| {mem} ours GiB | {mem} diffusers GiB | section peak RSS GiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        case = r["case"]
        if "compile_s" in r:
            case += f" (compile + first call {r['compile_s']:.0f} s)"
        lines.append(
            f"| {case} | {r['ours_s']:.3f} | {r['theirs_s']:.3f} | **{r['ratio']:.2f}×** "
            f"| {_sci(r['max_diff'])} | {_sci(r['rel_diff'])} | {_gib(r['ours_peak'])} "
            f"| {_gib(r['theirs_peak'])} | {_gib(r['section_peak'])} |"
        )
    return "\n".join(lines) + "\n"


def write_block(path: Path, block: str, name: str = "main") -> None:
    """Replace the text between the ``<!-- sd_speed:NAME:begin -->`` and ``... :end -->``
    markers of ``path`` with ``block``."""
    begin, end = MARKER.format(name=name, end="begin"), MARKER.format(name=name, end="end")
    text = path.read_text()
    if begin not in text or end not in text:
        raise SystemExit(f"{path} has no {begin} ... {end} block to replace")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{block}{end}{tail}")


def _load() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "?"


def loadavg() -> str:
    """The whole ``/proc/loadavg`` line (1, 5, 15 minutes, tasks, last pid); :func:`_load`
    is the 1-minute figure alone."""
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "n/a"


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=_ints, default=[256, 512], help="image sides, e.g. 256,512")
    p.add_argument("--pipeline-sizes", type=_ints, default=[256], help="sides of generations")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per side (median)")
    p.add_argument("--pipeline-repeats", type=int, default=2, help="timed generations per side")
    p.add_argument(
        "--only",
        default=",".join(DEFAULT_SECTIONS),
        help="unet,vae,text,pipeline,fast,lcm,observe,controlnet",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (fp16 weights on both sides)")
    p.add_argument(
        "--dtype",
        choices=("auto", "fp32", "fp16"),
        default="auto",
        help="weights and activations on both sides (auto: fp16 on cuda, fp32 on cpu; fp16 on "
        "cpu runs the CUDA run's dtype paths without a GPU, slowly)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps of a generation")
    p.add_argument("--sampler", choices=("dpmpp_2m", "euler"), default="dpmpp_2m")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="narrow models, for development")
    p.add_argument("--compile", action="store_true", help="also time our torch.compile'd U-Net")
    p.add_argument(
        "--reference-kernels",
        action="store_true",
        help="ours without noisecraft.nn.kernels' CPU fast paths (F.linear / F.conv2d)",
    )
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--write", type=Path, help="replace an sd_speed block of this Markdown file")
    p.add_argument("--block", default="main", help="which block --write replaces (its NAME)")
    p.add_argument("--child", choices=SECTIONS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in args.only if s not in SECTIONS]
    if bad:
        p.error(f"unknown section {bad[0]!r}; choose from {', '.join(SECTIONS)}")
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        p.error("--device must be cpu or cuda")
    import torch

    if args.dtype == "auto":
        args.dtype = "fp16" if args.device.startswith("cuda") else "fp32"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(
            "--device cuda: torch sees no CUDA device here; run on a GPU machine with a CUDA "
            "build of torch 2.13 (the CPU wheel has none), or use --device cpu"
        )
    if args.repeats < 1 or args.pipeline_repeats < 1:
        p.error("--repeats and --pipeline-repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.child:
        _child(args)
        return
    t0 = time.time()
    load_before = _load()
    rows: list[dict[str, Any]] = []
    for section in args.only:
        print(f"[{section}] load {_load()}", file=sys.stderr, flush=True)
        res = subprocess.run(_child_argv(args, section), stdout=subprocess.PIPE, text=True)
        if res.returncode:
            raise SystemExit(f"section {section} failed (exit {res.returncode})")
        rows += json.loads(res.stdout.strip().splitlines()[-1])
    meta = {
        "command": "python bench/sd_speed.py " + " ".join(a for a in (argv or sys.argv[1:])),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "load_before": load_before,
        "load_after": _load(),
        "wall_s": time.time() - t0,
        "kernels": "reference" if args.reference_kernels else "fast",
    }
    env = _environment(args)
    if args.json:
        print(json.dumps({"env": env, "meta": meta, "rows": rows}))
        return
    block = markdown(rows, env, meta)
    print(block)
    if args.write:
        write_block(args.write, block, args.block)


if __name__ == "__main__":
    main()
