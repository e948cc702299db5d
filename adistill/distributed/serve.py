"""Ray Serve: every tenant behind one shared backbone replica group, with mixed-tenant batches.

One deployment, `EncoderGroup` (adistill.distributed.serve_group): each replica serves the HTTP API of
docs/serving.md itself (FastAPI app and front door in serve_http: API keys 401/403, quotas 429, JSON errors) and holds
the frozen encoder, a `TenantCache` (host memory, bytes-bounded, hot versions) and an `Engine` (device-side adapter
bank). Each text becomes one row `(tenant_id, text, top_k)` queued in a `FairBatcher`, which fills every batch
round-robin across the tenants with rows waiting: rows of *different* tenants share one encoder forward, and a tenant
with a deep queue cannot push another tenant's rows behind its own. `@serve.multiplexed` is not used: it splits every
batch by model id (docs/serving.md, "Replica affinity"). A separate ingress deployment was measured and removed: it
cost a handle call and a process's CPU per request (benchmarks/results/serving.md).

Build the application with `build_app(args)` (`serve run adistill.distributed.serve:build_app registry=./registry` or a
file under serve_apps/); `args` becomes a frozen `ServeConfig` once, here at the edge. `adistill serve` calls
`run_until_interrupted`; the demo and tests use `serving`.

No `from __future__ import annotations` here: Serve reads the deployment signatures at runtime.
"""

import contextlib
import logging
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ray import serve

from adistill.distributed import serve_gate
from adistill.distributed.common import ensure_ray
from adistill.distributed.serve_group import EncoderGroup
from adistill.errors import ConfigError
from adistill.inference.serve_config import ServeConfig

log = logging.getLogger(__name__)

APP_NAME = "adistill"


# --------------------------------------------------------------------------------------------------------------
# The application
# --------------------------------------------------------------------------------------------------------------


def build(config: ServeConfig) -> serve.Application:
    """The deployment, sized from `config`."""
    scaling: dict[str, Any] = (
        {"autoscaling_config": config.autoscaling_config}
        if config.autoscaling_config
        else {"num_replicas": config.replicas}
    )
    return EncoderGroup.options(  # type: ignore[attr-defined]
        **scaling,
        max_ongoing_requests=config.ongoing_requests,
        ray_actor_options=with_gate(config.ray_actor_options),
    ).bind(config)


def with_gate(actor_options: dict[str, Any]) -> dict[str, Any]:
    """`actor_options` with Serve's HTTP middleware hook naming serve_gate in the replicas' environment (their own
    HTTP servers, in Serve's HAProxy mode, then refuse what the front door will refuse before Serve's bookkeeping);
    the caller's own runtime_env and env_vars are kept, and an import path they set for the hook wins."""
    runtime_env = dict(actor_options.get("runtime_env") or {})
    runtime_env["env_vars"] = {serve_gate.CALLBACK_ENV: serve_gate.CALLBACK, **(runtime_env.get("env_vars") or {})}
    return {**actor_options, "runtime_env": runtime_env}


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder for `serve run adistill.distributed.serve:build_app KEY=VALUE...` and serve_apps/*.yaml."""
    return build(ServeConfig.from_dict(args))


def check_port_free(host: str, port: int) -> None:
    """ConfigError naming the port when something already listens on host:port (checked before Ray starts)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is not "in use"
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ConfigError(
                f"port {port} on {host} is in use ({exc.strerror or exc}): stop what listens there or pass --port"
            ) from None


@contextlib.contextmanager
def quiet_serve_logs() -> Iterator[None]:
    """Serve's driver-side INFO lines ("Connecting to existing Serve app ... New http_options will not be applied",
    "Application ... is ready") read as if the user's options were ignored: callers print their own lines."""
    logger = logging.getLogger("ray.serve")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _running_http() -> tuple[str, int] | None:
    """(host, port) of the Serve instance already running on the connected cluster, else None."""
    from ray.serve.context import _get_global_client  # no public "is Serve running here?" call
    from ray.serve.exceptions import RayServeException

    try:
        client = _get_global_client(raise_if_no_controller_running=True)
    except RayServeException:
        return None
    if client is None:
        return None
    return str(client.http_config.host), int(client.http_config.port)


def _start(config: ServeConfig, host: str, port: int) -> str:
    """Deploy the app on the connected cluster (starting Serve's HTTP proxy at host:port unless Serve runs already,
    in which case its address must be that one); returns the base URL."""
    with quiet_serve_logs():
        running = _running_http()
        if running is None:
            serve.start(http_options={"host": host, "port": port})
        elif running != (host, port):
            raise ConfigError(
                f"Ray Serve already runs on this cluster with HTTP on {running[0]}:{running[1]}, and a cluster has one "
                f"HTTP address: pass --host {running[0]} --port {running[1]}"
            )
        serve.run(build(config), name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}"


def run_until_interrupted(
    config: ServeConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    address: str | None = None,
    ready: Callable[[str], object] | None = None,
) -> None:
    """`adistill serve`: start a private local Ray (or join `address` / `RAY_ADDRESS`), deploy the app, call
    `ready(url)`, block until Ctrl-C or SIGTERM (raised as KeyboardInterrupt), then clean up: a local Ray this call
    started is shut down whole (its processes may already be gone when SIGTERM went to the whole process group, as
    systemd sends it); on a cluster it joined, only the app is deleted. A busy port is a ConfigError before anything
    starts."""
    import os
    import signal
    import threading

    import ray

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    joining = address is not None or bool(os.environ.get("RAY_ADDRESS")) or ray.is_initialized()
    if not joining:
        check_port_free(host, port)
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local instance (STACK-NOTES)
    # "local": never attach to another process's instance (`ray start` leaves its address for plain ray.init())
    connected = ensure_ray(address if joining else "local")
    previous = None
    if threading.current_thread() is threading.main_thread():
        # after ray.init, which installs its own SIGTERM handler (log + abort): a stop cleans up like Ctrl-C
        previous = signal.signal(signal.SIGTERM, stop)
    haproxy: set[str] = set()  # config files of the HAProxy processes our local Ray started (high-throughput mode)
    try:
        url = _start(config, host, port)
        log.info("adistill serving %s at %s", config.registry, url)
        if ready is not None:
            ready(url)
        while True:
            if not joining:
                haproxy |= _haproxy_configs()
            time.sleep(1.0)
    finally:
        try:
            if joining:
                with quiet_serve_logs(), contextlib.suppress(Exception):
                    serve.delete(APP_NAME)  # the cluster's Serve keeps running for its other applications
                if connected:
                    ray.shutdown()  # disconnects; the cluster goes on
            else:
                _stop_local_ray()
                _stop_haproxy(haproxy)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


def _stop_local_ray(timeout_s: float = 15.0) -> None:
    """Stop the local Ray this process started, Serve with it (no Serve shutdown call first: that only waits on a
    controller that dies with the cluster anyway, and prints a task failure). Bounded: if Ray's own shutdown hangs
    on processes that are already gone, they are killed and the call returns."""
    import threading

    import ray

    done = threading.Event()

    def shutdown() -> None:
        with contextlib.suppress(Exception):
            ray.shutdown()
        done.set()

    threading.Thread(target=shutdown, name="ray-shutdown", daemon=True).start()
    if not done.wait(timeout_s):
        log.warning("Ray did not stop within %.0f s; killing its processes", timeout_s)
        node = getattr(ray._private.worker, "_global_node", None)
        if node is not None:
            with contextlib.suppress(Exception):
                node.kill_all_processes(check_alive=False, allow_graceful=False)


def _haproxy_processes() -> Iterator[tuple[int, str, int]]:
    """(pid, command line, parent pid) of every HAProxy process on this machine (Linux /proc)."""
    import os

    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/cmdline").read_bytes()
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        cmdline = raw.replace(b"\0", b" ").decode(errors="replace")
        if "haproxy" in cmdline.split(" ")[0]:
            yield int(entry), cmdline, int(stat[stat.rfind(")") + 2 :].split()[1])


def _haproxy_configs() -> set[str]:
    """Config files of the HAProxy processes descended from this process: Serve's high-throughput mode starts one
    per node from its HAProxy manager actor, in a session of its own, so a stop of our process group misses it."""
    import os

    procs = list(_haproxy_processes())
    if not procs:
        return set()
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                parents[int(entry)] = int(stat[stat.rfind(")") + 2 :].split()[1])
    me, found = os.getpid(), set()
    for pid, cmdline, _ in procs:
        ancestor, hops = pid, 0
        while ancestor not in (0, 1, me) and hops < 64:
            ancestor, hops = parents.get(ancestor, 0), hops + 1
        if ancestor == me:
            found |= {arg for arg in cmdline.split(" ") if arg.endswith(".cfg")}
    return found


def _stop_haproxy(configs: set[str]) -> None:
    """Stop the HAProxy processes our local Ray started (matched by their config files), which outlive Ray's
    shutdown when the whole process group was signalled."""
    import os
    import signal

    if not configs:
        return
    for pid, cmdline, _ in _haproxy_processes():
        if any(cfg in cmdline for cfg in configs):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)


@contextlib.contextmanager
def serving(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000) -> Iterator[str]:
    """Serve `config` on the Ray this process is connected to while the block runs (yields the base URL), then delete
    the app: what the demo uses. Serve itself (its controller and HTTP proxy) stops with the Ray instance: a
    `serve.shutdown()` here would only print a task failure ("graceful_shutdown failed") for a controller that has
    nothing left to serve."""
    url = _start(config, host, port)
    try:
        yield url
    finally:
        with quiet_serve_logs(), contextlib.suppress(Exception):
            serve.delete(APP_NAME)


__all__ = [
    "APP_NAME",
    "EncoderGroup",
    "ServeConfig",
    "build",
    "build_app",
    "run_until_interrupted",
    "serving",
]
