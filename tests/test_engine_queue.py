"""Admission, batching, cancellation and shutdown of the engine (`engine/queue.py`, `engine/worker.py`).

These use a small stand-in that follows the pipeline's interface (`engine.worker.PipelineLike`: prepare / run /
info / release_memory), so that batching can be observed exactly and timed by the test; the API tests run the real
pipeline.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import pytest

from step1x_edit.engine.metrics import Metrics
from step1x_edit.engine.queue import EngineClosed, Job, JobQueue, QueueFull
from step1x_edit.engine.worker import Aborted, Engine, NotReady, PipelineLike
from step1x_edit.pipeline.types import Cancelled, EditResult, PreparedEdit


@dataclass
class Req:
    key: str = "a"
    n: int = 1
    steps: int = 3
    bad: bool = False


class Stand:
    """Pipeline stand-in: records each call; `gate` holds a call between steps until the test opens it."""

    def __init__(self) -> None:
        self.calls: list[list[Req]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.in_call = threading.Event()

    def info(self) -> dict:
        return {"version": "v1.1", "preset": "dev", "device": "cpu", "dtype": "float32"}

    def prepare(self, req: Req) -> PreparedEdit:
        if req.key == "invalid":
            raise ValueError("steps: invalid for this test")
        return _prepared(req, req.key, req.n)

    def run(self, batch, *, on_step=None, on_preview=None, should_stop=None):
        requests = [p.request for p in batch]
        self.calls.append(requests)
        self.in_call.set()
        if any(r.bad for r in requests):
            raise ValueError("prompt: bad input")
        for step in range(requests[0].steps):
            if should_stop():
                raise Cancelled()
            self.gate.wait(10)
            on_step(step + 1, requests[0].steps)
        self.in_call.clear()
        return [EditResult(images=[], seeds=[id(r)], text_tokens=0, image_tokens=0) for r in requests]

    def release_memory(self) -> None:
        pass


def _prepared(request, key, images: int) -> PreparedEdit:
    return PreparedEdit(request=request, original_size=(1, 1), resized=None, seeds=tuple(range(images)), key=(key,))


def _job(key: str, images: int = 1) -> Job:
    return Job(prepared=_prepared(None, key, images))


def test_the_stand_in_follows_the_protocol():
    stand: PipelineLike = Stand()  # (a type checker holds it to the protocol)
    assert callable(stand.prepare) and callable(stand.run) and callable(stand.release_memory)


def _engine(stand: Stand, **kw) -> Engine:
    args = dict(queue_depth=8, batch_max_images=4, batch_wait_s=0.0, metrics=Metrics())
    args.update(kw)
    engine = Engine(lambda: stand, **args)
    engine.start()
    assert engine.wait_loaded(5) and engine.ready
    return engine


def _hold(stand: Stand, engine: Engine) -> Job:
    """Submit a job that occupies the worker until `stand.gate` opens."""
    stand.gate.clear()
    job = engine.submit(Req(key="blocker"))
    assert stand.in_call.wait(5)
    return job


def test_queue_batches_compatible_jobs_within_the_image_budget():
    q = JobQueue(depth=10)
    jobs = [_job(k, n) for k, n in [("a", 1), ("b", 1), ("a", 2), ("a", 2), ("a", 1)]]
    for j in jobs:
        q.put(j)
    assert q.stats() == (5, 7)
    assert q.take_batch(4) == [jobs[0], jobs[2], jobs[4]]  # oldest first, then same-key jobs that fit (1+2+1)
    assert q.take_batch(4) == [jobs[1]]
    assert q.take_batch(4) == [jobs[3]]
    assert q.take_batch(4, idle_timeout=0.01) == []


def test_oversized_first_job_still_runs_alone():
    q = JobQueue(depth=10)
    big, small = _job("a", 8), _job("a", 1)
    q.put(big)
    q.put(small)
    assert q.take_batch(4) == [big]


def test_queue_full_and_cancelled_jobs_leave_the_queue():
    q = JobQueue(depth=2)
    a, b = _job("a", 1), _job("a", 1)
    q.put(a)
    q.put(b)
    with pytest.raises(QueueFull):
        q.put(_job("a", 1))
    assert a.cancel("disconnected") is True
    assert q.stats() == (1, 1)
    q.put(_job("b", 1))  # room again
    assert q.take_batch(4)[0] is b


def test_batch_waits_briefly_for_companions():
    q = JobQueue(depth=10)
    first, late = _job("a", 1), _job("a", 1)
    q.put(first)
    threading.Timer(0.05, q.put, args=(late,)).start()
    assert q.take_batch(4, wait_s=1.0) == [first, late]


def test_closed_queue_drains_then_ends():
    q = JobQueue(depth=10)
    job = _job("a", 1)
    q.put(job)
    q.close()
    with pytest.raises(EngineClosed):
        q.put(_job("a", 1))
    assert q.take_batch(4) == [job]
    assert q.take_batch(4) is None


def test_engine_batches_waiting_jobs_and_counts_images():
    stand = Stand()
    engine = _engine(stand)
    blocker = _hold(stand, engine)
    jobs = [engine.submit(Req(key="x", n=n)) for n in (1, 2, 1, 1)] + [engine.submit(Req(key="y"))]
    assert engine.stats()["queued_jobs"] == 5 and engine.stats()["queued_images"] == 6
    stand.gate.set()
    for j in [blocker, *jobs]:
        assert isinstance(j.future.result(5), EditResult)
    sizes = [[r.n for r in call] for call in stand.calls[1:]]
    assert sizes == [[1, 2, 1], [1], [1]]  # budget 4: the fourth x-job waits for the next call
    m = engine.metrics.registry
    assert m.get_sample_value("step1x_batch_images_count") == 4
    assert m.get_sample_value("step1x_batch_images_sum") == 1 + 4 + 1 + 1
    engine.shutdown(5)


def test_queue_full_is_refused_and_counted():
    stand = Stand()
    engine = _engine(stand, queue_depth=1)
    _hold(stand, engine)
    engine.submit(Req())
    with pytest.raises(QueueFull):
        engine.submit(Req())
    assert engine.metrics.registry.get_sample_value("step1x_jobs_total", {"outcome": "rejected_full"}) == 1
    stand.gate.set()
    engine.shutdown(5)


def test_cancelled_queued_job_never_reaches_the_pipeline():
    stand = Stand()
    engine = _engine(stand)
    _hold(stand, engine)
    gone = engine.submit(Req(key="x"))
    kept = engine.submit(Req(key="x"))
    assert gone.cancel("disconnected")
    stand.gate.set()
    assert kept.future.result(5)
    assert all(gone.prepared.request is not r for call in stand.calls for r in call)
    engine.shutdown(5)


def test_running_batch_stops_when_every_job_is_cancelled():
    stand = Stand()
    engine = _engine(stand)
    stand.gate.clear()
    job = engine.submit(Req(steps=50))
    assert stand.in_call.wait(5)
    assert job.cancel("timeout") is False  # already running: it stops between steps
    stand.gate.set()
    with pytest.raises(Aborted):
        job.future.result(5)
    assert engine.metrics.registry.get_sample_value("step1x_jobs_total", {"outcome": "aborted"}) == 1
    assert engine.submit(Req()).future.result(5)  # the worker carries on
    engine.shutdown(5)


def test_bad_job_in_a_batch_fails_alone():
    stand = Stand()
    engine = _engine(stand)
    _hold(stand, engine)
    good1, bad, good2 = (engine.submit(Req(key="x", bad=b)) for b in (False, True, False))
    stand.gate.set()
    assert good1.future.result(5) and good2.future.result(5)
    with pytest.raises(ValueError, match="prompt"):
        bad.future.result(5)
    assert [len(c) for c in stand.calls[1:]] == [3, 1, 1, 1]  # the batch, then each job alone


def test_batch_key_errors_surface_at_submit():
    engine = _engine(Stand())
    with pytest.raises(ValueError):
        engine.submit(Req(key="invalid"))
    engine.shutdown(5)


def test_shutdown_drains_admitted_work_and_refuses_new():
    stand = Stand()
    engine = _engine(stand)
    blocker = _hold(stand, engine)
    queued = engine.submit(Req(key="x"))
    threading.Timer(0.2, stand.gate.set).start()
    assert engine.shutdown(10) is True
    assert blocker.future.result(0) and queued.future.result(0)
    with pytest.raises(EngineClosed):
        engine.submit(Req())
    assert not engine.ready and "shutting down" in engine.not_ready_reason()


def test_shutdown_timeout_fails_what_is_left():
    """Every admitted job gets an answer: the queued one and the running one (it used to be left running, so its
    client waited until uvicorn cut the connection with a plain-text 500); then the running call is stopped at its
    next step and waited for (a process exiting under a torch call aborts)."""
    stand = Stand()
    engine = _engine(stand)
    running = _hold(stand, engine)
    queued = engine.submit(Req(key="x"))
    answered_before_the_step_ended: list[bool] = []

    def next_step() -> None:  # the held step ends 1 s after the drain's 0.2 s
        answered_before_the_step_ended.append(running.future.done() and queued.future.done())
        stand.gate.set()

    threading.Timer(1.2, next_step).start()
    assert engine.shutdown(0.2) is False
    assert answered_before_the_step_ended == [True]
    with pytest.raises(EngineClosed, match="before this job ran"):
        queued.future.result(0)
    with pytest.raises(EngineClosed, match="before this job finished"):
        running.future.result(0)
    assert running.cancelled and not engine._thread.is_alive()  # stopped at its next step, and waited for
    assert len(stand.calls) == 1  # the queued job never ran
    assert engine.metrics.registry.get_sample_value("step1x_jobs_total", {"outcome": "shutdown"}) == 2
    t0 = time.monotonic()
    assert engine.shutdown(30) is False and time.monotonic() - t0 < 1  # later calls: the first one's result


def test_not_ready_while_loading_and_after_a_failed_load():
    release = threading.Event()
    stand = Stand()
    engine = Engine(lambda: (release.wait(5), stand)[1], queue_depth=2, batch_max_images=4)
    engine.start()
    with pytest.raises(NotReady, match="loading"):
        engine.submit(Req())
    release.set()
    assert engine.wait_loaded(5) and engine.ready
    engine.shutdown(5)

    def broken():
        raise FileNotFoundError("dit.safetensors")

    failed = Engine(broken, queue_depth=2, batch_max_images=4)
    failed.start()
    assert failed.wait_loaded(5)
    time.sleep(0.05)
    assert not failed.ready and "dit.safetensors" in failed.not_ready_reason()
    with pytest.raises(NotReady, match="failed to load"):
        failed.submit(Req())
