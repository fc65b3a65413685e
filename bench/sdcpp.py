"""stable-diffusion.cpp against noisecraft on the same SD 1.5-architecture weights (CPU).

stable-diffusion.cpp (C++ / ggml) is the other CPU runtime the performance issue names. It is
not a Python package we depend on: ``--build DIR`` (a bench-only step, about 10 minutes on 2
cores) downloads the source of ``stable-diffusion-cpp-python`` 0.4.7 from PyPI (``pip
download --no-binary``: its sdist vendors stable-diffusion.cpp and ggml) and builds the
``sd-cli`` program with ``-march=native`` (``GGML_NATIVE=ON``), printing its path.

The weights: ``bench/_sd15.py``'s random SD 1.5-architecture model written by OUR converter
as an original single file (``--file-dtype fp32|fp16``; sd.cpp reads it as users' files), so
both programs run the same network on the same tensors.

Per-phase rows (``--sizes``): sd.cpp runs ``--steps`` Euler steps with CFG 7.5 once per size
(``-v``; its own timings: ``get_learned_condition``, ``sampling completed`` / steps,
``decode_first_stage``); ours, in this process on the same file: the text encoder on
[prompt, ""], one U-Net pass with batch 2 (one CFG step), one VAE decode (median of
``--repeats``). sd.cpp computes a CFG step as two batch-1 passes; a step is a step.

End-to-end rows (``--e2e-size``, ``--e2e-steps``; ``--e2e-size 0`` leaves them out): whole
processes, loading included: ``sd-cli`` against ``noisecraft generate`` exact (Euler, same
steps), ``--fast`` and ``--low-memory int8 --tiling``; wall time and the process's peak RSS
(``os.wait4``).

    python bench/sdcpp.py --build /tmp/sdcpp                 # once; prints the sd-cli path
    python bench/sdcpp.py --sd-cli /tmp/sdcpp/.../sd-cli     # the table of docs/performance.md
    python bench/sdcpp.py --sd-cli ... --flash --file-dtype fp16   # sd.cpp's fastest settings

``--write docs/performance.md --block NAME`` replaces that page's block NAME (the markers of
``bench/sd_speed.py``) with this run's table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

SDIST = "stable-diffusion-cpp-python==0.4.7"
PROMPT = "a photograph of an astronaut riding a horse"
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from sd_speed import _ints, _load, write_block  # noqa: E402  (standard library only)

NOISECRAFT = [sys.executable, "-m", "noisecraft"]


def build(folder: Path) -> Path:
    """Download the sdist into ``folder``, build its ``sd-cli`` and link it as
    ``folder/sd-cli``; return that path."""
    folder.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    subprocess.run([*pip, SDIST, "-d", str(folder)], check=True)
    archive = next(folder.glob("stable_diffusion_cpp_python-*.tar.gz"))
    with tarfile.open(archive) as tar:
        tar.extractall(folder, filter="data")
    source = folder / archive.name.removesuffix(".tar.gz") / "vendor" / "stable-diffusion.cpp"
    out = source / "build"
    flags = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DSD_WEBP=OFF", "-DSD_WEBM=OFF"]
    subprocess.run(["cmake", "-S", str(source), "-B", str(out), *flags], check=True)
    jobs = str(os.cpu_count() or 2)
    subprocess.run(["cmake", "--build", str(out), "-j", jobs, "--target", "sd-cli"], check=True)
    link = folder / "sd-cli"  # a short name for --sd-cli (what `make bench-sdcpp` runs)
    link.unlink(missing_ok=True)
    link.symlink_to((out / "bin" / "sd-cli").resolve())
    return link


def run_process(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, int, str]:
    """Run ``argv``; return its wall time, peak RSS in bytes (``os.wait4``) and output.

    Linux starts a child's peak RSS at its parent's RSS at the fork (the forked image counts
    until ``exec``), so call this from a small process, as :func:`main` does."""
    with tempfile.TemporaryFile("w+") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        text = log.read()
    if proc.returncode:
        tail = "\n".join(text.splitlines()[-15:])
        raise SystemExit(f"{argv[0]} failed (exit {proc.returncode}):\n{tail}")
    return wall, usage.ru_maxrss * 1024, text


def sdcpp_argv(args: argparse.Namespace, model: Path, size: int, steps: int, out: Path) -> list:
    argv = [str(args.sd_cli), "-m", str(model), "-p", PROMPT, "-H", str(size), "-W", str(size)]
    argv += ["--steps", str(steps), "--cfg-scale", "7.5", "--sampling-method", "euler"]
    argv += ["-s", "0", "-t", str(args.threads), "-o", str(out), "-v"]
    argv += ["--type", args.type] if args.type else []
    return argv + (["--fa"] if args.flash else [])


_SECONDS = r"taking ([0-9.]+)\s*(ms|s)"


def parse_sdcpp_log(text: str, steps: int) -> dict[str, float]:
    """sd.cpp's own phase timings (seconds) from its ``-v`` log: text encoding, one sampling
    step (the sampling time over ``steps``) and the VAE decode."""

    def seconds(label: str) -> float:
        m = re.search(label + r".*?" + _SECONDS, text)
        if m is None:
            raise SystemExit(f"no '{label}' timing in sd.cpp's output; is this sd-cli -v?")
        return float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)

    return {
        "text": seconds("get_learned_condition completed"),
        "step": seconds("sampling completed") / steps,
        "decode": seconds("decode_first_stage completed"),
    }


def ours_phases(model_path: Path, size: int, repeats: int) -> dict[str, float]:
    """Our text encoder on [prompt, ""], one CFG U-Net pass (batch 2), one VAE decode: medians."""
    import torch

    from noisecraft.io.formats.auto import load_any

    torch.set_grad_enabled(False)
    model = load_any(model_path)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, size // 8, size // 8, generator=g)
    t = torch.full((2,), 500)
    ctx = model.encode_prompt([PROMPT, ""])
    calls = {
        "text": lambda: model.encode_prompt([PROMPT, ""]),
        "step": lambda: model.unet(z, t, context=ctx),
        "decode": lambda: model.decode(z[:1]),
    }
    times: dict[str, list[float]] = {k: [] for k in calls}
    for name, fn in calls.items():
        fn()  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def end_to_end(args: argparse.Namespace, model: Path, folder: Path) -> list[dict]:
    size, steps = args.e2e_size, args.e2e_steps
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    base = [*NOISECRAFT, "generate", PROMPT, "--model", str(model), "--size", f"{size}x{size}"]
    base += ["--cfg", "7.5", "--seed", "0"]
    ours = {
        f"exact, euler {steps} steps": ["--sampler", "euler", "--steps", str(steps)],
        "--fast (10 DPM++ 2M Karras steps, DeepCache, int8 Linear)": ["--fast"],
        f"--low-memory int8 --tiling, euler {steps} steps": [
            "--low-memory",
            "int8",
            "--tiling",
            "--sampler",
            "euler",
            "--steps",
            str(steps),
        ],
    }
    print(f"[end to end {size}²] sd.cpp, load {_load()}", file=sys.stderr, flush=True)
    theirs_s, theirs_rss, _ = run_process(
        sdcpp_argv(args, model, size, steps, folder / "sdcpp.png")
    )
    rows = []
    for i, (name, extra) in enumerate(ours.items()):
        print(f"[end to end {size}²] ours {name}, load {_load()}", file=sys.stderr, flush=True)
        wall, rss, _ = run_process([*base, *extra, "--out", str(folder / f"ours{i}.png")], env)
        rows.append(
            {
                "case": f"whole command {size}², ours {name} / sd.cpp euler {steps} steps",
                "ours": wall,
                "theirs": theirs_s,
                "ours_rss": rss,
                "theirs_rss": theirs_rss,
            }
        )
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"Command: `{meta['command']}`",
        "",
        f"- {meta['date']}; sd.cpp from {SDIST} (sd-cli, -march=native), {meta['threads']} "
        f"threads on both sides; sd.cpp {'with' if meta['flash'] else 'without'} --fa, "
        f"weight type {meta['type'] or 'its default'}, "
        f"{meta['file_dtype']} single file (written by noisecraft's converter); load average "
        f"before / after {meta['load_before']} / {meta['load_after']}; wall {meta['wall_min']:.1f}"
        " min.",
        "",
        "| case | ours s | sd.cpp s | ratio (sd.cpp / ours) | peak RSS ours GB | peak RSS "
        "sd.cpp GB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mem = [f"{r[k] / 1e9:.2f}" if r.get(k) else "-" for k in ("ours_rss", "theirs_rss")]
        lines.append(
            f"| {r['case']} | {r['ours']:.2f} | {r['theirs']:.2f} | "
            f"**{r['theirs'] / r['ours']:.2f}×** | {mem[0]} | {mem[1]} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--build", type=Path, help="download and build sd-cli in this folder, exit")
    p.add_argument("--sd-cli", type=Path, help="the sd-cli binary (see --build)")
    p.add_argument("--model", type=Path, help="SD 1.5 single file (default: write a random one)")
    p.add_argument("--file-dtype", choices=("fp32", "fp16"), default="fp32")
    p.add_argument("--sizes", type=_ints, default=[256, 512], help="per-phase image sides")
    p.add_argument("--steps", type=int, default=2, help="sd.cpp steps per per-phase run")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per phase (ours)")
    p.add_argument("--e2e-size", type=int, default=512, help="0: no end-to-end rows")
    p.add_argument("--e2e-steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--flash", action="store_true", help="sd.cpp with --fa (flash attention)")
    p.add_argument("--type", help="sd.cpp's weight type (e.g. q8_0: its smallest-memory run)")
    p.add_argument("--write", type=Path, help="replace a block of this Markdown file")
    p.add_argument("--block", default="sdcpp")
    p.add_argument("--_phases", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._phases:  # child: ours_phases(file, size, repeats) with threads, as JSON
        import torch

        file, size, repeats, threads = args._phases
        torch.set_num_threads(int(threads))
        print(json.dumps(ours_phases(Path(file), int(size), int(repeats))))
        return
    if args.build:
        print(build(args.build))
        return
    if args.sd_cli is None or not args.sd_cli.is_file():
        p.error("give --sd-cli PATH (build it once with --build DIR)")
    # this process starts every measured program and stays small: a child's peak RSS
    # (os.wait4) starts from its parent's at the fork, so nothing big is loaded here
    t0, load_before = time.time(), _load()
    with tempfile.TemporaryDirectory(dir=os.environ.get("NOISECRAFT_BENCH_TMP")) as tmp:
        folder = Path(tmp)
        model = args.model
        if model is None:
            model = folder / "sd15.safetensors"
            print(f"writing {model} ({args.file_dtype})", file=sys.stderr, flush=True)
            build_file = [sys.executable, str(HERE / "memory.py"), "--_build", str(model)]
            run_process([*build_file, "--file-dtype", args.file_dtype])
        rows = []
        for size in args.sizes:
            print(f"[{size}²] sd.cpp, load {_load()}", file=sys.stderr, flush=True)
            _, _, log = run_process(sdcpp_argv(args, model, size, args.steps, folder / "a.png"))
            theirs = parse_sdcpp_log(log, args.steps)
            print(f"[{size}²] ours, load {_load()}", file=sys.stderr, flush=True)
            phases = [sys.executable, __file__, "--_phases", str(model), str(size)]
            _, _, out = run_process([*phases, str(args.repeats), str(args.threads)])
            ours = json.loads(out.strip().splitlines()[-1])
            names = {
                "text": "text encoder, prompt + negative",
                "step": f"one CFG step {size}² (ours: U-Net batch 2)",
                "decode": f"VAE decode {size}²",
            }
            for key, name in names.items():
                if key == "text" and size != args.sizes[0]:
                    continue
                rows.append({"case": name, "ours": ours[key], "theirs": theirs[key]})
        if args.e2e_size:
            rows += end_to_end(args, model, folder)
    meta = {
        "command": "python bench/sdcpp.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "threads": args.threads,
        "flash": args.flash,
        "type": args.type,
        "file_dtype": args.file_dtype,
        "load_before": load_before,
        "load_after": _load(),
        "wall_min": (time.time() - t0) / 60,
    }
    block = markdown(rows, meta)
    print(block)
    if args.write:
        write_block(args.write, block, args.block)


if __name__ == "__main__":
    main()
