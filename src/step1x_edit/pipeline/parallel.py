"""One request on several ranks: the processes, and how rank 0 hands its batches to the others.

The command (`serve`, `edit`, `check-reference`, `bench`) starts its worker ranks itself, as `vllm serve
--tensor-parallel-size` does: `cfg_parallel x ulysses_degree x ring_degree` processes on this machine (spawned,
rank r on cuda:r with NCCL, or on the CPU with Gloo), joined through a TCP store on 127.0.0.1. Rank 0 is the
process the user started: it owns HTTP and the engine. `ParallelEditPipeline` is its `PipelineLike`: every batch it
is given goes first, pickled over a pipe, to the other ranks, which run the same `EditPipeline.run` in lockstep;
the DiT's calls are collective (models/parallel.py). Every rank runs the text encoder and the VAE on the same inputs
too (the simplest way to give them the same conditioning; each GPU has room for the encoder next to the DiT), and
only rank 0's results, previews and progress are used. Whether to stop between steps (a cancelled job) is decided by
rank 0 and broadcast, so every rank stops at the same step.

Nothing may hang: the control messages go over pipes (an idle worker waits on its pipe, not on a collective, and
sees EOF when rank 0 is gone; a watchdog thread also exits it when its parent dies), collectives have the
`parallel_timeout_s` timeout, and rank 0's watchdog notices a worker's death at once. Any failure of a rank (death,
an exception mid-batch, a timeout) is fatal for the whole group, because the others cannot stay in step: every
rank is stopped, the jobs get 503 (`PipelineLost`), and `serve` exits with status 1 for a supervisor to restart.
Worker ranks ignore SIGINT / SIGTERM (Ctrl-C and `systemctl stop` reach every process of the group): rank 0 drains
its admitted work, then tells them to stop.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist

from ..models import presets
from ..models.layouts import resolve_preset
from ..models.parallel import Degrees, build_mesh, problems
from ..settings import Settings
from .types import (
    Cancelled,
    EditRequest,
    EditResult,
    PipelineLost,
    PreparedEdit,
    PreviewCallback,
    StepCallback,
    StopCheck,
)

log = logging.getLogger(__name__)
# diffusers 0.42's context-parallel code calls a torch collective that torch 2.13 deprecates (once per process)
warnings.filterwarnings("ignore", message=r".*all_gather_tensor. is deprecated", category=FutureWarning)

_SPAWN = multiprocessing.get_context("spawn")
_STOP_GRACE_S = 15.0  # how long a worker gets to leave after "stop" before it is killed


def degrees_of(settings: Settings) -> Degrees:
    return Degrees.from_settings(settings)


def device_type_of(settings: Settings) -> str:
    from .edit import resolve_device

    return resolve_device(settings.device).type


def startup_problems(settings: Settings, heads: int | None = None) -> list[str]:
    """What makes the settings' parallel degrees impossible on this machine (empty: fine, or one rank). `heads`
    defaults to the preset's DiT (every released Step1X-Edit DiT has 24)."""
    degrees = degrees_of(settings)
    if degrees.world_size == 1:
        return []
    device_type = device_type_of(settings)
    if heads is None:
        heads = (presets.DEV_DIT if resolve_preset(settings) == "dev" else presets.FULL_DIT).num_heads
    found = problems(degrees, heads=heads, device_type=device_type,
                     device_count=torch.cuda.device_count() if device_type == "cuda" else 0, dtype=settings.dtype,
                     device=settings.device, step_cache=settings.step_cache, offload=settings.offload,
                     attention_backend=settings.attention_backend)
    if settings.lora_dir is not None and degrees.sequence > 1:
        # the DiT's context-parallel split/gather hooks and its unsplit twin (models/parallel.py) are set up before
        # any adapter exists: the twin would run without them, and a LoRA on a split/gathered layer
        # (x_embedder, context_embedder, proj_out) would see the wrong tokens
        found.append("lora_dir cannot be combined with ulysses_degree / ring_degree > 1 (LoRA adapters under "
                     "sequence parallelism are not supported); cfg_parallel 2 works with adapters")
    return found


def rank_settings(settings: Settings, rank: int, device_type: str) -> Settings:
    """Rank r's settings: the same, on cuda:r on a GPU machine."""
    return settings.model_copy(update={"device": f"cuda:{rank}" if device_type == "cuda" else "cpu"})


# --------------------------------------------------------------------------------------------------------------
# the group of ranks, seen from rank 0
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupSpec:
    """What every rank needs to join the group (pickled to the spawned ranks)."""

    degrees: Degrees
    port: int  # of rank 0's TCP store on 127.0.0.1
    timeout_s: float
    device_type: str  # cuda: NCCL for the tensors (and Gloo for small CPU flags); cpu: Gloo

    @property
    def world_size(self) -> int:
        return self.degrees.world_size

    @property
    def timeout(self) -> datetime.timedelta:
        return datetime.timedelta(seconds=self.timeout_s)


def _join(rank: int, spec: GroupSpec, store: dist.Store | None = None):
    """Initialise the default process group on this rank and build the (cfg, ring, ulysses) mesh."""
    if spec.device_type == "cuda":
        torch.cuda.set_device(rank)
    if store is None:
        store = dist.TCPStore("127.0.0.1", spec.port, spec.world_size, is_master=False, timeout=spec.timeout)
    backend = "cpu:gloo,cuda:nccl" if spec.device_type == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=spec.world_size, timeout=spec.timeout)
    return build_mesh(spec.degrees, spec.device_type)


def _cpu_threads(world_size: int) -> int:
    return max(1, (os.cpu_count() or 1) // world_size)


class RankGroup:
    """Rank 0's view of the group: the spawned worker ranks (1 .. world-1), one pipe to each, and a watchdog thread
    that reads every pipe and notices a worker's death at once (`lost`, then the listeners are told)."""

    def __init__(self, degrees: Degrees, device_type: str, timeout_s: float,
                 target: Callable[..., None], args: tuple = ()):
        world = degrees.world_size
        self._store = dist.TCPStore("127.0.0.1", 0, world, is_master=True,
                                    timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)
        self.spec = GroupSpec(degrees, self._store.port, timeout_s, device_type)
        self.lost: str | None = None
        self._listeners: list[Callable[[str], None]] = []
        self._closing = False
        self._joined = False
        self._threads = torch.get_num_threads()
        self._lock = threading.Condition()
        self._inbox: dict[int, list[tuple]] = {r: [] for r in range(1, world)}
        self._procs: dict[int, Any] = {}
        self._conns: dict[int, multiprocessing.connection.Connection] = {}
        try:
            for rank in range(1, world):
                mine, theirs = _SPAWN.Pipe()
                proc = _SPAWN.Process(target=_rank_main, args=(rank, self.spec, theirs, target, args),
                                      name=f"step1x-rank{rank}", daemon=True)
                proc.start()
                theirs.close()
                self._procs[rank], self._conns[rank] = proc, mine
        except BaseException:
            self.close()
            raise
        self._watchdog = threading.Thread(target=self._watch, name="step1x-rank-watchdog", daemon=True)
        self._watchdog.start()
        log.info("started %d worker rank(s) for %s (pids %s)", world - 1, degrees.describe(),
                 ", ".join(str(p.pid) for p in self._procs.values()))

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs.values()]

    def add_listener(self, listener: Callable[[str], None]) -> None:
        """`listener(reason)` once the group is lost (a worker died or failed); at once if it already is."""
        with self._lock:
            self._listeners.append(listener)
            lost = self.lost
        if lost is not None:
            listener(lost)

    def join_as_rank0(self):
        """Wait until every worker is up, then join the process group as rank 0; returns the device mesh."""
        self.wait_all("hello", self.spec.timeout_s)
        if self.spec.device_type == "cpu":
            torch.set_num_threads(_cpu_threads(self.spec.world_size))
        mesh = _join(0, self.spec, self._store)
        self._joined = True
        return mesh

    def send(self, message: tuple) -> None:
        if self.lost is not None:
            raise PipelineLost(self.lost)
        try:
            for conn in self._conns.values():
                conn.send(message)
        except (OSError, EOFError) as exc:
            reason = self.lost or f"a worker rank is gone ({type(exc).__name__})"
            self.fail(reason)
            raise PipelineLost(reason) from exc

    def wait_all(self, kind: str, timeout_s: float) -> None:
        """Wait for message `kind` from every worker; raises RuntimeError when one fails, dies or is late."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while True:
                if self.lost is not None:
                    raise RuntimeError(self.lost)
                if all(any(m[0] == kind for m in box) for box in self._inbox.values()):
                    for box in self._inbox.values():
                        box.remove(next(m for m in box if m[0] == kind))
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    late = [r for r, box in self._inbox.items() if not any(m[0] == kind for m in box)]
                    reason = f"rank(s) {late} did not report {kind!r} within {timeout_s:g} s"
                    break
                self._lock.wait(min(left, 1.0))
        self.fail(reason)
        raise RuntimeError(reason)

    def _watch(self) -> None:
        """The only reader of the pipes: messages into the inbox; an error message or a death -> `fail`."""
        conns = {c: r for r, c in self._conns.items()}
        sentinels = {p.sentinel: r for r, p in self._procs.items()}
        errors: dict[int, str] = {}
        while not self._closing and (conns or sentinels):
            for ready in multiprocessing.connection.wait([*conns, *sentinels], timeout=0.5):
                if self._closing:
                    return
                if ready in conns:
                    rank = conns[ready]
                    try:
                        message = ready.recv()
                    except (EOFError, OSError):
                        del conns[ready]  # the death itself comes through the sentinel
                        continue
                    if message[0] == "error":
                        errors[rank] = message[1]
                    with self._lock:
                        self._inbox[rank].append(message)
                        self._lock.notify_all()
                else:
                    rank = sentinels.pop(ready)
                    proc = self._procs[rank]
                    proc.join(1.0)
                    detail = errors.get(rank) or _drain_error(self._conns[rank])
                    self.fail(f"rank {rank} (pid {proc.pid}) exited with code {proc.exitcode}"
                              + (f": {detail}" if detail else ""))
                    return

    def fail(self, reason: str) -> None:
        """The group cannot go on: stop every worker now, then tell the listeners (once)."""
        with self._lock:
            if self.lost is not None or self._closing:
                return
            self.lost = reason
            listeners = list(self._listeners)
            self._lock.notify_all()
        log.error("parallel group lost: %s; stopping every rank", reason)
        self._stop_workers(grace_s=0.0)
        for listener in listeners:
            try:
                listener(reason)
            except Exception:  # noqa: BLE001 - the others must still hear it
                log.exception("a lost-group listener failed")

    def _stop_workers(self, grace_s: float) -> None:
        deadline = time.monotonic() + grace_s
        for proc in self._procs.values():
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self._procs.values():
            if proc.is_alive():
                proc.kill()
        for proc in self._procs.values():
            proc.join(5.0)

    def close(self) -> None:
        """Tell every worker to stop, give it `_STOP_GRACE_S` to leave, kill what is left, leave the group."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        for conn in self._conns.values():
            with contextlib.suppress(OSError, EOFError):
                conn.send(("stop",))
        self._stop_workers(grace_s=_STOP_GRACE_S if self.lost is None else 0.0)
        for conn in self._conns.values():
            conn.close()
        # (after a loss on CUDA, NCCL may wait for the dead peer: the process is about to exit anyway)
        if self._joined and dist.is_initialized() and (self.lost is None or self.spec.device_type == "cpu"):
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
        self._joined = False
        torch.set_num_threads(self._threads)


def _drain_error(conn: multiprocessing.connection.Connection) -> str:
    """An error message a dead worker left in its pipe (read only once the watchdog stopped reading it)."""
    with contextlib.suppress(Exception):
        while conn.poll(0):
            message = conn.recv()
            if message[0] == "error":
                return message[1]
    return ""


# --------------------------------------------------------------------------------------------------------------
# a worker rank
# --------------------------------------------------------------------------------------------------------------


def _rank_main(rank: int, spec: GroupSpec, conn, target: Callable[..., None], args: tuple) -> None:
    """Entry point of a spawned worker rank: follow rank 0 (signals ignored, exit with the parent), join the group,
    run `target(rank, conn, mesh, *args)`; any failure is reported on the pipe and ends the process."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s rank{rank} %(name)s: %(message)s")
    parent = multiprocessing.parent_process()
    if parent is not None:
        def exit_with_parent() -> None:
            parent.join()
            os._exit(1)

        threading.Thread(target=exit_with_parent, name="exit-with-rank0", daemon=True).start()
    try:
        conn.send(("hello", os.getpid()))
        if spec.device_type == "cpu":
            torch.set_num_threads(_cpu_threads(spec.world_size))
        mesh = _join(rank, spec)
        target(rank, conn, mesh, *args)
    except (EOFError, BrokenPipeError):  # rank 0 is gone
        os._exit(1)
    except BaseException as exc:  # noqa: BLE001 - reported to rank 0, then this rank ends
        log.exception("rank %d failed", rank)
        with contextlib.suppress(Exception):
            conn.send(("error", f"{type(exc).__name__}: {exc}"[:500]))
        os._exit(1)
    with contextlib.suppress(Exception):
        dist.destroy_process_group()
    os._exit(0)


def _wait_for_stop(conn) -> None:
    while conn.recv()[0] != "stop":
        pass


def agreed_stop(should_stop: StopCheck | None) -> StopCheck:
    """A `should_stop` every rank calls at the same point: rank 0's answer, broadcast (a CPU flag: Gloo)."""

    def check() -> bool:
        flag = torch.tensor([1 if should_stop is not None and should_stop() else 0], dtype=torch.int32)
        dist.broadcast(flag, src=0)
        return bool(flag.item())

    return check


def _serve_rank(rank: int, conn, mesh, settings: Settings) -> None:
    """A worker rank of `ParallelEditPipeline`: the same pipeline, then every batch rank 0 sends, in lockstep."""
    from .edit import build_pipeline

    pipe = build_pipeline(rank_settings(settings, rank, device_type_of(settings)), mesh=mesh)
    conn.send(("ready", None))
    while True:
        message = conn.recv()
        if message[0] == "stop":
            return
        if message[0] == "run":
            with contextlib.suppress(Cancelled):  # rank 0 stopped the batch: so did every rank, at the same step
                pipe.run(message[1], should_stop=agreed_stop(None))


def _spmd_rank(rank: int, conn, mesh, fn: Callable[..., Any], args: tuple) -> None:
    with contextlib.redirect_stdout(io.StringIO()):  # rank 0 prints; the others run the same code silently
        fn(rank, mesh, *args)
    conn.send(("done", None))
    _wait_for_stop(conn)


def run_spmd(degrees: Degrees, fn: Callable[..., Any], args: tuple = (), *, device_type: str = "cpu",
             timeout_s: float = 300.0) -> Any:
    """Run `fn(rank, mesh, *args)` on every rank of a new group (this process is rank 0) and return rank 0's
    result: the same program on every rank (check-reference, bench, tests). A rank's failure raises here."""
    group = RankGroup(degrees, device_type, timeout_s, _spmd_rank, (fn, args))
    try:
        mesh = group.join_as_rank0()
        try:
            result = fn(0, mesh, *args)
        except Exception as exc:
            time.sleep(0.5)  # let the watchdog see a worker's death and name it
            if group.lost:
                raise RuntimeError(f"{group.lost} ({type(exc).__name__} on rank 0: {exc})") from exc
            group.fail(f"rank 0 failed: {type(exc).__name__}: {exc}"[:500])  # the others cannot go on
            raise
        group.wait_all("done", timeout_s)
        return result
    finally:
        group.close()


# --------------------------------------------------------------------------------------------------------------
# rank 0's pipeline
# --------------------------------------------------------------------------------------------------------------


def _portable(p: PreparedEdit) -> PreparedEdit:
    """What a worker needs of a prepared request: everything but the original upload (only rank 0 reads it)."""
    return replace(p, request=replace(p.request, image=None))


class ParallelEditPipeline:
    """Rank 0's `PipelineLike` (engine/worker.py): the local `EditPipeline` plus the worker ranks, which run every
    batch with it in lockstep. `watch(listener)` reports the group's loss; `close()` stops the workers."""

    def __init__(self, settings: Settings):
        bad = startup_problems(settings)
        if bad:
            raise ValueError("; ".join(bad))
        from .edit import build_pipeline

        self.degrees = degrees_of(settings)
        device_type = device_type_of(settings)
        self.group = RankGroup(self.degrees, device_type, settings.parallel_timeout_s, _serve_rank, (settings,))
        try:
            mesh = self.group.join_as_rank0()
            self.local = build_pipeline(rank_settings(settings, 0, device_type), mesh=mesh)
            self.group.wait_all("ready", settings.parallel_timeout_s)
        except BaseException as exc:
            self.group.fail(f"start-up failed: {type(exc).__name__}: {exc}"[:500])  # no-op when a worker failed
            self.group.close()
            raise

    # PipelineLike
    def prepare(self, request: EditRequest) -> PreparedEdit:
        return self.local.prepare(request)

    def info(self) -> dict[str, Any]:
        return {**self.local.info(), "parallel": self.degrees.describe()}

    def release_memory(self) -> None:
        self.local.release_memory()

    def run(self, batch: Sequence[PreparedEdit | EditRequest], *, on_step: StepCallback | None = None,
            on_preview: PreviewCallback | None = None, should_stop: StopCheck | None = None) -> list[EditResult]:
        """`EditPipeline.run` on every rank; rank 0's results. Raises `Cancelled` (every rank stopped at the same
        step) or `PipelineLost` (any other failure: the group is stopped)."""
        if self.group.lost is not None:
            raise PipelineLost(self.group.lost)
        prepared = [p if isinstance(p, PreparedEdit) else self.local.prepare(p) for p in batch]
        self.group.send(("run", [_portable(p) for p in prepared]))
        try:
            return self.local.run(prepared, on_step=on_step, on_preview=on_preview,
                                  should_stop=agreed_stop(should_stop))
        except Cancelled:
            raise
        except BaseException as exc:
            time.sleep(0.2)  # a worker's death usually caused it: let the watchdog name it
            reason = self.group.lost or f"rank 0 failed mid-batch: {type(exc).__name__}: {exc}"[:500]
            self.group.fail(reason)
            raise PipelineLost(reason) from exc

    # the group
    def watch(self, listener: Callable[[str], None]) -> None:
        self.group.add_listener(listener)

    @property
    def worker_pids(self) -> list[int]:
        return self.group.pids

    def close(self) -> None:
        self.group.close()


def build_any_pipeline(settings: Settings):
    """The pipeline the settings ask for: `EditPipeline` on one rank, `ParallelEditPipeline` (worker ranks
    started) on several."""
    if degrees_of(settings).world_size > 1:
        return ParallelEditPipeline(settings)
    from .edit import build_pipeline

    return build_pipeline(settings)


__all__ = ["GroupSpec", "ParallelEditPipeline", "RankGroup", "agreed_stop", "build_any_pipeline", "degrees_of",
           "rank_settings", "run_spmd", "startup_problems"]
