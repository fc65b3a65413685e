"""Load on loopback: many clients of the HTTP server (docs/server.md, section "Load").

``noisecraft serve`` runs in a child process on the shipped mini SD (``mnist-text``, 32x32);
``--clients`` threads each send ``--requests`` txt2img requests one after another (a 429,
queue full, is waited out for its ``Retry-After`` and sent again, as a client would), then a
burst of ``--burst`` requests sent at the same instant overfills the queue (no retries: each
answer is counted). Printed (and with ``--json`` one JSON line):

* throughput (images per second over the clients' phase) and p50 / p95 latency of the
  answered requests (one HTTP request each, queue wait included);
* counts of answers by status: 0 answers 5xx and every queue-full answer a 429 is the goal;
* lost images: every image of a 200 answer must also be in the server's outputs folder (the
  file ``info.files`` names, same pixels), and the folder must hold no other image;
* RSS of the server process (``VmRSS`` of /proc/PID/status, sampled every 0.2 s): after the
  first image (model loaded), peak, and at the end.

    flock /work/cpu.lock .venv/bin/python bench/server_load.py   # 16 clients x 25 requests

:func:`run_load` is the measurement; tests/test_server_load.py runs a small one against a
server in the test's own process.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

TIMEOUT = 300.0  # seconds one HTTP request may take before it counts as lost


@dataclass
class Tally:
    """What the clients saw: answers by status, latencies of answered requests (s), images
    answered (base64 PNG, the outputs-folder path the server names) and request errors."""

    statuses: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    images: list[tuple[str, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, status: int, seconds: float, body: dict | None) -> None:
        with self.lock:
            self.statuses[status] += 1
            if status == 200 and body is not None:
                self.latencies.append(seconds)
                files = json.loads(body["info"]).get("files", [])
                images = body["images"]
                if len(files) != len(images):
                    self.errors.append(f"{len(images)} images but {len(files)} files named")
                self.images.extend(zip(images, files, strict=False))


def post(url: str, path: str, body: dict) -> tuple[int, dict | None, str | None]:
    """(status, JSON body or None, Retry-After) of one POST; raises on a network error."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=TIMEOUT)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        answer = conn.getresponse()
        data = answer.read()
        try:
            parsed = json.loads(data) if data else None
        except ValueError:
            parsed = None
        return answer.status, parsed, answer.getheader("Retry-After")
    finally:
        conn.close()


def _request(i: int, steps: int) -> dict:
    return {"prompt": f"a handwritten {i % 10}", "steps": steps, "seed": i, "cfg_scale": 5}


def client(url: str, tally: Tally, first: int, count: int, steps: int, retry: bool) -> None:
    """Send ``count`` txt2img requests one after another (waiting out 429s if ``retry``)."""
    for i in range(first, first + count):
        while True:
            start = time.perf_counter()
            try:
                status, body, retry_after = post(url, "/sdapi/v1/txt2img", _request(i, steps))
            except (OSError, http.client.HTTPException) as exc:
                with tally.lock:
                    tally.errors.append(f"request {i}: {type(exc).__name__}: {exc}")
                break
            tally.add(status, time.perf_counter() - start, body)
            if status != 429 or not retry:
                break
            time.sleep(min(float(retry_after or 1), 1.0))


def run_clients(url: str, tally: Tally, clients: int, requests: int, steps: int, retry: bool):
    threads = [
        threading.Thread(target=client, args=(url, tally, c * requests, requests, steps, retry))
        for c in range(clients)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def check_outputs(outputs: Path, tally: Tally) -> list[str]:
    """Lost images: an answered image whose file is missing or differs; files nobody got."""
    lost = []
    named = set()
    for b64, rel in tally.images:
        path = outputs / rel
        named.add(path.resolve())
        answered = np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))
        if not path.is_file():
            lost.append(f"missing {rel}")
        elif not np.array_equal(np.asarray(Image.open(path)), answered):
            lost.append(f"differs {rel}")
    extra = [p for p in outputs.rglob("*.png") if p.resolve() not in named]
    return lost + [f"not answered {p.relative_to(outputs)}" for p in extra]


def rss_mib(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class RssSampler(threading.Thread):
    """Samples the RSS of ``pid`` every ``every`` seconds until stopped; ``peak`` in MiB."""

    def __init__(self, pid: int | str, every: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.every, self.peak = pid, every, 0.0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, rss_mib(self.pid))
            self.done.wait(self.every)

    def stop(self) -> float:
        self.done.set()
        self.join()
        return self.peak


def run_load(
    url: str,
    outputs: Path,
    *,
    clients: int,
    requests: int,
    burst: int,
    steps: int,
    burst_steps: int,
    pid: int | str = "self",
) -> dict:
    """The measurement (module docstring) against the server at ``url`` that saves into
    ``outputs`` and runs as process ``pid``; the numbers as a dict."""
    warm = Tally()
    client(url, warm, 10**6, 1, steps, retry=True)  # loads the model
    if warm.statuses[200] != 1:
        raise RuntimeError(f"the first request failed: {warm.statuses} {warm.errors}")
    rss_loaded = rss_mib(pid)
    sampler = RssSampler(pid)
    sampler.start()
    load = Tally()
    start = time.perf_counter()
    run_clients(url, load, clients, requests, steps, retry=True)
    seconds = time.perf_counter() - start
    burst_tally = Tally()
    barrier = threading.Barrier(burst)

    def burst_one(i: int) -> None:
        barrier.wait()
        client(url, burst_tally, 2 * 10**6 + i, 1, burst_steps, retry=False)

    threads = [threading.Thread(target=burst_one, args=(i,)) for i in range(burst)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rss_peak = sampler.stop()
    everything = Tally()
    for t in (warm, load, burst_tally):
        everything.images += t.images
    lat = np.array(load.latencies) if load.latencies else np.zeros(1)
    return {
        "clients": clients,
        "requests": requests,
        "steps": steps,
        "seconds": round(seconds, 2),
        "images_per_s": round(len(load.images) / seconds, 2),
        "p50_s": round(float(np.percentile(lat, 50)), 3),
        "p95_s": round(float(np.percentile(lat, 95)), 3),
        "load_statuses": dict(load.statuses),
        "load_images": len(load.images),
        "burst": burst,
        "burst_statuses": dict(burst_tally.statuses),
        "errors": load.errors + burst_tally.errors,
        "lost": check_outputs(outputs, everything),
        "rss_loaded_mib": round(rss_loaded, 1),
        "rss_peak_mib": round(rss_peak, 1),
        "rss_end_mib": round(rss_mib(pid), 1),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(outputs: Path, queue_size: int, port: int) -> subprocess.Popen:
    """``noisecraft serve`` in a child process, once it answers."""
    argv = [sys.executable, "-m", "noisecraft", "serve", "--model", "mnist-text"]
    argv += ["--port", str(port), "--outputs-dir", str(outputs), "--queue-size", str(queue_size)]
    child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise RuntimeError(f"noisecraft serve exited: {child.stderr.read().decode()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return child
        except OSError:
            time.sleep(0.2)
    child.kill()
    raise RuntimeError("noisecraft serve did not start in 120 s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=25, help="requests per client")
    ap.add_argument("--burst", type=int, default=32, help="requests sent at one instant")
    ap.add_argument("--steps", type=int, default=20, help="steps of each client request")
    ap.add_argument("--burst-steps", type=int, default=20)
    ap.add_argument("--queue-size", type=int, default=8, help="the server's (its default: 8)")
    ap.add_argument("--json", action="store_true", help="also print the numbers as JSON")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="noisecraft-load-") as tmp:
        outputs = Path(tmp) / "outputs"
        port = free_port()
        child = serve(outputs, args.queue_size, port)
        try:
            out = run_load(
                f"http://127.0.0.1:{port}",
                outputs,
                clients=args.clients,
                requests=args.requests,
                burst=args.burst,
                steps=args.steps,
                burst_steps=args.burst_steps,
                pid=child.pid,
            )
        finally:
            child.terminate()
            child.wait(30)
    out["queue_size"] = args.queue_size
    out["loadavg"] = Path("/proc/loadavg").read_text().strip()
    out["threads"] = os.environ.get("OMP_NUM_THREADS", "default")
    print(
        f"{out['clients']} clients x {out['requests']} requests ({out['steps']} steps, 32x32): "
        f"{out['load_images']} images in {out['seconds']} s = {out['images_per_s']} images/s; "
        f"latency p50 {out['p50_s']} s, p95 {out['p95_s']} s; answers {out['load_statuses']}"
    )
    print(f"burst of {out['burst']} (queue {out['queue_size']}): answers {out['burst_statuses']}")
    print(f"lost images: {len(out['lost'])} {out['lost'][:5]}; errors: {out['errors'][:5]}")
    print(
        f"server RSS: {out['rss_loaded_mib']} MiB after the first image, "
        f"peak {out['rss_peak_mib']} MiB, end {out['rss_end_mib']} MiB; loadavg {out['loadavg']}"
    )
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
