"""Fairness benchmark (issue 15): does one tenant flooding the service slow another tenant down?

One Ray Serve application (auth on, the default quotas unless --no-quotas, one encoder replica), two tenants on
one backbone, real HTTP on loopback. In one run:
1. `alone`: the quiet tenant sends --requests requests from 1 client (one short text each), nothing else runs;
2. `flood`: the flooding tenant sends from --flood-clients clients (a closed loop, in a separate process, each client
   waiting `Retry-After` after a 429 as a well-behaved client does; --flood-ignores-retry-after to hammer) while the
   quiet tenant sends --requests requests from 1 client;
3. `alone` again (the machine may drift during a run: both alone phases are pooled).
Reported: the quiet tenant's p50/p99 alone and under the flood, their ratio (target: p99 under flood <= 2x alone),
the flood's throughput and 429s, and batching figures from /metrics.

    nice python benchmarks/fairness.py --backbone minilm                  # the full run
    python benchmarks/fairness.py --quick                                 # a smoke run: tiny encoder, few requests

Writes JSON + Markdown (default benchmarks/results/fairness.{json,md}).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import multiprocessing as mp
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import httpx
from loadgen import ProcessCpu, encode, read_response
from serving import backbone_spec, free_port, pct, tenant_files

from adistill.backbone import load_backbone
from adistill.inference.gc_pauses import freeze_startup_heap
from adistill.inference.serve_config import ServeConfig
from adistill.store.keys import create_key
from adistill.store.registry import Registry

log = logging.getLogger("benchmarks.fairness")
QUIET_TEXTS = ["how do i pay my bill", "what is my balance", "book a table for two", "reset my password"]
FLOOD_TEXT = "please tell me the balance of my savings account today"


def flood(url: str, key: str, clients: int, texts: int, honor_retry: bool, started: Any, stop: Any, out: Any) -> None:
    """The flooding tenant: a separate process, so its clients do not share the quiet client's event loop, and the
    lean client of benchmarks/loadgen.py (keep-alive asyncio streams, the request encoded once): httpx would spend
    about as much CPU per request as the service's own path, on the same cores as the encoder, and the quiet tenant
    would measure the benchmark's client rather than the service."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    request = encode(
        "POST",
        "/v1/tenants/flood/predict",
        f"{host}:{port}",
        {"texts": [FLOOD_TEXT] * texts},
        {"Authorization": f"Bearer {key}"},
    )

    async def main() -> dict[str, Any]:
        counts: dict[str, int] = {}
        latencies: list[float] = []

        async def one_client() -> None:
            conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
            while not stop.is_set():
                start = time.perf_counter()
                try:
                    if conn is None:
                        conn = await asyncio.open_connection(host, port)
                    conn[1].write(request)
                    status, head, _ = await read_response(conn[0])
                except (OSError, asyncio.IncompleteReadError) as exc:  # closed by the server: count, reconnect
                    counts[type(exc).__name__] = counts.get(type(exc).__name__, 0) + 1
                    conn = None
                    continue
                counts[str(status)] = counts.get(str(status), 0) + 1
                started.set()  # the flood is on: the parent starts its warm-up clock
                if status == 200:
                    latencies.append(time.perf_counter() - start)
                elif status == 429 and honor_retry:
                    retry = re.search(rb"(?i)\r\nretry-after:\s*(\d+)", head)
                    await asyncio.sleep(float(retry.group(1)) if retry else 1.0)
            if conn is not None:
                conn[1].close()

        start = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        wall = time.perf_counter() - start
        ok = sorted(latencies)
        return {
            "statuses": counts,
            "seconds": round(wall, 1),
            "ok_per_s": round(len(ok) / wall, 1) if wall else None,
            "p50_ms": round(1000 * ok[len(ok) // 2], 1) if ok else None,
            "p99_ms": round(1000 * ok[min(len(ok) - 1, int(0.99 * len(ok)))], 1) if ok else None,
        }

    out.put(asyncio.run(main()))


def quiet_phase(url: str, key: str, n: int) -> tuple[list[float], dict[str, int]]:
    """The quiet tenant: one client, one short text per request, one request after the other."""
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    with httpx.Client(base_url=url, timeout=120, headers={"authorization": f"Bearer {key}"}) as client:
        for i in range(n):
            start = time.perf_counter()
            r = client.post("/v1/tenants/quiet/predict", json={"texts": [QUIET_TEXTS[i % 4]]})
            statuses[str(r.status_code)] = statuses.get(str(r.status_code), 0) + 1
            if r.status_code == 200:
                latencies.append(time.perf_counter() - start)
    return latencies, statuses


def summary(latencies: list[float], statuses: dict[str, int]) -> dict[str, Any]:
    return {
        "requests": sum(statuses.values()),
        "statuses": statuses,
        "p50_ms": round(1000 * pct(latencies, 50), 2) if latencies else None,
        "p99_ms": round(1000 * pct(latencies, 99), 2) if latencies else None,
        "max_ms": round(1000 * max(latencies), 2) if latencies else None,
    }


def run(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    import ray

    from adistill.distributed import serve_gate
    from adistill.distributed.serve import serving

    spec = backbone_spec(args.backbone, scratch)
    backbone = load_backbone(spec)
    root = scratch / "registry"
    registry = Registry(str(root))
    for i, tenant in enumerate(("flood", "quiet")):
        registry.publish(tenant, tenant_files(backbone, tenant, seed=200 + i))
    admin = create_key(registry.uri, admin=True, name="bench")
    flood_key = create_key(registry.uri, tenant="flood", name="bench")
    quiet_key = create_key(registry.uri, tenant="quiet", name="bench")
    quota = {"requests_per_s": None, "rows_in_flight": None} if args.no_quotas else None
    flood_quota = {
        k: v
        for k, v in (
            ("requests_per_s", args.flood_requests_per_s),
            ("burst", args.flood_burst),
            ("rows_in_flight", args.flood_rows_in_flight),
        )
        if v is not None
    }
    app_args: dict[str, Any] = {
        "registry": str(root),
        "backbone": spec,
        "device": args.device,
        "precision": args.precision,
        "max_batch_size": args.batch,
        "batch_wait_timeout_s": 0.002,
        "contention_budget": None if args.contention_budget == "off" else float(args.contention_budget),
        "ray_actor_options": {
            "num_cpus": 1,
            **({"num_gpus": args.num_gpus} if args.num_gpus else {}),
            # --no-gate: Serve's middleware hook left empty, so every refusal passes Serve's bookkeeping first
            **({"runtime_env": {"env_vars": {serve_gate.CALLBACK_ENV: ""}}} if args.no_gate else {}),
        },
        "quota": quota,
        "tenant_quotas": {"flood": flood_quota} if flood_quota else None,
    }
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        with serving(ServeConfig.from_dict(app_args), "127.0.0.1", free_port()) as url:
            pinned = pin_replica() if args.pin_replica else None
            report = measure(args, url, admin, flood_key, quiet_key)
            report["pinned"] = pinned
    finally:
        ray.shutdown()
    report["backbone"] = backbone.name
    return report


def pin_replica() -> dict[str, Any]:
    """Every thread of the encoder replica on the last CPU, every other process of the run (this driver and its
    quiet client, Ray's processes, HAProxy, the HTTP proxy; the flood process, started later, inherits the driver's)
    on the others: a service whose clients do not run on its cores, as in production, on a machine too small to
    give them machines of their own."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("--pin-replica needs at least 2 CPUs")
    replica_cpus, other_cpus = {cpus[-1]}, set(cpus[:-1])
    pinned: dict[str, list[str]] = {"replica": [], "others": []}
    processes = {**ProcessCpu().snapshot(), str(os.getpid()): ("driver", 0.0)}
    for pid, (name, _) in processes.items():
        side = "replica" if name.startswith("replica:") else "others"
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):  # a thread that ended meanwhile
                os.sched_setaffinity(int(tid), replica_cpus if side == "replica" else other_cpus)
        pinned[side].append(name)
    if not pinned["replica"]:
        raise RuntimeError("no encoder replica process found to pin")
    return {"replica_cpus": sorted(replica_cpus), "other_cpus": sorted(other_cpus), **pinned}


def measure(args: argparse.Namespace, url: str, admin: str, flood_key: str, quiet_key: str) -> dict[str, Any]:
    """The three phases against a running service."""
    admin_headers = {"authorization": f"Bearer {admin}"}
    freeze_startup_heap()  # the quiet client's own full collections (torch and Ray loaded here) stay out of its clock
    quiet_phase(url, quiet_key, 10)  # warm: both tenants loaded, connections open
    with httpx.Client(base_url=url, timeout=60, headers={"authorization": f"Bearer {flood_key}"}) as c:
        c.post("/v1/tenants/flood/predict", json={"texts": [FLOOD_TEXT]})

    def metrics() -> dict[str, Any]:
        return dict(httpx.get(f"{url}/metrics", headers=admin_headers, timeout=60).json())

    alone_before = quiet_phase(url, quiet_key, args.requests)
    log.warning("alone (before): %s", summary(*alone_before))

    ctx = mp.get_context("spawn")
    started, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
    honor = not args.flood_ignores_retry_after
    flooder = ctx.Process(
        target=flood,
        args=(url, flood_key, args.flood_clients, args.flood_texts, honor, started, stop, out),
        daemon=True,
    )
    before = metrics()
    cpu = ProcessCpu()
    cpu.start()
    flooder.start()
    if not started.wait(timeout=300):
        raise RuntimeError("the flood did not start within 300 s")
    time.sleep(args.flood_warmup_s)  # the flood reaches its steady state before the quiet tenant measures
    under_flood = quiet_phase(url, quiet_key, args.requests)
    stop.set()
    flood_report = out.get(timeout=300)
    flooder.join(timeout=60)
    replica_cpu_s = sum(v for k, v in cpu.stop().items() if k.startswith("replica:"))
    after = metrics()
    log.warning("under flood: %s; flood: %s", summary(*under_flood), flood_report)

    alone_after = quiet_phase(url, quiet_key, args.requests)
    log.warning("alone (after): %s", summary(*alone_after))

    alone = (alone_before[0] + alone_after[0], _merged(alone_before[1], alone_after[1]))
    batches = after["batches"] - before["batches"]
    rows = after["rows"] - before["rows"]
    report = {
        "quiet_alone": summary(*alone),
        "quiet_alone_before": summary(*alone_before),
        "quiet_alone_after": summary(*alone_after),
        "quiet_under_flood": summary(*under_flood),
        "flood": flood_report,
        "during_flood": {
            "batches": batches,
            "mean_batch_rows": round(rows / batches, 2) if batches else None,
            "mean_batch_tenants": round(
                (after["mean_batch_tenants"] * after["batches"] - before["mean_batch_tenants"] * before["batches"])
                / batches,
                2,
            )
            if batches and before["mean_batch_tenants"] is not None
            else None,
            "forward_ms_per_batch": round(
                1000 * (after["forward_seconds_total"] - before["forward_seconds_total"]) / batches, 2
            )
            if batches
            else None,
            "max_waiting_rows": after["queue"]["max_waiting_rows"],
            "contention": {  # the limit and forwards timed at start-up; batches cut short and interjected meanwhile
                **after["contention"],
                **{k: after["contention"][k] - before["contention"][k] for k in COUNTED},
            },
            "refused": after["http"]["refused"]["by_tenant"],
            "replica_gc": _gc_during(before, after),
            # the replica's CPU (its HTTP server, routes and forwards) per request of the flood's
            "replica_cpu_s": round(replica_cpu_s, 2),
            "replica_cpu_ms_per_flood_request": round(1000 * replica_cpu_s / flood_requests, 3)
            if (flood_requests := sum(flood_report["statuses"].values()))
            else None,
        },
    }
    q_alone, q_flood = report["quiet_alone"], report["quiet_under_flood"]
    p99_ratio = q_flood["p99_ms"] / q_alone["p99_ms"] if q_alone["p99_ms"] and q_flood["p99_ms"] else None
    p50_ratio = q_flood["p50_ms"] / q_alone["p50_ms"] if q_alone["p50_ms"] and q_flood["p50_ms"] else None
    report["target"] = {
        "target": "quiet tenant p99 under flood <= 2 x its p99 alone",
        "p99_ratio": round(p99_ratio, 2) if p99_ratio else None,
        "p50_ratio": round(p50_ratio, 2) if p50_ratio else None,
        "met": bool(p99_ratio is not None and p99_ratio <= 2.0),
    }
    return report


def _gc_during(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The replica's collections during the flood, per generation: how many and their total pause; the longest pause
    since the replica started (cumulative in /metrics, so not per phase)."""
    b, a = before["gc"]["generations"], after["gc"]["generations"]
    return {
        "frozen_objects": after["gc"]["frozen_objects"],
        **{
            f"gen{g}": {
                "collections": a[g]["collections"] - b[g]["collections"],
                "total_ms": round(a[g]["total_ms"] - b[g]["total_ms"], 1),
                "max_ms_since_start": a[g]["max_ms"],
            }
            for g in ("0", "1", "2")
        },
    }


def _merged(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: a.get(k, 0) + b.get(k, 0) for k in sorted(set(a) | set(b))}


COUNTED = ("capped_batches", "interjected_batches")  # /metrics contention counters, reported per flood


def _contention_line(budget: str | None, c: dict[str, Any]) -> str:
    if not c.get("tenant_batch_rows"):
        return f"Short batches beside a light tenant and interjections: off (`contention_budget` {budget})."
    return (
        f"Beside a light tenant (`contention_budget` {budget}): at most {c['tenant_batch_rows']} row(s) of one tenant "
        f"per batch (the replica's forwards at start-up: 1 row {c['one_row_forward_ms']} ms, a full batch "
        f"{c['full_batch_forward_ms']} ms); {c['capped_batches']} batches cut short and "
        f"{c.get('interjected_batches', 0)} short batches run inside another forward during the flood."
    )


def markdown(report: dict[str, Any]) -> str:
    s, m = report["settings"], report["machine"]
    overrides = [
        template.format(s[key])
        for key, template in (
            ("flood_requests_per_s", "{} requests/s"),
            ("flood_burst", "burst {}"),
            ("flood_rows_in_flight", "{} rows in flight"),
        )
        if s.get(key) is not None
    ]
    lines = [
        f"# Fairness: one tenant flooding at {s['flood_clients']} clients, one quiet tenant at 1 client",
        "",
        f"{report['backbone']}, batch {s['batch']}, device {s['device']}, {s['requests']} quiet requests per phase, "
        f"quotas {'off' if s['no_quotas'] else 'default (ServeConfig)'}"
        + (f", the flooding tenant's own: {', '.join(overrides)}" if overrides else "")
        + ", flood clients "
        f"{'ignore' if s['flood_ignores_retry_after'] else 'honour'} Retry-After, HTTP front "
        f"{s.get('http_proxy', 'ray')}"
        + (", without the replica's gate (`--no-gate`)" if s.get("no_gate") else "")
        + f". {m['cpu']} ({m['cores']} cores), "
        f"{report['date']}; "
        + (
            f"the encoder replica pinned to CPU {report['pinned']['replica_cpus']}, the clients, Ray and the HTTP "
            f"front to CPUs {report['pinned']['other_cpus']} (`--pin-replica`)."
            if report.get("pinned")
            else "clients, HTTP front and encoder replica share the machine's cores."
        ),
        "",
        "| quiet tenant | requests | p50 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in ("quiet_alone_before", "quiet_under_flood", "quiet_alone_after", "quiet_alone"):
        r = report[name]
        label = {"quiet_alone": "alone (both phases pooled)"}.get(name, name.removeprefix("quiet_").replace("_", " "))
        lines.append(f"| {label} | {r['requests']} | {r['p50_ms']} | {r['p99_ms']} | {r['max_ms']} |")
    f, d, t = report["flood"], report["during_flood"], report["target"]
    lines += [
        "",
        f"Flood: {f['ok_per_s']} answered requests/s, p50/p99 {f['p50_ms']}/{f['p99_ms']} ms, statuses "
        f"{json.dumps(f['statuses'])}. During the flood: {d['batches']} batches, {d['mean_batch_rows']} rows and "
        f"{d['mean_batch_tenants']} tenants per batch, {d['forward_ms_per_batch']} ms per forward, at most "
        f"{d['max_waiting_rows']} rows waiting; refused per tenant {json.dumps(d['refused'])}. The replica's CPU "
        f"during the flood: {d.get('replica_cpu_s')} s, {d.get('replica_cpu_ms_per_flood_request')} ms per flood "
        "request (HTTP handling, routes and forwards).",
        "",
        _contention_line(report["settings"].get("contention_budget"), d.get("contention", {})),
        "",
        f"Replica garbage collector ({d['replica_gc']['frozen_objects']} start-up objects frozen by Serve): "
        + "; ".join(
            f"generation {g[-1]}: {v['collections']} collections during the flood, {v['total_ms']} ms in all, "
            f"longest since start {v['max_ms_since_start']} ms"
            for g, v in d["replica_gc"].items()
            if g.startswith("gen")
        )
        + ".",
        "",
        "| target | p99 ratio | p50 ratio | met |",
        "|---|---:|---:|---|",
        f"| {t['target']} | {t['p99_ratio']} | {t['p50_ratio']} | {'yes' if t['met'] else 'no'} |",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="minilm", help="tiny | minilm | HF folder")
    p.add_argument("--batch", type=int, default=32, help="max_batch_size of the encoder replica")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--precision", default="fp32", choices=("fp32", "int8"), help="the encoder's (int8: CPU only)")
    p.add_argument("--num-gpus", type=float, default=0, help="GPUs of the encoder replica (with --device cuda)")
    p.add_argument("--requests", type=int, default=300, help="quiet-tenant requests per phase")
    p.add_argument("--flood-clients", type=int, default=64)
    p.add_argument("--flood-texts", type=int, default=1, help="texts per flood request")
    p.add_argument("--flood-warmup-s", type=float, default=5.0, help="flood time before the quiet tenant measures")
    p.add_argument("--flood-ignores-retry-after", action="store_true", help="flood clients retry 429s at once")
    p.add_argument("--no-quotas", action="store_true", help="no per-tenant limits: the fair batch queue alone")
    p.add_argument("--flood-requests-per-s", type=float, default=None, help="the flooding tenant's own quota")
    p.add_argument(
        "--no-gate",
        action="store_true",
        help="without the replica's gate (serve_gate): refusals pass Serve's per-request bookkeeping first",
    )
    p.add_argument(
        "--contention-budget",
        default=str(ServeConfig.contention_budget),
        help="ServeConfig.contention_budget, or off: a heavy tenant's rows fill whole batches beside a light one",
    )
    p.add_argument(
        "--pin-replica",
        action="store_true",
        help="the encoder replica on the last CPU, the clients, Ray and the HTTP front on the others",
    )
    p.add_argument("--flood-burst", type=int, default=None, help="the flooding tenant's own token-bucket burst")
    p.add_argument("--flood-rows-in-flight", type=int, default=None, help="the flooding tenant's own quota")
    p.add_argument("--json", default="benchmarks/results/fairness.json", help="JSON out; .md beside it")
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny encoder, 30 requests per phase")
    p.add_argument(
        "--http-proxy",
        choices=("ray", "haproxy"),
        default="ray",
        help="Serve's Python proxy, or its high-throughput mode with HAProxy (needs the haproxy binary)",
    )
    args = p.parse_args(argv)
    if args.http_proxy == "haproxy":
        from serving_http import HAPROXY_ENV

        os.environ.update(HAPROXY_ENV)  # before Ray (and Ray Serve) is imported, in run()
    if args.quick:
        args.backbone, args.requests, args.flood_warmup_s = "tiny", 30, 2.0
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    out_json = Path(args.json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="adistill-fairness-") as tmp:
        report = run(args, Path(tmp))
    report["settings"] = {
        k: getattr(args, k)
        for k in ("batch", "device", "precision", "num_gpus", "requests", "flood_clients", "flood_texts", "no_quotas")
        + ("flood_requests_per_s", "flood_burst", "flood_rows_in_flight", "flood_ignores_retry_after")
        + ("flood_warmup_s", "quick", "pin_replica")
        + ("http_proxy", "no_gate", "contention_budget")
    }
    report["machine"] = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
    }
    report["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    report["seconds"] = round(time.perf_counter() - started, 1)
    out_json.write_text(json.dumps(report, indent=2) + "\n")
    out_json.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
