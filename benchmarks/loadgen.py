"""A lean HTTP/1.1 load generator and per-process CPU counters, for the serving benchmarks.

The clients share the machine with the service, so the generator must cost little CPU per request: plain asyncio
streams, keep-alive connections, requests pre-encoded once, responses parsed by their Content-Length. httpx spends
about as much CPU per request as the service's own path; this spends a fraction of it (`client_cpu_ms_per_request`
in the results says how much).

`ProcessCpu` reads utime + stime from /proc of every process descended from this one (the local Ray it started:
GCS, raylet, workers, Serve's proxy and replicas, HAProxy; not other work on the machine) and groups them by Ray's
process title (`ray::ServeReplica:app:Deployment`, `ray::ProxyActor`, ...), so a benchmark can say how many
CPU-milliseconds each process spent per request over a timed window. Linux only.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Request:
    """One pre-encoded request: `tag` groups the latencies (e.g. a tenant or a route)."""

    tag: str
    data: bytes


def encode(method: str, path: str, host: str, body: Any = None, headers: dict[str, str] | None = None) -> bytes:
    payload = json.dumps(body).encode() if body is not None else b""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: keep-alive"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


@dataclass
class Result:
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    statuses: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    wall_s: float = 0.0
    client_cpu_s: float = 0.0
    sent: int = 0

    def all_latencies(self) -> list[float]:
        return [x for v in self.latencies.values() for x in v]


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bytes]:
    """One response off a keep-alive connection: status, head (status line and headers) and body."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    match = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
    if match is None:  # not produced by uvicorn/haproxy for these routes
        raise RuntimeError(f"response without Content-Length: {head[:200]!r}")
    body = await reader.readexactly(int(match.group(1)))
    return status, head, body


async def _client(
    host: str,
    port: int,
    work: Iterator[Request],
    result: Result,
    deadline: float,
    check: Any,
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        for request in work:
            if time.perf_counter() > deadline:
                break
            start = time.perf_counter()
            writer.write(request.data)
            result.sent += 1
            status, _, body = await read_response(reader)
            result.latencies[request.tag].append(time.perf_counter() - start)
            result.statuses[status] += 1
            if check is not None:
                check(request, status, body)
    finally:
        writer.close()


async def run_clients(
    host: str,
    port: int,
    streams: Iterable[Iterator[Request]],
    time_limit_s: float = 300.0,
    check: Any = None,
) -> Result:
    """One keep-alive connection per stream, each sending its requests back to back; stops when every stream is
    exhausted or after `time_limit_s`."""
    result = Result()
    deadline = time.perf_counter() + time_limit_s
    cpu0, start = time.process_time(), time.perf_counter()
    await asyncio.gather(*(_client(host, port, s, result, deadline, check) for s in streams))
    result.wall_s = time.perf_counter() - start
    result.client_cpu_s = time.process_time() - cpu0
    return result


# ------------------------------------------------------------------------------------------- CPU per process


def _title(pid: str) -> str | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    if not raw:
        return None
    return raw.split(b"\0")[0].decode(errors="replace").strip()


def _stat(pid: str) -> tuple[str, float] | None:
    """(parent pid, CPU seconds = utime + stime) of a process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[1], (int(fields[11]) + int(fields[12])) / TICKS


def group_name(title: str) -> str:
    """Ray's process titles, shortened: `ray::ServeReplica:app:Deployment` -> `replica:Deployment`."""
    if title.startswith("ray::ServeReplica:"):
        return "replica:" + title.split(":")[-1].split()[0].split(".")[0]  # a running method is appended: drop it
    if title.startswith("ray::ProxyActor"):
        return "proxy"
    if "haproxy" in title:
        return "haproxy"
    if title.startswith("ray::"):
        return "ray:" + title[5:].split()[0].split(".")[0]
    base = os.path.basename(title.split()[0]) if title.split() else title
    return base


class ProcessCpu:
    """CPU seconds per process group between `start()` and `stop()`, over the descendants of `root` (default: this
    process; seen at either end)."""

    def __init__(self, root: int | None = None) -> None:
        self.root = str(root if root is not None else os.getpid())
        self.before: dict[str, tuple[str, float]] = {}

    def snapshot(self) -> dict[str, tuple[str, float]]:
        stats = {pid: st for pid in os.listdir("/proc") if pid.isdigit() and (st := _stat(pid)) is not None}
        out: dict[str, tuple[str, float]] = {}
        for pid, (_, cpu) in stats.items():
            parent, seen = stats[pid][0], 0
            while parent != self.root and parent in stats and seen < 64:  # walk up to root (or to init: not ours)
                parent, seen = stats[parent][0], seen + 1
            title = _title(pid)
            if parent == self.root and title is not None:
                out[pid] = (group_name(title), cpu)
        return out

    def start(self) -> None:
        self.before = self.snapshot()

    def stop(self) -> dict[str, float]:
        after = self.snapshot()
        groups: dict[str, float] = defaultdict(float)
        for pid, (name, cpu) in after.items():
            prev = self.before.get(pid)
            groups[name] += cpu - (prev[1] if prev is not None else 0.0)  # titles change while a task runs
        return {k: round(v, 3) for k, v in sorted(groups.items(), key=lambda kv: -kv[1]) if v > 0}
