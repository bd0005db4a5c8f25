"""Outputs in an S3-compatible object store (`storage/s3.py`), against a real one: SeaweedFS on 127.0.0.1.

Covered: a link made by one server process is served by another process sharing the bucket and the link key;
S3 presigned links; expiry (the link, and the janitor deleting the object); the store going away mid-run (503s in
the OpenAI error shape, b64_json unaffected) and coming back; a server restart; start-up refusals that say what to
set.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from s3_fixtures import BUCKET, SeaweedFS, aws_env  # noqa: E402
from server_fixtures import KEY, data_uri, dev_settings, free_port, start_server, wait_until  # noqa: E402

pytestmark = pytest.mark.timeout(300)

MODEL = "stepfun-ai/step1x-edit"
LINK_KEY = "0123456789abcdef0123456789abcdef-test-link-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def weed(tmp_path_factory):
    store = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    with aws_env(store.env()):
        store.start()
        try:
            yield store
        finally:
            store.stop()


def s3_settings(tmp: Path, weed: SeaweedFS, prefix: str, **overrides):
    values = dict(storage_url=f"s3://{BUCKET}/{prefix}", s3_endpoint_url=weed.endpoint, url_signing_key=LINK_KEY,
                  api_keys=KEY, batch_max_images=4)
    values.update(overrides)
    return dev_settings(tmp, **values)


def edit(base: str, **fields) -> httpx.Response:
    body = {"model": MODEL, "prompt": "make it snowy", "image": data_uri(), "steps": 2, "seed": 3, **fields}
    return httpx.post(base + "/v1/images/generations", json=body, headers=AUTH, timeout=120)


def keys_under(weed: SeaweedFS, prefix: str) -> list[str]:
    listing = weed.client().list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return sorted(item["Key"] for item in listing.get("Contents", []))


def assert_error(resp: httpx.Response, status: int, code: str) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and body["error"]["code"] == code and body["error"]["message"], body
    assert body["error"]["param"] == resp.headers["x-request-id"]
    return body["error"]


def test_a_link_from_one_server_process_is_served_by_another(weed, tmp_path):
    """Two servers sharing the bucket and STEP1X_URL_SIGNING_KEY: A (in this process) makes the outputs, B (a
    `step1x-edit serve` process) serves A's links, byte for byte; a tampered link is refused by both."""
    a = start_server(s3_settings(tmp_path / "a", weed, "shared/"))
    port = free_port()
    env = {**os.environ, **weed.env(), "STEP1X_API_KEYS": KEY, "STEP1X_URL_SIGNING_KEY": LINK_KEY,
           "STEP1X_PRESET": "dev", "STEP1X_DEVICE": "cpu", "STEP1X_SIZE_LEVEL": "256"}
    b = subprocess.Popen([sys.executable, "-m", "step1x_edit.cli", "serve", "--port", str(port), "--log-level",
                          "warning", "--storage-url", f"s3://{BUCKET}/shared/", "--s3-endpoint-url", weed.endpoint,
                          "--storage-dir", str(tmp_path / "unused")], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    log: list[str] = []
    threading.Thread(target=lambda: log.extend(b.stdout), daemon=True).start()
    try:
        resp = edit(a.base_url, n=2)
        assert resp.status_code == 200, resp.text
        assert resp.headers["x-step1x-replica"] == a.app.state.server.engine.replica_id
        urls = [d["url"] for d in resp.json()["data"]]
        names = [urlsplit(u).path.rsplit("/", 1)[1] for u in urls]
        assert keys_under(weed, "shared/") == sorted(f"shared/{n}" for n in names)  # written before the answer
        b_base = f"http://127.0.0.1:{port}"

        def b_up() -> bool:
            try:
                return httpx.get(b_base + "/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return b.poll() is not None
        assert wait_until(b_up, 120, 0.2) and b.poll() is None, "".join(log)
        for url in urls:
            via_a = httpx.get(url, timeout=30)
            via_b = httpx.get(url.replace(a.base_url, b_base), timeout=30)
            assert via_a.status_code == via_b.status_code == 200, (via_a.text, via_b.text)
            assert via_a.content == via_b.content and via_a.content.startswith(PNG)
            assert via_b.headers["content-type"] == "image/png"
            assert via_b.headers["x-step1x-replica"] != via_a.headers["x-step1x-replica"]  # two processes
            sig = parse_qs(urlsplit(url).query)["sig"][0]
            forged = url.replace(a.base_url, b_base).replace(sig, ("0" if sig[0] != "0" else "1") + sig[1:])
            assert_error(httpx.get(forged, timeout=30), 404, "not_found")
    finally:
        a.stop()
        b.terminate()
        b.wait(60)


def test_presigned_links_download_from_the_store(weed, tmp_path):
    server = start_server(s3_settings(tmp_path, weed, "presigned/", s3_presigned=True, url_signing_key=None))
    try:
        resp = edit(server.base_url)
        assert resp.status_code == 200, resp.text
        url = resp.json()["data"][0]["url"]
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        assert url.startswith(f"{weed.endpoint}/{BUCKET}/presigned/") and query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
        assert query["X-Amz-Expires"] == ["604800"]  # the hosted API's 7 days, SigV4's longest
        got = httpx.get(url, timeout=30)
        assert got.status_code == 200 and got.content.startswith(PNG)
        tampered = url.replace("presigned/", "presigned/x", 1)
        assert httpx.get(tampered, timeout=30).status_code == 403
    finally:
        server.stop()


def test_presigned_links_longer_than_seven_days_are_refused_at_start(weed, tmp_path):
    from step1x_edit.storage import open_store

    with pytest.raises(ValueError, match="at most 7 days"):
        open_store(s3_settings(tmp_path, weed, "p/", s3_presigned=True, url_expiry_s=8 * 24 * 3600))


def test_expired_links_are_refused_and_the_janitor_deletes_their_objects(weed, tmp_path):
    from step1x_edit.storage.s3 import S3ImageStore

    now = [time.time()]
    store = S3ImageStore(f"s3://{BUCKET}/expiry/", expiry_s=60, key=LINK_KEY.encode(), endpoint_url=weed.endpoint,
                         clock=lambda: now[0])
    name = store.put(PNG + b"an image", "png")
    weed.client().put_object(Bucket=BUCKET, Key="expiry/not-ours.txt", Body=b"someone else's")
    q = parse_qs(urlsplit(store.link(name)).query)
    blob = store.open(name, q["expires"][0], q["sig"][0])
    assert blob is not None and b"".join(blob.chunks) == PNG + b"an image" and blob.media_type == "image/png"
    assert store.expire() == 0  # young: kept
    now[0] += 62  # a minute later (+1: expiries round up to whole seconds; +1: LastModified is whole seconds) (the objects' LastModified is the store's clock)
    assert store.open(name, q["expires"][0], q["sig"][0]) is None
    assert store.expire() == 1
    assert keys_under(weed, "expiry/") == ["expiry/not-ours.txt"]  # only this server's objects go


def test_the_store_going_away_mid_run_gives_503s_and_coming_back_heals(weed, tmp_path):
    """The store dies between requests: url answers are 503 (OpenAI shape, Retry-After) and are never links to
    nothing; file links are 503; b64_json still works. The store comes back: old links serve again, new url answers
    work; and a restarted server serves the links of the one before."""
    settings = s3_settings(tmp_path, weed, "outage/")
    server = start_server(settings)
    try:
        first = edit(server.base_url)
        assert first.status_code == 200, first.text
        link = first.json()["data"][0]["url"]
        weed.stop()
        try:
            before = time.monotonic()
            down = edit(server.base_url)
            assert time.monotonic() - before < 60  # fails fast, no hanging on a dead store
            error = assert_error(down, 503, "storage_unavailable")
            assert "retry" in error["message"] and int(down.headers["retry-after"]) > 0
            assert_error(httpx.get(link, timeout=30), 503, "storage_unavailable")
            inline = edit(server.base_url, response_format="b64_json")
            assert inline.status_code == 200 and inline.json()["data"][0]["b64_json"]
        finally:
            weed.start()
        again = httpx.get(link, timeout=30)
        assert again.status_code == 200 and again.content.startswith(PNG)
        assert edit(server.base_url).status_code == 200
    finally:
        server.stop()
    restarted = start_server(settings)
    try:
        after = httpx.get(link.replace(server.base_url, restarted.base_url), timeout=30)
        assert after.status_code == 200 and after.content == again.content
    finally:
        restarted.stop()


def test_start_up_refuses_a_configuration_that_cannot_work(weed, tmp_path):
    from step1x_edit.api.app import create_app

    with pytest.raises(ValueError, match="STEP1X_URL_SIGNING_KEY"):  # links would not verify on other replicas
        create_app(s3_settings(tmp_path, weed, "p/", url_signing_key=None))
    with pytest.raises(ValueError, match="bucket"):
        create_app(s3_settings(tmp_path, weed, "p/", storage_url="s3://no-such-bucket-here/p/"))
    # the command line says the same and exits 2, before loading anything
    env = {**os.environ, **weed.env(), "STEP1X_STORAGE_URL": f"s3://{BUCKET}/p/",
           "STEP1X_S3_ENDPOINT_URL": weed.endpoint}
    done = subprocess.run([sys.executable, "-m", "step1x_edit.cli", "serve", "--port", str(free_port())], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "STEP1X_URL_SIGNING_KEY" in done.stderr and "openssl rand" in done.stderr


def test_without_the_s3_extra_the_error_names_it(tmp_path):
    code = ("import sys; sys.modules['boto3'] = None\n"
            "from step1x_edit.settings import Settings\nfrom step1x_edit.storage import open_store\n"
            f"open_store(Settings(storage_url='s3://b/p', url_signing_key='{LINK_KEY}'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "[s3] extra" in done.stderr and "pip install" in done.stderr
