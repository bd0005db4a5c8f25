"""Ray Serve (deploy/): a local Ray cluster on 127.0.0.1 with 2 CPU replicas of the dev preset, outputs in a real
S3-compatible store (SeaweedFS).

Checked: concurrent requests land on both replicas (`x-step1x-replica`); every `url` downloads through the Ray
endpoint and through a separate single-process server sharing the bucket and link key; the same HTTP app (auth,
validation errors, streaming); overload is a 429 with Retry-After in the OpenAI error shape (Ray Serve's
max_queued_requests); killing one replica under load loses no accepted request without an answer (each one is a
200 or a clean 503), and the deployment heals; `step1x-edit serve --ray` starts, answers and stops cleanly; the
documented config file (docs/ray-serve.yaml) deploys. Slow (Ray start-up and the deployment take ~30-60 s on 2 cores):
`.ci/run` runs it with the slow checks.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import sys
import time

import httpx
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from s3_fixtures import BUCKET, SeaweedFS, aws_env  # noqa: E402
from server_fixtures import KEY, data_uri, dev_settings, free_port, start_server, wait_until  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

MODEL = "stepfun-ai/step1x-edit"
LINK_KEY = "ray-test-link-key-0123456789abcdef0123"
AUTH = {"Authorization": f"Bearer {KEY}"}
PNG = b"\x89PNG\r\n\x1a\n"


class Cluster:
    def __init__(self, base: str, settings, weed: SeaweedFS) -> None:
        self.base, self.settings, self.weed = base, settings, weed

    def pipeline_info(self) -> dict[str, dict]:
        """replica id -> its info (with its pid), asking until both replicas have answered."""
        from ray import serve

        from step1x_edit.deploy.app import APP_NAME, PIPELINE

        handle = serve.get_deployment_handle(PIPELINE, app_name=APP_NAME)
        seen: dict[str, dict] = {}
        deadline = time.monotonic() + 60
        while len(seen) < 2 and time.monotonic() < deadline:
            info = handle.info.remote().result(timeout_s=30)
            seen[info["replica"]] = info
        return seen


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    import ray
    from ray import serve

    from step1x_edit.deploy.app import APP_NAME, build_application

    weed = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    with aws_env(weed.env()):  # the replicas inherit the credentials (boto3's standard chain)
        weed.start()
        port = free_port()
        settings = dev_settings(tmp_path_factory.mktemp("ray"), replicas="2", storage_url=f"s3://{BUCKET}/ray/",
                                s3_endpoint_url=weed.endpoint, url_signing_key=LINK_KEY, api_keys=KEY,
                                max_ongoing_requests=2, queue_depth=8, batch_max_images=2, request_timeout_s=300)
        t0 = time.monotonic()
        ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, namespace="step1x-test",
                 logging_level="WARNING", log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(build_application(settings), name=APP_NAME, route_prefix="/", blocking=False)
            base = f"http://127.0.0.1:{port}"
            assert wait_until(lambda: httpx.get(base + "/ready", timeout=5).status_code == 200, 180, 0.5)
            print(f"\nRay cluster + 2 replicas ready in {time.monotonic() - t0:.1f} s")
            yield Cluster(base, settings, weed)
        finally:
            serve.shutdown()
            ray.shutdown()
            weed.stop()


def edit(base: str, seed: int, steps: int = 4, **fields) -> httpx.Response:
    body = {"model": MODEL, "prompt": "make it snowy", "image": data_uri(), "steps": steps, "seed": seed, **fields}
    return httpx.post(base + "/v1/images/generations", json=body, headers=AUTH, timeout=300)


def assert_openai_error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    return body["error"]


def test_requests_spread_over_both_replicas_and_every_link_downloads_through_either_path(cluster, tmp_path):
    replicas = cluster.pipeline_info()
    assert len(replicas) == 2
    with cf.ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda i: edit(cluster.base, seed=i), range(6)))
    assert [r.status_code for r in answers] == [200] * 6, [r.text for r in answers]
    assert {r.headers["x-step1x-replica"] for r in answers} == set(replicas)  # both replicas worked
    # a separate single-process server with the same bucket and key serves the Ray deployment's links
    with aws_env(cluster.weed.env()):
        other = start_server(dev_settings(tmp_path, storage_url=cluster.settings.storage_url,
                                          s3_endpoint_url=cluster.weed.endpoint, url_signing_key=LINK_KEY))
    try:
        for resp in answers:
            url = resp.json()["data"][0]["url"]
            via_ray = httpx.get(url, timeout=30)
            via_other = httpx.get(url.replace(cluster.base, other.base_url), timeout=30)
            assert via_ray.status_code == via_other.status_code == 200
            assert via_ray.content == via_other.content and via_ray.content.startswith(PNG)
        # and the other way round: a link made by the single-process server downloads through Ray
        mine = edit(other.base_url, seed=99)
        assert mine.status_code == 200, mine.text
        url = mine.json()["data"][0]["url"]
        assert httpx.get(url.replace(other.base_url, cluster.base), timeout=30).content == httpx.get(url).content
    finally:
        other.stop()


def test_the_http_app_is_the_same_as_the_single_process_servers(cluster):
    assert_openai_error(httpx.get(cluster.base + "/v1/models", timeout=30), 401)
    bad = edit(cluster.base, seed=1, steps=99)
    assert assert_openai_error(bad, 400)["code"] == "invalid_value" and "steps" in bad.text
    with httpx.stream("POST", cluster.base + "/v1/images/generations", headers=AUTH, timeout=120, json={
            "model": MODEL, "prompt": "p", "image": data_uri(), "steps": 3, "seed": 5, "stream": True,
            "partial_images": 1, "stream_progress": True}) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        kinds = [line.split(": ", 1)[1] for line in resp.iter_lines() if line.startswith("event: ")]
    assert kinds[0] == "image_generation.progress" and "image_generation.partial_image" in kinds
    assert kinds[-1] == "image_generation.completed"
    models = httpx.get(cluster.base + "/v1/models", headers=AUTH, timeout=30).json()
    assert models["data"][0]["preset"] == "dev" and models["data"][0]["ready"] is True


def test_overload_is_a_429_with_retry_after(cluster):
    """2 replicas x 2 ongoing + 8 queued in Ray Serve: of 20 requests at once some must be refused, as 429s."""
    with cf.ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda i: edit(cluster.base, seed=i, steps=4), range(20)))
    codes = sorted(r.status_code for r in answers)
    assert set(codes) == {200, 429}, [(r.status_code, r.text[:200]) for r in answers]
    for resp in answers:
        if resp.status_code == 429:
            assert assert_openai_error(resp, 429)["code"] == "queue_full"
            assert int(resp.headers["retry-after"]) >= 1


def test_a_replica_killed_under_load_fails_only_its_requests_cleanly(cluster):
    replicas = cluster.pipeline_info()
    victim_id, victim = sorted(replicas.items())[0]
    with cf.ThreadPoolExecutor(7) as pool:
        futures = [pool.submit(edit, cluster.base, i, 12) for i in range(7)]
        # kill it once it holds work: the ingress's gauge of running jobs says when both replicas are busy
        def busy() -> bool:
            text = httpx.get(cluster.base + "/metrics", headers=AUTH, timeout=10).text
            return any(line.startswith("step1x_running_jobs") and float(line.split()[-1]) >= 3
                       for line in text.splitlines())
        wait_until(busy, 60, 0.2)
        os.kill(victim["pid"], signal.SIGKILL)
        answers = [f.result() for f in futures]
    codes = [r.status_code for r in answers]
    assert set(codes) <= {200, 503, 429}, [(r.status_code, r.text[:300]) for r in answers]
    assert 503 in codes and 200 in codes, codes
    for resp in answers:
        if resp.status_code == 200:
            assert httpx.get(resp.json()["data"][0]["url"], timeout=30).content.startswith(PNG)
        else:
            error = assert_openai_error(resp, resp.status_code)
            assert int(resp.headers["retry-after"]) >= 1 and error["message"]
    # Ray Serve replaces the dead replica; requests succeed again on two replicas
    healed = cluster.pipeline_info
    assert wait_until(lambda: len(healed()) == 2 and victim_id not in healed(), 180, 2)
    # every success names a pipeline replica: the survivor, or the replacement (a request still waiting in Ray's
    # router when the victim died may run there)
    ran = {resp.headers["x-step1x-replica"] for resp in answers if resp.status_code == 200}
    assert ran <= set(replicas) | set(healed()), (ran, set(replicas), set(healed()))
    assert edit(cluster.base, seed=1).status_code == 200


def test_the_serve_command_starts_ray_deploys_and_stops_cleanly(tmp_path):
    """`step1x-edit serve --ray --replicas 1` as a user runs it: a local Ray instance, the banner with the start-up
    time, an edit answered by a pipeline replica, and SIGTERM tearing it all down (exit 0)."""
    import subprocess
    import threading

    port = free_port()
    env = {**os.environ, "STEP1X_PRESET": "dev", "STEP1X_DEVICE": "cpu", "STEP1X_SIZE_LEVEL": "256",
           "STEP1X_API_KEYS": KEY}
    env.pop("RAY_ADDRESS", None)  # a local instance, not a cluster this machine may know
    proc = subprocess.Popen([sys.executable, "-m", "step1x_edit.cli", "serve", "--ray", "--replicas", "1", "--port",
                             str(port), "--storage-dir", str(tmp_path / "images"), "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    log: list[str] = []
    threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True).start()
    try:
        assert wait_until(lambda: any("Ray Serve on" in line for line in log) or proc.poll() is not None, 300, 0.5)
        banner = next((line for line in log if "Ray Serve on" in line), "")
        assert f"http://127.0.0.1:{port}/v1" in banner and "Ray up in" in banner, "".join(log)[-3000:]
        base = f"http://127.0.0.1:{port}"
        assert wait_until(lambda: httpx.get(base + "/ready", timeout=5).status_code == 200, 120, 0.5)
        resp = edit(base, seed=2, response_format="b64_json")
        assert resp.status_code == 200, resp.text
        assert not resp.headers["x-step1x-replica"].startswith("ingress-")  # a pipeline replica ran it
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0, "".join(log)[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


_DEPLOY_CONFIG = r'''
import sys, time, yaml, httpx, ray
from ray import serve
from ray.serve.schema import ServeDeploySchema
from ray.serve._private import api as serve_api  # what `serve run CONFIG.yaml` calls (ray/serve/scripts.py)

path, port, storage = sys.argv[1], int(sys.argv[2]), sys.argv[3]
config = yaml.safe_load(open(path))
config["http_options"] = {"host": "127.0.0.1", "port": port}
(app,) = config["applications"]
app["args"].update(preset="dev", size_level=256, device="cpu", storage_dir=storage)  # a CPU trial of the file
for deployment in app["deployments"]:
    if deployment["name"] == "Step1XPipeline":
        deployment["num_replicas"] = 1
        deployment["ray_actor_options"]["num_gpus"] = 0
schema = ServeDeploySchema.model_validate(config)
ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, namespace="serve", logging_level="ERROR",
         log_to_driver=False)
try:
    client = serve_api.serve_start(http_options=schema.http_options.model_dump(), proxy_location=schema.proxy_location)
    client.deploy_apps(schema, _blocking=False)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        try:
            if httpx.get(base + "/ready", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    sys.path.insert(0, sys.argv[4])
    from server_fixtures import data_uri
    r = httpx.post(base + "/v1/images/generations", timeout=120, json={
        "model": "stepfun-ai/step1x-edit", "prompt": "p", "image": data_uri(), "steps": 2, "seed": 1,
        "response_format": "b64_json"})
    print("STATUS", r.status_code, r.headers.get("x-step1x-replica"), flush=True)
finally:
    serve.shutdown()
    ray.shutdown()
'''


def test_the_documented_ray_serve_config_file_deploys(tmp_path):
    """docs/ray-serve.yaml deployed as `serve run` does (its import path, args and deployment options), as a CPU
    trial: the app comes up and answers an edit from a pipeline replica."""
    import subprocess
    from pathlib import Path

    docs = Path(__file__).resolve().parents[1] / "docs" / "ray-serve.yaml"
    done = subprocess.run([sys.executable, "-c", _DEPLOY_CONFIG, str(docs), str(free_port()), str(tmp_path / "img"),
                           os.path.dirname(__file__)], capture_output=True, text=True, timeout=420,
                          env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    status = [line for line in done.stdout.splitlines() if line.startswith("STATUS")]
    assert done.returncode == 0 and status, (done.stdout[-2000:], done.stderr[-4000:])
    _, code, replica = status[0].split()
    assert code == "200" and not replica.startswith("ingress-")
