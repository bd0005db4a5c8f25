"""The Ray Serve application: `Step1XIngress` (the HTTP app) -> `Step1XPipeline` (engine + pipeline replicas).

`build_application(settings)` is what `step1x-edit serve --ray` deploys (`run`); `app_builder(args)` is the import
path for a Ray Serve config file (`serve run docs/ray-serve.yaml`, KubeRay's RayService), with settings as `args`
(plus the `STEP1X_*` environment of the cluster). Deployment options given in a config file override the ones set
here: `num_replicas` / `autoscaling_config`, `max_ongoing_requests`, `max_queued_requests`, `ray_actor_options`.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Application

from ..settings import Settings
from .replica import PipelineReplica, serve_replica_id

log = logging.getLogger("step1x_edit.deploy")

APP_NAME = "step1x-edit"
INGRESS, PIPELINE = "Step1XIngress", "Step1XPipeline"
# The ingress only parses, waits and streams: many requests at once, no CPU reserved for it.
INGRESS_MAX_ONGOING = 1000


@serve.ingress()
class IngressBody:
    """The HTTP app of api/app.py, built in the replica with a `RemoteEngine` on the pipeline deployment."""

    def __init__(self, settings: Settings, pipeline: Any) -> None:
        self._settings = settings
        self._pipeline = pipeline

    def __serve_build_asgi_app__(self) -> Any:
        from ..api.app import create_app
        from .remote_engine import RemoteEngine

        logging.basicConfig(level=self._settings.log_level.upper(),
                            format="%(levelname)s %(name)s: %(message)s")
        ingress_id = "ingress-" + serve_replica_id()
        return create_app(self._settings, engine_factory=lambda metrics: RemoteEngine(
            self._pipeline, metrics=metrics, replica_id=ingress_id))


def parse_replicas(text: str) -> tuple[int, int]:
    """`N` -> (N, N); `MIN:MAX` -> (MIN, MAX)."""
    low, _, high = text.partition(":")
    lo, hi = int(low), int(high or low)
    if not 1 <= lo <= hi:
        raise ValueError(f"replicas: MIN:MAX needs 1 <= MIN <= MAX, got {text!r}")
    return lo, hi


def _absolute(settings: Settings) -> Settings:
    """Relative paths resolved here: replicas run in other working directories (or on other machines)."""
    update = {name: value.resolve() for name, value in settings if isinstance(value, Path)}
    return settings.model_copy(update=update)


def _wants_gpu(settings: Settings) -> bool:
    """One GPU per replica when the device asks for CUDA, or (device auto) when the cluster has GPUs."""
    if settings.device.startswith("cuda"):
        return True
    if settings.device != "auto":
        return False
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1


def build_application(settings: Settings) -> Application:
    settings = _absolute(settings)
    low, high = parse_replicas(settings.replicas)
    ongoing = settings.max_ongoing_requests or settings.batch_max_images
    scaling: dict[str, Any] = {"num_replicas": low} if low == high else {"autoscaling_config": {
        "min_replicas": low, "max_replicas": high, "initial_replicas": low,
        # scale up when requests wait beyond what the replicas work on (ongoing + queued per replica > target)
        "target_ongoing_requests": ongoing}}
    actor = {"num_cpus": 1, "num_gpus": 1} if _wants_gpu(settings) else {"num_cpus": 1}
    pipeline = serve.deployment(PipelineReplica, name=PIPELINE).options(
        max_ongoing_requests=ongoing, max_queued_requests=settings.queue_depth, ray_actor_options=actor,
        health_check_period_s=10, graceful_shutdown_timeout_s=settings.shutdown_timeout_s, **scaling,
    ).bind(settings, ongoing)
    ingress = serve.deployment(IngressBody, name=INGRESS).options(
        num_replicas=1, max_ongoing_requests=INGRESS_MAX_ONGOING, ray_actor_options={"num_cpus": 0},
        graceful_shutdown_timeout_s=settings.shutdown_timeout_s,
    )
    return ingress.bind(settings, pipeline)


def app_builder(args: dict[str, Any] | None = None) -> Application:
    """For Ray Serve config files: `import_path: step1x_edit.deploy.app:app_builder`, `args:` any settings by name
    (the rest from the cluster's STEP1X_* environment)."""
    return build_application(Settings(**(args or {})))


def run(settings: Settings) -> int:
    """`step1x-edit serve --ray`: start (or join) Ray, deploy, print where, wait for Ctrl-C / SIGTERM, tear down."""
    import ray

    t0 = time.monotonic()
    address = settings.ray_address or _env_address()  # neither: a new local instance, on loopback only
    local = {} if address else {"_node_ip_address": "127.0.0.1", "include_dashboard": False}
    ray.init(address=address, namespace="step1x-edit", logging_level=logging.WARNING, **local)
    joined = ray.get_runtime_context().gcs_address
    t_ray = time.monotonic() - t0
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(build_application(settings), name=APP_NAME, route_prefix="/", blocking=False)
    elapsed = time.monotonic() - t0
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    low, high = parse_replicas(settings.replicas)
    print(f"step1x-edit: Ray Serve on http://{host}:{settings.port}/v1 ({low if low == high else f'{low}-{high}'} "
          f"pipeline replica(s), Ray at {joined}); Ray up in {t_ray:.1f} s, deployed in {elapsed:.1f} s",
          flush=True)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(1.0):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        print("step1x-edit: shutting down the Ray Serve application", file=sys.stderr, flush=True)
        serve.delete(APP_NAME)
        if not address:  # our own instance: stop Serve's actors with it
            serve.shutdown()
        ray.shutdown()
    return 0


def _env_address() -> str | None:
    import os

    return os.environ.get("RAY_ADDRESS") or None
