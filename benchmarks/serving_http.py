"""The HTTP path of the serving benchmark (issue 13): one short text per request, where each request's CPU goes.

One process per HTTP front, since Ray reads the mode from the environment when it starts:
- `ray`: Serve's Python HTTP proxy in front of the replica (the default of `adistill serve`);
- `haproxy`: Serve's high-throughput mode (`RAY_SERVE_THROUGHPUT_OPTIMIZED=1`, `RAY_SERVE_ENABLE_HA_PROXY=1`):
  HAProxy in front, the replica its own HTTP server (`adistill serve --http-proxy haproxy`, k8s/rayservice.yaml).

For each number of clients: p50/p99, requests/s, rows per encoder forward, and CPU-milliseconds per request of
every process on the machine over the timed window (benchmarks/loadgen.py), with the forward's own CPU (measured on
the forward thread by the replica) taken out of the replica's: `path_cpu_ms_per_request` = the CPU of the proxy,
HAProxy, the replica outside the forward and Ray's serving processes (controller, HAProxy manager, raylet, GCS),
per request. The load generator's CPU is reported beside it, not in it.

    python benchmarks/serving_http.py --proxy haproxy --out /tmp/http.json      # serving.py runs this per mode

`--source DIR` measures another checkout of adistill the same way (serving.py `--compare-commit` passes a git worktree
of an earlier commit, e.g. the two-deployment design before issue 13); a checkout whose replicas do not report the
forward's CPU gets `path_cpu_ms_per_request: null` and only the per-process table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

HAPROXY_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}
SHORT = ["how do i pay my bill", "what is my balance", "book a table for two", "reset my password"]
SERVICE = ("replica:", "proxy", "haproxy", "ray:HAProxyManager", "ray:ServeController", "raylet", "gcs_server")

log = logging.getLogger("benchmarks.serving_http")


def is_service(group: str) -> bool:
    return group.startswith(SERVICE)


def measure(
    proxy: str, spec: str | None, batch: int, levels: list[int], seconds: float, label: str | None = None
) -> dict[str, Any]:
    if proxy == "haproxy":
        os.environ.update(HAPROXY_ENV)  # before Ray (and Ray Serve) is imported
    sys.path.insert(0, str(Path(__file__).parent))
    import httpx
    import ray
    from loadgen import ProcessCpu, Request, encode, run_clients
    from ray import serve
    from serving import free_port, tenant_files

    from adistill.backbone import load_backbone
    from adistill.distributed.serve import build_app
    from adistill.store.keys import create_key
    from adistill.store.registry import Registry

    backbone = load_backbone(spec)
    root = Path(tempfile.mkdtemp(prefix="adistill-http-")) / "registry"
    registry = Registry(str(root))
    tenants = [f"http-{i:02d}" for i in range(20)]
    for i, t in enumerate(tenants):
        registry.publish(t, tenant_files(backbone, t, seed=100 + i))
    key = create_key(str(root), admin=True, name="bench")  # auth on, as deployed
    headers = {"Authorization": f"Bearer {key}"}
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = {
            "registry": str(root),
            "backbone": spec,
            "device": "cpu",
            "max_batch_size": batch,
            "batch_wait_timeout_s": 0.005,
            "ray_actor_options": {"num_cpus": 1},  # one torch thread: forward CPU = the forward thread's clock
            "quota": {"requests_per_s": None, "rows_in_flight": None},  # throughput, not quotas, is measured
        }
        serve.run(build_app(config), name="bench", route_prefix="/")

        def stream(seed: int) -> Any:
            j = 0
            while True:
                t = tenants[(seed * 7 + j) % len(tenants)]
                body = {"texts": [SHORT[j % len(SHORT)]]}
                yield Request(t, encode("POST", f"/v1/tenants/{t}/predict", f"127.0.0.1:{port}", body, headers))
                j += 1

        def check(request: Any, status: int, body: bytes) -> None:
            if status != 200:
                raise RuntimeError(f"HTTP {status}: {body[:200]!r}")

        for t in tenants:  # every tenant loaded before timing
            httpx.post(f"{url}/v1/tenants/{t}/predict", json={"texts": ["hello"]}, headers=headers, timeout=60)
        rows = []
        for clients in levels:
            asyncio.run(run_clients("127.0.0.1", port, [stream(s) for s in range(clients)], 2.0, check))  # warm
            before = httpx.get(f"{url}/metrics", headers=headers, timeout=30).json()
            cpu = ProcessCpu()
            cpu.start()
            result = asyncio.run(run_clients("127.0.0.1", port, [stream(s) for s in range(clients)], seconds, check))
            groups = cpu.stop()
            after = httpx.get(f"{url}/metrics", headers=headers, timeout=30).json()
            rows.append(level_row(label or proxy, clients, result, groups, before, after))
            log.warning("http %s: %s", proxy, rows[-1])
        return {"proxy": proxy, "rows": rows}
    finally:
        serve.shutdown()
        ray.shutdown()


def level_row(
    proxy: str, clients: int, result: Any, groups: dict[str, float], before: dict[str, Any], after: dict[str, Any]
) -> dict[str, Any]:
    import numpy as np

    n = sum(len(v) for v in result.latencies.values())
    lat = np.asarray(result.all_latencies())
    batches = after["batches"] - before["batches"]
    known = "forward_cpu_seconds_total" in after  # not reported by checkouts before issue 13
    forward_cpu = after["forward_cpu_seconds_total"] - before["forward_cpu_seconds_total"] if known else 0.0
    forward_wall = after["forward_seconds_total"] - before["forward_seconds_total"]
    service = {g: s for g, s in groups.items() if is_service(g)}
    replica = sum(s for g, s in service.items() if g.startswith("replica:"))
    per_process = {g: round(1000 * s / n, 3) for g, s in service.items()}
    if known:
        per_process["replica outside the forward"] = round(1000 * (replica - forward_cpu) / n, 3)
    return {
        "proxy": proxy,
        "clients": clients,
        "requests": n,
        "req_per_s": round(n / result.wall_s, 1),
        "p50_ms": round(1000 * float(np.percentile(lat, 50)), 2),
        "p99_ms": round(1000 * float(np.percentile(lat, 99)), 2),
        "rows_per_forward": round((after["rows"] - before["rows"]) / batches, 2) if batches else None,
        "forward_ms_per_batch": round(1000 * forward_wall / batches, 2) if batches else None,
        "forward_cpu_ms_per_request": round(1000 * forward_cpu / n, 3) if known else None,
        "path_cpu_ms_per_request": round(1000 * (sum(service.values()) - forward_cpu) / n, 3) if known else None,
        "cpu_ms_per_request": per_process,
        "client_cpu_ms_per_request": round(1000 * result.client_cpu_s / n, 3),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--proxy", choices=("ray", "haproxy"), required=True)
    p.add_argument("--backbone", default=None, help="backbone spec (default all-MiniLM-L6-v2)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 64])
    p.add_argument("--seconds", type=float, default=15.0, help="timed window per level")
    p.add_argument("--out", required=True)
    p.add_argument("--source", default=None, help="another checkout's folder: measure its adistill instead")
    p.add_argument("--label", default=None, help="the front's name in the results (default: --proxy)")
    args = p.parse_args(argv)
    if args.source:
        sys.path.insert(0, str(Path(args.source).resolve()))  # before adistill is imported (in measure)
        for name in [m for m in sys.modules if m == "adistill" or m.startswith("adistill.")]:
            del sys.modules[name]
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    start = time.perf_counter()
    report = measure(args.proxy, args.backbone, args.batch, args.clients, args.seconds, args.label)
    report["seconds"] = round(time.perf_counter() - start, 1)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
