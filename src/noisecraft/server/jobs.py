"""One worker per device and a bounded queue of jobs; interrupt, skip and progress.

Every request that touches a model (generation, a model switch) is a :class:`Job` run by the
one worker thread of the server's device, in the order it came; so two requests never mix
models and a model switch waits for the jobs before it. At most ``size`` jobs wait behind
the running one: one more is refused (:class:`QueueFullError`, HTTP 429 with Retry-After).

A running job reports each sampler step (the engine's ``callback``) to :meth:`Job.on_step`,
which keeps the progress and the latest x0 estimate (the preview) and raises
:class:`Interrupted` or :class:`Skipped` there when a client asked for it: sampling stops
mid-run, in the worker, without touching the engine.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from noisecraft.errors import NoisecraftError


class Stop(Exception):  # noqa: N818 -- control flow, not an error
    """Raised in the sampler callback to leave a sampling run early."""


class Interrupted(Stop):
    """The client asked to stop the job (POST /interrupt)."""


class Skipped(Stop):
    """The client asked to skip the current batch (POST /skip)."""


class QueueFullError(NoisecraftError):
    """The queue is full; ``retry_after`` seconds is a guess of when it has room."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class Job:
    """One unit of work: ``fn(job)`` runs on the worker; ``future`` holds its result.

    The runner sets ``total`` (steps of the whole job, all batches) and ``preview_fn``
    (latent -> PIL image), and passes :meth:`on_step` as the engine's callback."""

    def __init__(self, name: str, fn: Callable[[Job], Any]):
        self.name = name
        self.fn = fn
        self.future: Future = Future()
        self.created = time.time()
        self.started: float | None = None
        self.interrupted = False
        self.skipped = False
        self.step = 0  # steps done over the whole job
        self.total = 0
        self.batch_no = 0
        self.batch_count = 1
        self.latest: Any = None  # the last x0 estimate (for the preview)
        self.preview_fn: Callable[[Any], Any] | None = None

    def on_step(self, d: dict, offset: int = 0) -> None:
        """The engine's per-step callback: progress, preview source, interrupt / skip."""
        self.step = offset + int(d.get("step", self.step + 1))
        self.latest = d.get("denoised")
        self.check()

    def check(self) -> None:
        """Raise :class:`Interrupted` / :class:`Skipped` if a client asked for it."""
        if self.interrupted:
            raise Interrupted()
        if self.skipped:
            self.skipped = False  # skip drops one batch; the next one runs
            raise Skipped()

    @property
    def progress(self) -> float:
        return min(1.0, self.step / self.total) if self.total else 0.0

    def eta_relative(self) -> float:
        """Seconds left, from the time per step so far (A1111's ``eta_relative``)."""
        if self.started is None or not self.step:
            return 0.0
        elapsed = time.time() - self.started
        return max(0.0, elapsed / self.progress - elapsed) if self.progress else 0.0


class JobQueue:
    """The worker thread of one device and its bounded queue (module docstring)."""

    def __init__(self, size: int):
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=size)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.current: Job | None = None
        self.last_seconds = 1.0  # how long the last job took (for Retry-After)
        self.jobs_done = 0

    def start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._work, name="noisecraft-worker", daemon=True
                )
                self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Interrupt the running job, drop the waiting ones and end the worker."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is None:
            return
        self.interrupt()
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.future.cancel()
        self._queue.put(None)
        thread.join(timeout)

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def submit(self, name: str, fn: Callable[[Job], Any]) -> Job:
        """Queue ``fn``; :class:`QueueFullError` when ``size`` jobs already wait."""
        self.start()
        job = Job(name, fn)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            waiting = self.waiting + (self.current is not None)
            retry = max(1, math.ceil(self.last_seconds * waiting))
            raise QueueFullError(
                f"the server is busy ({waiting} jobs ahead); try again in {retry} s",
                retry_after=retry,
            ) from None
        return job

    def interrupt(self) -> None:
        job = self.current
        if job is not None:
            job.interrupted = True

    def skip(self) -> None:
        job = self.current
        if job is not None:
            job.skipped = True

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if not job.future.set_running_or_notify_cancel():
                continue
            self.current = job
            job.started = time.time()
            try:
                result = job.fn(job)
            except BaseException as e:  # the request gets the error; the worker goes on
                job.future.set_exception(e)
            else:
                job.future.set_result(result)
            finally:
                self.last_seconds = time.time() - job.started
                self.jobs_done += 1
                self.current = None


__all__ = ["Interrupted", "Job", "JobQueue", "QueueFullError", "Skipped", "Stop"]
