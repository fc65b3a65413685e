"""The server's worker: skip and interrupt mid-sampling (through the engine's callback),
what a job answers then, and a queue that survives a failing job."""

from __future__ import annotations

import threading

import numpy as np
import pytest

pytest.importorskip("fastapi")

from noisecraft.server import ServerConfig  # noqa: E402
from noisecraft.server.a1111 import Plan  # noqa: E402
from noisecraft.server.host import ModelHost  # noqa: E402
from noisecraft.server.jobs import Job, JobQueue, QueueFullError  # noqa: E402
from noisecraft.server.models import ModelCatalog  # noqa: E402
from noisecraft.server.outputs import OutputFolder  # noqa: E402
from noisecraft.server.runner import run_plan  # noqa: E402

SETTINGS = {"prompt": "a 6", "steps": 4, "sampler": "Euler a", "width": 32, "height": 32}


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    config = ServerConfig(outputs_dir=tmp_path_factory.mktemp("out"))
    return ModelHost(config, ModelCatalog())


class AskAt(Job):
    """A job whose client asks to ``what`` ("skip" / "interrupt") at step 2 of batch
    ``batch``, as POST /skip or /interrupt would while that step runs."""

    def __init__(self, what: str, batch: int):
        super().__init__("txt2img", lambda job: None)
        self.what, self.batch = what, batch

    def on_step(self, d: dict, offset: int = 0) -> None:
        if self.batch_no == self.batch and d["step"] == 2:
            setattr(self, "skipped" if self.what == "skip" else "interrupted", True)
        super().on_step(d, offset)


def run(host, job, tmp_path):
    plan = Plan("txt2img", SETTINGS, seed=40, batch_size=1, n_iter=3)
    return run_plan(job, plan, host, OutputFolder(tmp_path))


def engine(host, seeds):
    pipe = host.use()
    return [pipe(seed=s, n=1, **SETTINGS).images[0] for s in seeds]


def test_skip_drops_the_batch_being_sampled_and_goes_on(host, tmp_path):
    out = run(host, AskAt("skip", batch=1), tmp_path)
    assert (out.skipped, out.interrupted, out.seeds) == (1, False, [40, 42])
    for got, want in zip(out.images, engine(host, [40, 42]), strict=True):
        assert np.array_equal(np.asarray(got), np.asarray(want))
    assert len(list(tmp_path.rglob("*.png"))) == 2  # what was answered was saved


def test_interrupt_stops_mid_sampling_and_answers_the_finished_batches(host, tmp_path):
    job = AskAt("interrupt", batch=1)
    out = run(host, job, tmp_path)
    assert (out.interrupted, out.seeds) == (True, [40])
    assert job.step == 4 + 2  # batch 0's four steps, then stopped at step 2 of batch 1
    assert np.array_equal(np.asarray(out.images[0]), np.asarray(engine(host, [40])[0]))


def test_a_failing_job_reaches_its_request_and_the_worker_goes_on():
    jobs = JobQueue(size=1)
    try:
        bad = jobs.submit("bad", lambda job: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            bad.future.result(10)
        assert jobs.submit("good", lambda job: 7).future.result(10) == 7
    finally:
        jobs.stop()


def test_stop_interrupts_the_running_job_and_cancels_the_waiting_ones():
    jobs = JobQueue(size=2)
    gate = threading.Event()
    running = jobs.submit("run", lambda job: gate.wait(10) and job.interrupted)
    while jobs.current is None:
        gate.wait(0.01)
    waiting = jobs.submit("wait", lambda job: None)
    jobs.submit("wait 2", lambda job: None)
    with pytest.raises(QueueFullError):
        jobs.submit("one too many", lambda job: None)
    stopper = threading.Thread(target=jobs.stop)
    stopper.start()
    while not waiting.future.cancelled():
        gate.wait(0.01)
    gate.set()
    stopper.join(10)
    assert running.future.result(10) is True  # it was asked to stop
