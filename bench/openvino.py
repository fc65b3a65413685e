"""OpenVINO against noisecraft and diffusers on SD 1.5's architecture (random weights).

Runs in its own venv (``make bench-openvino-venv``: ``.openvino-venv`` with torch 2.13.0,
diffusers 0.42.1, transformers 5.23.0, openvino 2026.4.1 and noisecraft without deps).

The diffusers / transformers modules share noisecraft's random weights (``bench/_sd15.py``);
OpenVINO converts THOSE modules (``openvino.convert_model`` on a small wrapper that returns a
tensor) and compiles them for the CPU twice: in float32 (``INFERENCE_PRECISION_HINT: f32``)
and in OpenVINO's default precision for this CPU (bf16 where the CPU has bf16 instructions,
else f32; the precision it picked is printed). Each converted model is reshaped to the
row's static input shapes before compiling (OpenVINO's fast path).

In one process the calls ALTERNATE (ours, ours bf16, diffusers, OpenVINO f32, OpenVINO
default, ours, ...) after one untimed warm-up call each, whose outputs are compared with
ours; each row reports the medians, ``ratio`` = that side's median / ours (above 1 we are
faster), ``rel`` = max |side - ours| / max |ours|, and the peak RSS during that side's
calls (``VmHWM`` reset before each call, ``bench/sd_speed.py``'s meter). The RSS includes
every copy alive in the process: the shared torch weights and each compiled OpenVINO
model's own weights.
Conversion and compile times are printed per model.

Rows (``--only``): ``unet``: U-Net at ``--sizes`` (batch 2 = one CFG step, 77-token
context); ``vae``: VAE decode at ``--sizes`` (batch 1); ``text``: text encoder (2 x 77 tokens);
``pipeline`` (in the default run only when ``--pipeline-sizes`` is given): a whole
``--steps`` (20) step generation at each ``--pipeline-sizes`` side: prompt encoding, DPM++ 2M
steps with CFG 7.5 (U-Net batch 2), VAE decode, pixels in [0, 1], seed ``--seed``:

* ours: ``noisecraft.pipelines.generate`` with SD 1.5's scheduler config (diffusers'
  timesteps and initial noise), as ``bench/sd_speed.py``'s ``pipeline`` section;
* ours bf16: the same with the U-Net's weights in bf16 (``noisecraft.load(dtype="bf16")``:
  text encoder, VAE and sampler stay fp32); in the module rows a bf16 copy of our U-Net /
  VAE on bf16 inputs (the VAE row is measured only: the VAE ships fp32);
* diffusers: ``StableDiffusionPipeline`` built from the same modules, same seed;
* OpenVINO f32 / default: the converted text encoder, U-Net (static shapes: batch 2 at that
  side) and VAE decoder called in diffusers' loop (``bench/_sd15_loop.py``), driven by
  diffusers' ``DPMSolverMultistepScheduler`` configured as the pipeline's: the pipeline's
  tokenizer, the same initial latents from the same generator, the same CFG arithmetic.

The three parts are converted and compiled anew for the pipeline's shapes (times printed):
the per-module rows free their compiled models after their row, so that no row's peak RSS
carries another row's models. A 512² generation is too long for an untimed warm-up call:
each side's FIRST call is reported on its own (its image is the one compared: ``max abs
pixel diff vs ours``), then the median of ``--pipeline-repeats`` (1) further alternating
calls, and ``time / ours`` is that median over ours. Peak RSS: over all of a side's calls.

    .openvino-venv/bin/python bench/openvino.py --sizes 256          # minutes
    .openvino-venv/bin/python bench/openvino.py --sizes 256,512 --pipeline-sizes 512  # all
    .openvino-venv/bin/python bench/openvino.py --only pipeline --pipeline-sizes 512
    .openvino-venv/bin/python bench/openvino.py --tiny --sizes 64    # develop
    .openvino-venv/bin/python bench/openvino.py --tiny --only pipeline --pipeline-sizes 64
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

# this file is named openvino.py: the real package first, then the bench folder for _sd15
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
import openvino as ov  # noqa: E402

sys.path.insert(0, str(_HERE))
import _sd15  # noqa: E402
import _sd15_loop  # noqa: E402
from sd_speed import (  # noqa: E402
    PROMPT,
    Meter,
    _diffusers_generation,
    _our_generation,
    _status,
    alternate,
    loadavg,
)

from noisecraft.models.tokenizer import CLIPTokenizer  # noqa: E402

SIDES = ("ours", "diffusers", "openvino f32", "openvino default")


class _UNetOut(nn.Module):
    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, context):  # noqa: D102
        return self.unet(sample, timestep, encoder_hidden_states=context, return_dict=False)[0]


class _DecodeOut(nn.Module):
    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, z):  # noqa: D102
        return self.vae.decode(z, return_dict=False)[0]


class _TextOut(nn.Module):
    def __init__(self, text: nn.Module):
        super().__init__()
        self.text = text

    def forward(self, ids):  # noqa: D102
        return self.text(ids).last_hidden_state


def convert(module: nn.Module, example: tuple[torch.Tensor, ...]) -> tuple[Any, float]:
    """``openvino.convert_model`` of ``module`` traced on ``example``; (model, seconds)."""
    t0 = time.perf_counter()
    model = ov.convert_model(module, example_input=example)
    return model, time.perf_counter() - t0


def compile_both(
    model: Any, shapes: list[list[int]], name: str, threads: int = 0
) -> dict[str, Any]:
    """``model`` reshaped to ``shapes`` and compiled for the CPU in f32 and in the default
    precision; prints each compile time and the precision OpenVINO chose."""
    core = ov.Core()
    model.reshape({model.inputs[i].any_name: ov.PartialShape(s) for i, s in enumerate(shapes)})
    out = {}
    for side, config in (
        ("openvino f32", {"INFERENCE_PRECISION_HINT": "f32"}),
        ("openvino default", {}),
    ):
        if threads:  # as many threads as torch's sides
            config = {**config, "INFERENCE_NUM_THREADS": threads}
        t0 = time.perf_counter()
        compiled = core.compile_model(model, "CPU", config)
        secs = time.perf_counter() - t0
        precision = compiled.get_property("INFERENCE_PRECISION_HINT")
        print(f"- {name}: compile {side}: {secs:.1f} s (inference precision {precision})")
        out[side] = compiled
    return out


def ov_call(compiled: Any, inputs: tuple[torch.Tensor, ...]) -> Callable[[], torch.Tensor]:
    arrays = [t.numpy() for t in inputs]
    request = compiled.create_infer_request()

    def fn() -> torch.Tensor:
        return torch.from_numpy(request.infer(arrays)[0].copy())

    return fn


def row(
    name: str, sides: dict[str, Callable[[], torch.Tensor]], meter: Meter, repeats: int
) -> None:
    """Warm-up (outputs compared with ours), then ``repeats`` alternating rounds."""
    ref = None
    rel = {}
    for side, fn in sides.items():
        out = meter(fn)[2].float()
        if ref is None:
            ref = out
        rel[side] = float((out - ref).abs().max() / ref.abs().max())
    times, peaks = alternate(name, sides, meter, repeats)
    base = statistics.median(times["ours"])
    for side in sides:
        med = statistics.median(times[side])
        peak = f"{max(peaks[side]) / 2**30:.2f}" if peaks[side] else "-"
        print(
            f"| {name} | {side} | {med:.3f} | {med / base:.2f}x | {rel[side]:.1e} | {peak} |",
            flush=True,
        )


def ov_generation(
    compiled: dict[str, Any], pipe: Any, size: int, steps: int, seed: int
) -> Callable[[], torch.Tensor]:
    """One generation of ``PROMPT`` with OpenVINO's compiled ``text`` / ``unet`` / ``vae``
    models of one precision, in diffusers' loop driven by its DPM++ 2M scheduler configured
    as ``pipe``'s (``bench/_sd15_loop.py``); pixels in [0, 1]."""
    from diffusers import DPMSolverMultistepScheduler

    requests = {name: m.create_infer_request() for name, m in compiled.items()}
    scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    tokenize = _sd15_loop.hf_tokenize(pipe.tokenizer)

    def infer(name: str, *inputs: torch.Tensor) -> torch.Tensor:
        out = requests[name].infer([t.numpy() for t in inputs])[0]
        return torch.from_numpy(out.copy())  # the request reuses its output buffer

    def fn() -> torch.Tensor:
        return _sd15_loop.generate_with_scheduler(
            lambda ids: infer("text", ids),
            lambda x, t, c: infer("unet", x, t, c),
            lambda z: infer("vae", z),
            tokenize=tokenize,
            scheduler=scheduler,
            scaling_factor=pipe.vae.config.scaling_factor,
            prompt=PROMPT,
            size=size,
            steps=steps,
            seed=seed,
        )

    return fn


def generation_row(
    name: str, sides: dict[str, Callable[[], torch.Tensor]], meter: Meter, repeats: int
) -> None:
    """A first call each (timed on its own; its image compared with ours), then ``repeats``
    alternating rounds (median)."""
    first: dict[str, float] = {}
    diff: dict[str, float] = {}
    first_peaks: dict[str, int | None] = {}
    ref = None
    for side, fn in sides.items():
        first[side], first_peaks[side], image = meter(fn)
        image = image.float()
        ref = image if ref is None else ref
        diff[side] = float((image - ref).abs().max())
        del image
        print(f"  {name}: {side} first call {first[side]:.2f} s", file=sys.stderr, flush=True)
    times, peaks = alternate(name, sides, meter, repeats, lambda i: f" call {i + 2}")
    for side, peak in first_peaks.items():
        if peak is not None:
            peaks[side].append(peak)
    base = statistics.median(times["ours"])
    print(
        f"| case | side | FIRST call s | median of the {repeats} further call(s) s "
        "| median / ours | max abs pixel diff vs ours (first calls' images) | peak RSS GiB |\n"
        "|---|---|---:|---:|---:|---:|---:|"
    )
    for side in sides:
        med = statistics.median(times[side])
        peak = f"{max(peaks[side]) / 2**30:.2f}" if peaks[side] else "-"
        print(
            f"| {name} | {side} | {first[side]:.2f} | {med:.2f} | {med / base:.2f}x "
            f"| {diff[side]:.1e} | {peak} |",
            flush=True,
        )


def pipeline_rows(args: argparse.Namespace, meter: Meter) -> None:
    """The ``pipeline`` rows (module docstring), one per ``--pipeline-sizes`` side."""
    parts = _sd15.build_ours(args.tiny)
    model = _sd15.latent_diffusion(parts["unet"], parts["vae"], parts["text"])
    pipe = _sd15.diffusers_pipeline(model, "DPMSolverMultistepScheduler")
    ids = _sd15_loop.hf_tokenize(pipe.tokenizer)(["", PROMPT])
    text, secs = convert(_TextOut(pipe.text_encoder).eval(), (ids,))
    print(f"- pipeline text encoder: convert_model {secs:.1f} s")
    text_c = compile_both(text, [list(ids.shape)], "pipeline text encoder", args.threads)
    del text
    context_dim = model.unet.config.context_dim
    # what noisecraft.load(dtype="bf16") runs: the U-Net in bf16, text encoder and VAE fp32
    model_bf16 = model.replace(unet=copy.deepcopy(model.unet).to(torch.bfloat16))
    for size in args.pipeline_sizes:
        x = torch.zeros(2, 4, size // 8, size // 8)
        t = torch.full((2,), 500.0)
        ctx = torch.zeros(2, 77, context_dim)
        compiled: dict[str, dict[str, Any]] = {"text": text_c}
        for name, wrapper, example in (
            ("unet", _UNetOut(pipe.unet), (x, t, ctx)),
            ("vae", _DecodeOut(pipe.vae), (x[:1],)),
        ):
            what = f"pipeline {'U-Net' if name == 'unet' else 'VAE decode'} {size}²"
            ov_model, secs = convert(wrapper.eval(), example)
            print(f"- {what}: convert_model {secs:.1f} s")
            shapes = [list(e.shape) for e in example]
            compiled[name] = compile_both(ov_model, shapes, what, args.threads)
            del ov_model
        sides = {
            "ours": lambda size=size: _our_generation(
                model, args, size, sampler="dpmpp_2m", steps=args.steps
            ),
            "ours bf16": lambda size=size: _our_generation(
                model_bf16, args, size, sampler="dpmpp_2m", steps=args.steps
            ),
            "diffusers": lambda size=size: _diffusers_generation(pipe, size, args.steps, args.seed),
            **{
                side: ov_generation(
                    {k: v[side] for k, v in compiled.items()}, pipe, size, args.steps, args.seed
                )
                for side in SIDES[2:]
            },
        }
        name = f"generation {size}², {args.steps} DPM++ 2M steps, CFG 7.5 + decode"
        generation_row(name, sides, meter, args.pipeline_repeats)
        del sides, compiled


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default="256", help="comma-separated image sizes")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="narrow layouts (development)")
    ap.add_argument(
        "--threads", type=int, default=0, help="CPU threads of every side (0: each one's default)"
    )
    ap.add_argument("--only", choices=("unet", "vae", "text", "pipeline"), action="append")
    ap.add_argument(
        "--pipeline-sizes",
        default="",
        help="comma-separated sides of whole generations (the pipeline rows; none by default)",
    )
    ap.add_argument(
        "--pipeline-repeats", type=int, default=1, help="timed generations after the first"
    )
    ap.add_argument("--steps", type=int, default=20, help="sampling steps of a generation")
    ap.add_argument(
        "--no-trim",
        action="store_true",
        help="no malloc_trim before each call (torch's freed heap stays mapped, as in a run)",
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of the generations")
    args = ap.parse_args()
    args.pipeline_sizes = [int(s) for s in args.pipeline_sizes.split(",") if s]
    parts = args.only or ["unet", "vae", "text"] + (["pipeline"] if args.pipeline_sizes else [])
    if "pipeline" in parts and not args.pipeline_sizes:
        ap.error("--only pipeline needs --pipeline-sizes, e.g. --pipeline-sizes 512")
    if args.pipeline_repeats < 1:
        ap.error("--pipeline-repeats must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    print(
        f"loadavg before: {loadavg()}; torch {torch.__version__}, openvino {ov.get_version()}, "
        f"{torch.get_num_threads()} torch threads, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}\n"
    )
    meter = Meter("cpu", trim=not args.no_trim)
    g = torch.Generator().manual_seed(0)
    cfg = _sd15.configs(args.tiny)
    header = "| case | side | median s | time / ours | rel diff vs ours | peak RSS GiB |"
    if "unet" in parts:
        ours = _sd15.build_ours(args.tiny, parts=("unet",))["unet"]
        ours_bf16 = copy.deepcopy(ours).to(torch.bfloat16)  # noisecraft.load(dtype="bf16")
        theirs = _sd15.diffusers_unet(ours)
        wrapper = _UNetOut(theirs).eval()
        for size in sizes:
            x = torch.randn(2, 4, size // 8, size // 8, generator=g)
            t = torch.full((2,), 500.0)
            ctx = torch.randn(2, 77, cfg.unet.context_dim, generator=g)
            model, secs = convert(wrapper, (x, t, ctx))
            print(
                f"- U-Net {size}²: convert_model {secs:.1f} s; "
                f"RSS {_status('VmRSS') / 2**30:.2f} GiB"
            )
            compiled = compile_both(
                model, [list(x.shape), list(t.shape), list(ctx.shape)], "U-Net", args.threads
            )
            del model
            sides = {
                "ours": lambda x=x, t=t, c=ctx: ours(x, t, context=c),
                "ours bf16": lambda x=x, t=t, c=ctx: ours_bf16(
                    x.bfloat16(), t, context=c.bfloat16()
                ).float(),
                "diffusers": lambda x=x, t=t, c=ctx: theirs(x, t, encoder_hidden_states=c).sample,
                **{k: ov_call(v, (x, t, ctx)) for k, v in compiled.items()},
            }
            print(header + "\n|---|---|---:|---:|---:|---:|")
            row(f"U-Net {size}² batch 2", sides, meter, args.repeats)
            del sides, compiled
        del ours, ours_bf16, theirs, wrapper
    if "vae" in parts:
        ours = _sd15.build_ours(args.tiny, parts=("vae",))["vae"]
        ours_bf16 = copy.deepcopy(ours).to(torch.bfloat16)  # measured; the VAE ships fp32
        theirs = _sd15.diffusers_vae(ours)
        wrapper = _DecodeOut(theirs).eval()
        for size in sizes:
            z = torch.randn(1, 4, size // 8, size // 8, generator=g)
            model, secs = convert(wrapper, (z,))
            print(f"- VAE decode {size}²: convert_model {secs:.1f} s")
            compiled = compile_both(model, [list(z.shape)], "VAE decode", args.threads)
            sides = {
                "ours": lambda z=z: ours.decode(z),
                "ours bf16": lambda z=z: ours_bf16.decode(z.bfloat16()).float(),
                "diffusers": lambda z=z: theirs.decode(z).sample,
                **{k: ov_call(v, (z,)) for k, v in compiled.items()},
            }
            print(header + "\n|---|---|---:|---:|---:|---:|")
            row(f"VAE decode {size}²", sides, meter, args.repeats)
            del sides, compiled, model
        del ours, ours_bf16, theirs, wrapper
    if "text" in parts:
        ours = _sd15.build_ours(args.tiny, parts=("text",))["text"]
        tok = CLIPTokenizer.default()
        theirs = _sd15.transformers_text_encoder(ours, tok)
        ids = tok([PROMPT, ""])
        model, secs = convert(_TextOut(theirs).eval(), (ids,))
        print(f"- text encoder: convert_model {secs:.1f} s")
        compiled = compile_both(model, [list(ids.shape)], "text encoder", args.threads)
        sides = {
            "ours": lambda: ours(ids).last_hidden_state,
            "diffusers": lambda: theirs(ids).last_hidden_state,
            **{k: ov_call(v, (ids,)) for k, v in compiled.items()},
        }
        print(header + "\n|---|---|---:|---:|---:|---:|")
        row("text encoder 2 x 77 tokens", sides, meter, args.repeats)
        del sides, compiled, model, ours, theirs
    if "pipeline" in parts:
        pipeline_rows(args, meter)
    print(f"\nloadavg after: {loadavg()}")


if __name__ == "__main__":
    main()
