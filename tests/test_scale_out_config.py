"""The scale-out configuration, without starting Ray (fast): the documented Ray Serve config file and the KubeRay
RayService are valid for Ray Serve and deploy the same application `step1x-edit serve --ray` builds; `--replicas`
is N or MIN:MAX; `serve --ray` names the missing extra, and refuses a store that cannot work before starting Ray.
(The cluster itself: tests/test_ray_serve.py, slow.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from ray.serve.schema import ServeDeploySchema  # the [ray] extra (a test dependency: make test installs it)

from step1x_edit.deploy.app import INGRESS, PIPELINE, app_builder, build_application, parse_replicas
from step1x_edit.settings import Settings

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _serve_configs() -> dict[str, dict]:
    serve_file = yaml.safe_load((DOCS / "ray-serve.yaml").read_text())
    service = yaml.safe_load((DOCS / "kuberay-rayservice.yaml").read_text())
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    return {"ray-serve.yaml": serve_file, "kuberay": yaml.safe_load(service["spec"]["serveConfigV2"])}


@pytest.mark.parametrize("which", ["ray-serve.yaml", "kuberay"])
def test_the_documented_configs_are_valid_ray_serve_configs_of_this_application(which):
    config = _serve_configs()[which]
    schema = ServeDeploySchema.model_validate(config)
    (app,) = schema.applications
    assert app.import_path == "step1x_edit.deploy.app:app_builder" and app.route_prefix == "/"
    assert {d.name for d in app.deployments} == {INGRESS, PIPELINE}  # the names build_application gives
    pipeline = next(d for d in app.deployments if d.name == PIPELINE)
    assert pipeline.ray_actor_options.num_gpus == 1  # one GPU per replica
    assert pipeline.max_queued_requests > 0  # overload becomes 429s, not an endless queue
    built = app_builder(app.args)  # the import path, with the file's args, builds the application
    assert built._bound_deployment.name == INGRESS


def test_replicas_are_n_or_min_max():
    assert parse_replicas("3") == (3, 3) and parse_replicas("1:4") == (1, 4)
    with pytest.raises(ValueError, match="MIN <= MAX"):
        parse_replicas("4:2")
    for bad in ("0", "a", "1:", ":3", "2:0", "1:2:3"):
        with pytest.raises(ValidationError):
            Settings(replicas=bad)


def test_the_application_maps_settings_onto_ray_serve_options():
    fixed = build_application(Settings(replicas="2", device="cpu", queue_depth=7, batch_max_images=3))
    pipeline = fixed._bound_deployment.init_args[1]._bound_deployment  # the ingress is bound to the pipeline
    assert pipeline.num_replicas == 2 and pipeline.ray_actor_options == {"num_cpus": 1}  # CPU replicas
    assert pipeline.max_ongoing_requests == 3 and pipeline.max_queued_requests == 7
    scaled = build_application(Settings(replicas="1:4", device="cuda", max_ongoing_requests=5))
    pipeline = scaled._bound_deployment.init_args[1]._bound_deployment
    assert pipeline.ray_actor_options["num_gpus"] == 1
    auto = pipeline._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (1, 4, 5)


def _serve(args: list[str], env: dict[str, str], prelude: str = "") -> subprocess.CompletedProcess:
    code = f"{prelude}\nimport sys\nfrom step1x_edit.cli import main\nsys.exit(main({args!r}))"
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=120)


def test_serve_ray_names_the_missing_extra():
    done = _serve(["serve", "--ray"], {}, prelude="import sys; sys.modules['ray'] = None")
    assert done.returncode != 0 and "[ray] extra" in done.stderr and "pip install" in done.stderr


def test_serve_ray_refuses_a_store_that_cannot_work_before_starting_ray(tmp_path):
    done = _serve(["serve", "--ray", "--storage-url", "s3://bucket/prefix"], {})
    assert done.returncode == 2 and "STEP1X_URL_SIGNING_KEY" in done.stderr
    assert "Ray" not in done.stdout  # nothing was started
