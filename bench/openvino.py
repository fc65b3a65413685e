"""OpenVINO against noisecraft and diffusers on SD 1.5's architecture (random weights).

Runs in its own venv (``make bench-openvino-venv``: ``.openvino-venv`` with torch 2.13.0,
diffusers 0.42.1, transformers 5.23.0, openvino 2026.4.1 and noisecraft without deps).

The diffusers / transformers modules share noisecraft's random weights (``bench/_sd15.py``);
OpenVINO converts THOSE modules (``openvino.convert_model`` on a small wrapper that returns a
tensor) and compiles them for the CPU twice: in float32 (``INFERENCE_PRECISION_HINT: f32``)
and in OpenVINO's default precision for this CPU (bf16 where the CPU has bf16 instructions,
else f32; the precision it picked is printed). Each converted model is reshaped to the
row's static input shapes before compiling (OpenVINO's fast path).

In one process the calls ALTERNATE (ours, diffusers, OpenVINO f32, OpenVINO default, ours,
...) after one untimed warm-up call each, whose outputs are compared with ours; each row
reports the medians, ``ratio`` = that side's median / ours (above 1 we are faster), ``rel`` =
max |side - ours| / max |ours|, and the peak RSS during that side's calls (``VmHWM`` reset
before each call, ``bench/sd_speed.py``'s meter). The RSS includes every copy alive in the
process: the shared torch weights and each compiled OpenVINO model's own weights.
Conversion and compile times are printed per model.

Rows: U-Net at ``--sizes`` (batch 2 = one CFG step, 77-token context), VAE decode at
``--sizes`` (batch 1), text encoder (2 x 77 tokens).

    .openvino-venv/bin/python bench/openvino.py --sizes 256          # minutes
    .openvino-venv/bin/python bench/openvino.py --sizes 256,512      # the full table
    .openvino-venv/bin/python bench/openvino.py --tiny --sizes 64    # develop
"""

from __future__ import annotations

import argparse
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
from sd_speed import PROMPT, Meter, _status  # noqa: E402

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


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "n/a"


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
    times: dict[str, list[float]] = {s: [] for s in sides}
    peaks: dict[str, list[int]] = {s: [] for s in sides}
    for _ in range(repeats):
        for side, fn in sides.items():
            dt, peak, out = meter(fn)
            del out
            times[side].append(dt)
            if peak is not None:
                peaks[side].append(peak)
            print(f"  {name}: {side} {dt:.3f} s", file=sys.stderr, flush=True)
    base = statistics.median(times["ours"])
    for side in sides:
        med = statistics.median(times[side])
        peak = f"{max(peaks[side]) / 2**30:.2f}" if peaks[side] else "-"
        print(
            f"| {name} | {side} | {med:.3f} | {med / base:.2f}x | {rel[side]:.1e} | {peak} |",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default="256", help="comma-separated image sizes")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="narrow layouts (development)")
    ap.add_argument(
        "--threads", type=int, default=0, help="CPU threads of every side (0: each one's default)"
    )
    ap.add_argument("--only", choices=("unet", "vae", "text"), action="append")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    parts = args.only or ["unet", "vae", "text"]
    print(
        f"loadavg before: {loadavg()}; torch {torch.__version__}, openvino {ov.get_version()}, "
        f"{torch.get_num_threads()} torch threads, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}\n"
    )
    meter = Meter("cpu")
    g = torch.Generator().manual_seed(0)
    cfg = _sd15.configs(args.tiny)
    header = "| case | side | median s | time / ours | rel diff vs ours | peak RSS GiB |"
    if "unet" in parts:
        ours = _sd15.build_ours(args.tiny, parts=("unet",))["unet"]
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
                "diffusers": lambda x=x, t=t, c=ctx: theirs(x, t, encoder_hidden_states=c).sample,
                **{k: ov_call(v, (x, t, ctx)) for k, v in compiled.items()},
            }
            print(header + "\n|---|---|---:|---:|---:|---:|")
            row(f"U-Net {size}² batch 2", sides, meter, args.repeats)
            del sides, compiled
        del ours, theirs, wrapper
    if "vae" in parts:
        ours = _sd15.build_ours(args.tiny, parts=("vae",))["vae"]
        theirs = _sd15.diffusers_vae(ours)
        wrapper = _DecodeOut(theirs).eval()
        for size in sizes:
            z = torch.randn(1, 4, size // 8, size // 8, generator=g)
            model, secs = convert(wrapper, (z,))
            print(f"- VAE decode {size}²: convert_model {secs:.1f} s")
            compiled = compile_both(model, [list(z.shape)], "VAE decode", args.threads)
            sides = {
                "ours": lambda z=z: ours.decode(z),
                "diffusers": lambda z=z: theirs.decode(z).sample,
                **{k: ov_call(v, (z,)) for k, v in compiled.items()},
            }
            print(header + "\n|---|---|---:|---:|---:|---:|")
            row(f"VAE decode {size}²", sides, meter, args.repeats)
            del sides, compiled, model
        del ours, theirs, wrapper
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
    print(f"\nloadavg after: {loadavg()}")


if __name__ == "__main__":
    main()
