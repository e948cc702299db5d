"""Loaded tenants in host memory: bounded by bytes, least recently used out, loaded off the event loop.

`TenantCache.get(tenant_id)` returns the tenant's loaded model (registry -> verified artifact -> `TenantModel`).
- Loads run in a thread pool, so one tenant's first request never stalls the event loop (other tenants' requests);
  the poll below has a pool of its own, so a first load never queues behind a round of pointer reads (many tenants,
  or an unreachable registry whose every read retries for seconds: benchmarks/results/faults.md).
- Single flight: concurrent first requests for one tenant wait on the same load.
- A background poll reads `latest_version` of every cached tenant every `poll_interval_s`; a new version is loaded
  and swapped in. A version that fails verification (`CorruptArtifact`, `BackboneMismatch`) is refused, logged and
  counted, and the version already cached keeps serving. A first load whose latest version is refused falls back to
  the newest earlier version that loads.
- Unknown tenants are remembered for `poll_interval_s` (a burst of requests for a missing tenant costs one lookup;
  a tenant published afterwards is servable within the poll interval).
- `on_event(event, value)`, if given, hears every counter increment as it happens (`event` is a field of
  `metrics()`'s counters, `value` the increment) and every change of the cached bytes (`"bytes"`, the new total):
  the serving replica forwards them to Prometheus (adistill.distributed.metrics). It runs on the event loop or a
  loader thread, must be quick, and an exception from it is logged once and otherwise ignored.

Plain Python and asyncio: no Ray. The registry is anything with the `TenantSource` methods.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from torch import nn

from adistill.backbone import Backbone
from adistill.errors import BackboneMismatch, CorruptArtifact, TenantNotFound
from adistill.model import TenantModel
from adistill.store.artifact import Artifact

log = logging.getLogger(__name__)

T = TypeVar("T")
REFUSED = (CorruptArtifact, BackboneMismatch)


class TenantSource(Protocol):
    """What the cache needs from a registry (`adistill.store.registry.Registry` fits)."""

    def latest_version(self, tenant_id: str) -> int | None: ...

    def get(self, tenant_id: str, backbone: Backbone, version: int | None = None) -> Artifact: ...

    def versions(self, tenant_id: str) -> list[int]: ...


def module_bytes(module: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True)
class LoadedTenant:
    """One tenant version, verified and ready to run."""

    tenant_id: str
    version: int
    model: TenantModel
    meta: dict[str, Any] = field(repr=False)
    nbytes: int


@dataclass
class _Counters:
    hits: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0
    load_failures: int = 0
    refused_versions: int = 0
    reloads: int = 0
    not_found: int = 0
    poll_errors: int = 0
    polls: int = 0


class TenantCache:
    """Loaded tenants bounded by `max_bytes` (LRU); see the module docstring for the loading rules."""

    def __init__(
        self,
        source: TenantSource,
        backbone: Backbone,
        max_bytes: int,
        poll_interval_s: float | None = 5.0,
        load_workers: int = 4,
        fallback_versions: int = 3,
        clock: Callable[[], float] = time.monotonic,
        on_event: Callable[[str, int], None] | None = None,
    ) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        if poll_interval_s is not None and poll_interval_s <= 0:
            raise ValueError(f"poll_interval_s must be > 0 or None (no polling), got {poll_interval_s}")
        self.source = source
        self.backbone = backbone
        self.max_bytes = max_bytes
        self.poll_interval_s = poll_interval_s
        self.fallback_versions = fallback_versions
        self._clock = clock
        self._on_event = on_event
        self._event_failed = False
        self._pool = ThreadPoolExecutor(max_workers=load_workers, thread_name_prefix="tenant-load")
        self._poll_pool = ThreadPoolExecutor(max_workers=load_workers, thread_name_prefix="tenant-poll")
        self._entries: OrderedDict[str, LoadedTenant] = OrderedDict()
        self._bytes = 0
        self._inflight: dict[str, asyncio.Future[LoadedTenant]] = {}
        self._missing: dict[str, float] = {}  # tenant id -> clock time until which it is known not to exist
        self._refused: dict[str, set[int]] = {}
        self._counters = _Counters()
        self._lock = threading.Lock()  # counters and latencies are also updated from loader threads
        self._latencies: deque[float] = deque(maxlen=4096)
        self._load_seconds = 0.0
        self._poll_task: asyncio.Task[None] | None = None

    # -- reading ---------------------------------------------------------------------------------------------

    async def get(self, tenant_id: str) -> LoadedTenant:
        """The cached tenant, else load its latest version once however many callers wait for it.

        Raises `TenantNotFound`, or `CorruptArtifact`/`BackboneMismatch` when no recent version loads."""
        self._ensure_polling()
        entry = self._entries.get(tenant_id)
        if entry is not None:
            self._entries.move_to_end(tenant_id)
            self._count("hits")
            return entry
        until = self._missing.get(tenant_id)
        if until is not None:
            if self._clock() < until:
                self._count("not_found")
                raise TenantNotFound(f"tenant {tenant_id!r} not found")
            del self._missing[tenant_id]
        self._count("misses")
        future = self._inflight.get(tenant_id)
        if future is None:
            future = asyncio.ensure_future(self._load_first(tenant_id))
            self._inflight[tenant_id] = future
            future.add_done_callback(lambda f: self._load_done(tenant_id, f))
        # shield: a caller that goes away (client disconnect) does not cancel the load the others wait for
        return await asyncio.shield(future)

    def _load_done(self, tenant_id: str, future: asyncio.Future[LoadedTenant]) -> None:
        self._inflight.pop(tenant_id, None)
        if not future.cancelled():
            future.exception()  # retrieved here, so an unawaited failure is not reported as lost

    async def _load_first(self, tenant_id: str) -> LoadedTenant:
        try:
            loaded = await self._in_pool(self._load_latest, tenant_id)
        except TenantNotFound:
            self._count("not_found")
            if self.poll_interval_s is not None:
                self._missing[tenant_id] = self._clock() + self.poll_interval_s
            raise
        except Exception:
            self._count("load_failures")
            raise
        self._insert(loaded)
        return loaded

    def _load_latest(self, tenant_id: str) -> LoadedTenant:
        """Runs in a loader thread: the latest version, else the newest earlier one that verifies."""
        latest = self.source.latest_version(tenant_id)
        if latest is None:
            raise TenantNotFound(f"tenant {tenant_id!r} not found")
        try:
            return self._load_version(tenant_id, latest)
        except REFUSED as exc:
            self._refuse(tenant_id, latest, exc)
            earlier = sorted((v for v in self.source.versions(tenant_id) if v < latest), reverse=True)
            for version in earlier[: self.fallback_versions]:
                try:
                    loaded = self._load_version(tenant_id, version)
                except REFUSED as older_exc:
                    self._refuse(tenant_id, version, older_exc)
                    continue
                log.warning("tenant %r: serving version %d, latest %d was refused", tenant_id, version, latest)
                return loaded
            raise

    def _load_version(self, tenant_id: str, version: int) -> LoadedTenant:
        start = time.perf_counter()
        artifact = self.source.get(tenant_id, self.backbone, version)
        seconds = time.perf_counter() - start
        with self._lock:
            self._counters.loads += 1
            self._load_seconds += seconds
            self._latencies.append(seconds)
        self._emit("loads", 1)
        model = artifact.model
        return LoadedTenant(tenant_id, version, model, artifact.meta, module_bytes(model))

    def _refuse(self, tenant_id: str, version: int, exc: Exception) -> None:
        log.error("tenant %r version %d refused: %s", tenant_id, version, exc)
        with self._lock:
            self._refused.setdefault(tenant_id, set()).add(version)
            self._counters.refused_versions += 1
            self._counters.load_failures += 1
        self._emit("refused_versions", 1)
        self._emit("load_failures", 1)

    def _insert(self, loaded: LoadedTenant) -> None:
        old = self._entries.pop(loaded.tenant_id, None)
        if old is not None:
            self._bytes -= old.nbytes
        self._entries[loaded.tenant_id] = loaded
        self._bytes += loaded.nbytes
        while self._bytes > self.max_bytes and len(self._entries) > 1:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= evicted.nbytes
            self._count("evictions")
            log.debug("evicted tenant %r version %d (%d bytes)", evicted.tenant_id, evicted.version, evicted.nbytes)
        self._emit("bytes", self._bytes)

    # -- polling ---------------------------------------------------------------------------------------------

    def _ensure_polling(self) -> None:
        if self.poll_interval_s is not None and self._poll_task is None:
            self._poll_task = asyncio.get_running_loop().create_task(self._poll_forever())

    async def _poll_forever(self) -> None:
        assert self.poll_interval_s is not None
        while True:
            await asyncio.sleep(self.poll_interval_s)
            try:
                await self.poll_once()
            except Exception:  # the poller must outlive any one bad round; the error is logged and counted
                log.exception("registry poll failed")
                self._count("poll_errors")

    async def poll_once(self) -> None:
        """Swap in the latest version of every cached tenant (one pointer read each); drop deleted tenants."""
        self._count("polls")
        now = self._clock()
        self._missing = {t: until for t, until in self._missing.items() if until > now}
        ids = list(self._entries)
        latest = await asyncio.gather(
            *(self._in_pool(self.source.latest_version, t, pool=self._poll_pool) for t in ids), return_exceptions=True
        )
        for tenant_id, version in zip(ids, latest):
            entry = self._entries.get(tenant_id)
            if isinstance(version, BaseException):
                log.warning("tenant %r: cannot read the latest version: %s", tenant_id, version)
                self._count("poll_errors")
                continue
            if entry is None:
                continue
            if version is None:
                log.info("tenant %r was deleted from the registry: dropped", tenant_id)
                self._remove(tenant_id)
                continue
            if version == entry.version or version in self._refused.get(tenant_id, ()):
                continue
            try:
                loaded = await self._in_pool(self._load_version, tenant_id, version, pool=self._poll_pool)
            except REFUSED as exc:
                self._refuse(tenant_id, version, exc)
                continue
            except Exception as exc:  # transient (network): retried at the next poll
                log.warning("tenant %r version %d: load failed, retrying at the next poll: %s", tenant_id, version, exc)
                self._count("load_failures")
                continue
            log.info("tenant %r: version %d -> %d", tenant_id, entry.version, version)
            if tenant_id in self._entries:
                self._insert(loaded)
                self._count("reloads")

    def _remove(self, tenant_id: str) -> None:
        entry = self._entries.pop(tenant_id, None)
        if entry is not None:
            self._bytes -= entry.nbytes
            self._emit("bytes", self._bytes)

    # -- housekeeping ----------------------------------------------------------------------------------------

    async def _in_pool(self, fn: Callable[..., T], *args: Any, pool: ThreadPoolExecutor | None = None) -> T:
        return await asyncio.get_running_loop().run_in_executor(pool or self._pool, fn, *args)

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self._counters, name, getattr(self._counters, name) + n)
        self._emit(name, n)

    def _emit(self, event: str, value: int) -> None:
        """Tell `on_event`; never lets a failing listener break a request or a load."""
        if self._on_event is None:
            return
        try:
            self._on_event(event, value)
        except Exception:
            if not self._event_failed:
                self._event_failed = True
                log.warning("tenant cache: on_event(%r, %d) failed (reported once)", event, value, exc_info=True)

    def cached(self) -> dict[str, int]:
        """Cached tenant ids -> version, least recently used first."""
        return {t: e.version for t, e in self._entries.items()}

    @property
    def bytes(self) -> int:
        return self._bytes

    def metrics(self) -> dict[str, Any]:
        """Counters since start, the cache's size now, and load latency (seconds) over the last 4096 loads."""
        with self._lock:
            counters = dict(self._counters.__dict__)
            latencies = sorted(self._latencies)
            load_seconds = self._load_seconds
        lookups = counters["hits"] + counters["misses"]
        return {
            **counters,
            "hit_rate": counters["hits"] / lookups if lookups else None,
            "entries": len(self._entries),
            "bytes": self._bytes,
            "max_bytes": self.max_bytes,
            "load_seconds_total": load_seconds,
            "load_p50_s": statistics.median(latencies) if latencies else None,
            "load_p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else None,
        }

    async def close(self) -> None:
        """Stop polling and the loader threads (waiting for loads in progress)."""
        if self._poll_task is not None:
            self._poll_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poll_task
            self._poll_task = None
        self._pool.shutdown(wait=True)
        self._poll_pool.shutdown(wait=True)
