"""Faults inside the server, through the real HTTP stack and the real dev pipeline: a worker exception on one
request, out-of-memory errors (alone and in a batch), a full disk in the store, clients that vanish mid-job.

Faults are injected with a test-only wrapper around the real pipeline (`pipeline_factory`, the app's hook for
tests): a request whose prompt starts with `FAULT:` makes the wrapper raise before the real pipeline runs.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import socket
import sys
import threading
import weakref
from pathlib import Path

import httpx
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from server_fixtures import KEY, data_uri, dev_settings, start_server, wait_until  # noqa: E402

from step1x_edit.pipeline.edit import build_pipeline  # noqa: E402
from step1x_edit.storage import local as storage_local  # noqa: E402

pytestmark = pytest.mark.timeout(300)

MODEL = "stepfun-ai/step1x-edit"
AUTH = {"Authorization": f"Bearer {KEY}"}


class FaultyPipeline:
    """The real dev pipeline behind a switchboard of faults chosen by prompt:

    FAULT:error      RuntimeError (a bug)            FAULT:oom         torch.OutOfMemoryError
    FAULT:oom-text   RuntimeError("... out of memory")   FAULT:memory  MemoryError (host memory)
    FAULT:oom-batch  out of memory only when the call holds more than one image (splitting fixes it)
    FAULT:hold       waits for `release` before running (lets the test line up a batch behind it)
    """

    def __init__(self, inner) -> None:
        self.inner = inner
        self.calls: list[list[str]] = []
        self.released = 0
        self.release = threading.Event()
        self.holding = threading.Event()
        self.lost: weakref.ref | None = None  # a tensor the failed call allocated: must be freed after an OOM

    def info(self):
        return self.inner.info()

    def prepare(self, req):
        return self.inner.prepare(req)

    def release_memory(self) -> None:
        self.released += 1
        self.inner.release_memory()

    def run(self, batch, **kw):
        requests = [p.request for p in batch]
        prompts = [r.prompt for r in requests]
        self.calls.append(prompts)
        if "FAULT:hold" in prompts:
            self.holding.set()
            assert self.release.wait(60), "test never released the held call"
        scratch = torch.zeros(256, 1024)  # "activations" of the call that is about to fail
        self.lost = weakref.ref(scratch)
        if "FAULT:error" in prompts:
            raise RuntimeError("injected failure: index 7 is out of bounds for dimension 0")
        if "FAULT:oom" in prompts:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB (GPU 0; 79.3 GiB total)")
        if "FAULT:oom-text" in prompts:
            raise RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported")
        if "FAULT:memory" in prompts:
            raise MemoryError()
        if "FAULT:oom-batch" in prompts and sum(r.n for r in requests) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (batch too large)")
        del scratch
        return self.inner.run(batch, **kw)


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    settings = dev_settings(tmp_path_factory.mktemp("faults"), api_keys=KEY, queue_depth=8, batch_max_images=4,
                            batch_wait_ms=50)
    pipe: dict[str, FaultyPipeline] = {}

    def factory() -> FaultyPipeline:
        pipe["p"] = FaultyPipeline(build_pipeline(settings))
        return pipe["p"]

    server = start_server(settings, pipeline_factory=factory)
    server.pipe = pipe["p"]
    yield server
    server.pipe.release.set()
    server.stop()


def edit(server, prompt: str = "make it snowy", **fields) -> httpx.Response:
    body = {"model": MODEL, "prompt": prompt, "image": data_uri(), "steps": 1, "guidance_scale": 1,
            "response_format": "b64_json", **fields}
    return httpx.post(server.api + "/images/generations", json=body, headers=AUTH, timeout=120)


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert err["param"] == r.headers["x-request-id"]
    return err


def concurrently(*calls):
    results: list = [None] * len(calls)

    def run(i, fn):
        results[i] = fn()

    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def hold_worker(server) -> threading.Thread:
    """Occupy the worker with a held call so that the next requests queue up and are batched together."""
    server.pipe.release.clear()
    server.pipe.holding.clear()
    holder = threading.Thread(target=edit, args=(server, "FAULT:hold"))
    holder.start()
    assert server.pipe.holding.wait(30)
    return holder


# --- a bug in the worker ------------------------------------------------------------------------------------------
def test_worker_exception_fails_that_request_and_the_next_succeeds(faulty):
    err = error_of(edit(faulty, "FAULT:error"), 500)
    assert err["code"] == "pipeline_error" and err["message"] == "The pipeline failed: RuntimeError"
    assert "index 7" not in err["message"]  # internals stay in the log
    assert edit(faulty).status_code == 200
    assert httpx.get(faulty.base_url + "/ready").status_code == 200


def test_one_bad_job_in_a_batch_fails_alone(faulty):
    holder = hold_worker(faulty)
    before = len(faulty.pipe.calls)
    calls = [lambda: edit(faulty, "good one"), lambda: edit(faulty, "FAULT:error"), lambda: edit(faulty, "good two")]
    results: list = []
    runner = threading.Thread(target=lambda: results.extend(concurrently(*calls)))
    runner.start()
    assert wait_until(lambda: faulty.metric("step1x_queue_depth") == 3, 30)
    faulty.pipe.release.set()
    runner.join(120)
    holder.join(60)
    good1, bad, good2 = results
    assert good1.status_code == good2.status_code == 200 and bad.status_code == 500
    after = [sorted(c) for c in faulty.pipe.calls[before:]]
    assert after[0] == sorted(["good one", "FAULT:error", "good two"])  # batched together, failed together ...
    assert sorted(map(tuple, after[1:])) == [("FAULT:error",), ("good one",), ("good two",)]  # ... retried alone


# --- out of memory --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt", ["FAULT:oom", "FAULT:oom-text", "FAULT:memory"])
def test_out_of_memory_is_503_and_the_worker_recovers(faulty, prompt):
    released = faulty.pipe.released
    oom_before = faulty.metric("step1x_jobs_total", outcome="oom")
    r = edit(faulty, prompt)
    err = error_of(r, 503)
    assert err["code"] == "out_of_memory" and "ran out of memory" in err["message"]
    assert int(r.headers["retry-after"]) >= 1
    assert "80.00 GiB" not in err["message"]
    assert faulty.pipe.released == released + 1  # caches were freed ...
    gc.collect()
    assert faulty.pipe.lost() is None  # ... and nothing of the failed call is still referenced
    assert faulty.metric("step1x_jobs_total", outcome="oom") == oom_before + 1
    assert edit(faulty).status_code == 200  # the next request runs normally
    assert httpx.get(faulty.base_url + "/ready").status_code == 200


def test_a_batch_that_runs_out_of_memory_is_split(faulty):
    holder = hold_worker(faulty)
    before = len(faulty.pipe.calls)
    released = faulty.pipe.released
    results: list = []
    runner = threading.Thread(target=lambda: results.extend(concurrently(
        lambda: edit(faulty, "FAULT:oom-batch", seed=1), lambda: edit(faulty, "FAULT:oom-batch", seed=2))))
    runner.start()
    assert wait_until(lambda: faulty.metric("step1x_queue_depth") == 2, 30)
    faulty.pipe.release.set()
    runner.join(120)
    holder.join(60)
    assert [r.status_code for r in results] == [200, 200]
    assert sorted(r.json()["data"][0]["seed"] for r in results) == [1, 2]
    assert [len(c) for c in faulty.pipe.calls[before:]] == [2, 1, 1]
    assert faulty.pipe.released == released + 1


def test_an_n4_request_that_runs_out_of_memory_is_503(faulty):
    err = error_of(edit(faulty, "FAULT:oom-batch", n=4), 503)
    assert "fewer images" in err["message"]


# --- a full disk --------------------------------------------------------------------------------------------------
class FullDisk:
    """Stands in for the `os` module inside storage/local.py: writes fail with ENOSPC (after writing part of the
    data, as a real full disk does) once `allowed` writes have succeeded."""

    def __init__(self, allowed: int = 0, error: int = errno.ENOSPC) -> None:
        self.allowed, self.error = allowed, error

    def __getattr__(self, name):
        return getattr(os, name)

    def fdopen(self, fd, mode="r", *args, **kw):
        fh = os.fdopen(fd, mode, *args, **kw)
        if self.allowed > 0:
            self.allowed -= 1
            return fh
        error = self.error

        class Partial:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                fh.close()
                return False

            def write(self, data):
                fh.write(data[: len(data) // 2])
                fh.flush()
                raise OSError(error, os.strerror(error))

        return Partial()


def _stored(server) -> list[Path]:
    return sorted(Path(server.app.state.server.settings.storage_dir).iterdir())


def test_full_disk_is_507_with_no_partial_files(faulty, monkeypatch):
    before = _stored(faulty)
    monkeypatch.setattr(storage_local, "os", FullDisk())
    r = edit(faulty, response_format="url")
    err = error_of(r, 507)
    assert err["code"] == "insufficient_storage" and "no storage left" in err["message"]
    assert "b64_json" in err["message"] and r.headers["retry-after"]
    assert _stored(faulty) == before  # no temp file, no half-written image
    # n=2 where the second write fails: the first image is removed too (no orphans without a link)
    monkeypatch.setattr(storage_local, "os", FullDisk(allowed=1))
    error_of(edit(faulty, response_format="url", n=2), 507)
    assert _stored(faulty) == before
    # other storage errors are a 500 with a clear message
    monkeypatch.setattr(storage_local, "os", FullDisk(error=errno.EIO))
    err = error_of(edit(faulty, response_format="url"), 500)
    assert err["code"] == "storage_error" and "could not be stored" in err["message"]
    # b64_json does not touch the disk, and the server is fine once there is space again
    assert edit(faulty, response_format="b64_json").status_code == 200
    monkeypatch.setattr(storage_local, "os", os)
    r = edit(faulty, response_format="url")
    assert r.status_code == 200 and httpx.get(r.json()["data"][0]["url"]).status_code == 200
    assert len(_stored(faulty)) == len(before) + 1


# --- clients that vanish --------------------------------------------------------------------------------------------
def _hang_up_after_sending(server, prompt: str, steps: int) -> socket.socket:
    payload = json.dumps({"model": MODEL, "prompt": prompt, "image": data_uri(), "steps": steps}).encode()
    sock = socket.create_connection(("127.0.0.1", int(server.base_url.rsplit(":", 1)[1])))
    sock.sendall(f"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return sock


def test_clients_that_disconnect_mid_job_leave_no_trace(faulty):
    dropped = faulty.metric("step1x_jobs_total", outcome="dropped_disconnect")
    aborted = faulty.metric("step1x_jobs_total", outcome="aborted")
    files = _stored(faulty)
    running = _hang_up_after_sending(faulty, "gone while running", 50)
    assert wait_until(lambda: faulty.metric("step1x_running_jobs") == 1, 30)
    queued = [_hang_up_after_sending(faulty, f"gone while queued {i}", 49) for i in range(4)]
    assert wait_until(lambda: faulty.metric("step1x_queue_depth") == 4, 30)
    for sock in queued:  # waiting clients go first: their jobs must leave the queue unseen
        sock.close()
    assert wait_until(lambda: faulty.metric("step1x_queue_depth") == 0, 30)
    running.close()  # then the running one: its call stops between steps
    assert wait_until(lambda: faulty.metric("step1x_jobs_total", outcome="aborted") == aborted + 1, 60)
    assert wait_until(lambda: faulty.metric("step1x_jobs_total", outcome="dropped_disconnect") == dropped + 5, 30)
    assert faulty.metric("step1x_queue_depth") == 0 and faulty.metric("step1x_running_jobs") == 0
    assert not any("gone while queued" in p for call in faulty.pipe.calls for p in call)  # never ran
    assert _stored(faulty) == files  # nothing was written for them
    assert edit(faulty).status_code == 200


@pytest.mark.parametrize("exc,oom", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (torch.cuda.OutOfMemoryError("CUDA out of memory"), True),
    (RuntimeError("CUDA error: out of memory"), True),
    (RuntimeError("MPS backend out of memory (MPS allocated: 17.00 GB)"), True),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to "
                  "allocate 1099511627776 bytes. Error code 12 (Cannot allocate memory)"), True),
    (MemoryError(), True),
    (RuntimeError("index out of range"), False), (ValueError("out of memory"), False),
])
def test_out_of_memory_is_recognised_without_importing_torch_in_the_engine(exc, oom):
    from step1x_edit.engine.worker import is_out_of_memory

    assert is_out_of_memory(exc) is oom
