"""One serving replica's model side: the frozen encoder, the tenant cache, the engine and the fair batch queue.

`EncoderService.predict(tenant_id, texts, top_k)` loads the tenant (cache), queues one row per text in the
`FairBatcher` and answers once the rows' batches ran; rows of *different* tenants share one encoder forward, and
the batcher fills every batch round-robin across tenants with rows waiting. Beside a light tenant, batches hold
few rows of any one tenant (`ServeConfig.contention_budget`, from forwards timed at start-up), and the light
tenant's rows run inside the forward in progress, between two of its layers (`interject_rows`). Errors come back
as a status and a message, never raised, so the HTTP layer (adistill.distributed.serve_group) maps them one to one.

Plain asyncio and torch: no Ray. Built once per Serve replica.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from adistill.errors import AdistillError, BackboneMismatch, CorruptArtifact, TenantNotFound
from adistill.inference.fair_queue import FairBatcher, rows_within_budget
from adistill.inference.interject import Interjection, Interjections
from adistill.inference.observe import NO_OBSERVER, ServingObserver
from adistill.inference.serve_config import ServeConfig
from adistill.inference.tenant_cache import LoadedTenant

log = logging.getLogger(__name__)


@dataclass
class Row:
    """One text to answer: the tenant travels with it, so one batch holds rows of many tenants."""

    tenant_id: str
    text: str
    top_k: int
    tenant: LoadedTenant


@dataclass(frozen=True)
class Refused:
    """Why a tenant cannot answer now: an HTTP status and a message."""

    status: int
    error: str


class EncoderService:
    """The encoder, every tenant's adapter (loaded on first use) and the batch queue of one replica."""

    def __init__(self, config: ServeConfig, observer: ServingObserver = NO_OBSERVER) -> None:
        import torch

        from adistill.backbone import load_backbone
        from adistill.inference.engine import Engine
        from adistill.inference.tenant_cache import TenantCache
        from adistill.store.registry import Registry

        device = config.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() and config.precision == "fp32" else "cpu"
        self.config = config
        self.backbone = load_backbone(config.backbone, device, config.storage_options, config.precision)
        self.cache = TenantCache(
            Registry(config.registry, config.storage_options),
            self.backbone,
            config.cache_bytes,
            config.poll_interval_s,
            config.load_workers,
            on_event=observer.cache_event,
        )
        self.observer = observer
        self.engine = Engine(self.backbone, config.bank_slots, config.bank_bytes)
        self.forward_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encoder-forward")
        self._running: asyncio.Future[Any] | None = None  # the forward in progress
        self._nested = (0.0, 0.0)  # CPU and wall seconds of short batches run inside other forwards (forward thread)
        self.interjections = Interjections(self._interjected)
        self.contention = self._contention(config)
        self.batcher: FairBatcher[Row, dict[str, Any]] = FairBatcher(
            self.predict_rows,
            config.max_batch_size,
            config.batch_wait_timeout_s,
            tenant_batch_rows=self.contention["tenant_batch_rows"],
            interject=self.interject_rows,
        )
        self.stats = {"batches": 0, "rows": 0, "tenant_rows": 0, "forward_seconds": 0.0, "forward_cpu_seconds": 0.0}
        self.started = time.time()
        log.info("encoder replica ready: backbone %s (%s) on %s", self.backbone.name, config.precision, device)

    def _contention(self, config: ServeConfig) -> dict[str, Any]:
        """Times a one-row and a full-batch forward and derives the batch queue's `tenant_batch_rows` from them."""
        if config.contention_budget is None or config.max_batch_size == 1:
            return {"tenant_batch_rows": None}
        one, full = self.engine.forward_seconds(1), self.engine.forward_seconds(config.max_batch_size)
        rows = rows_within_budget(one, full, config.max_batch_size, config.contention_budget)
        log.info(
            "forwards: 1 row %.1f ms, %d rows %.1f ms; beside a light tenant, %d row(s) of one tenant per batch",
            1000 * one,
            config.max_batch_size,
            1000 * full,
            rows,
        )
        return {
            "tenant_batch_rows": rows,
            "one_row_forward_ms": round(1000 * one, 2),
            "full_batch_forward_ms": round(1000 * full, 2),
        }

    async def tenant(self, tenant_id: str) -> LoadedTenant | Refused:
        """The tenant's loaded adapter, or why it cannot be served (404 unknown, 503 unloadable or unreachable)."""
        try:
            return await self.cache.get(tenant_id)
        except TenantNotFound:
            return Refused(404, f"tenant {tenant_id!r} not found")
        except (CorruptArtifact, BackboneMismatch) as exc:
            return Refused(503, f"tenant {tenant_id!r} cannot be served: {exc}")
        except (AdistillError, OSError) as exc:  # registry unreachable or refusing access: worth a retry
            log.warning("tenant %r: load failed: %s", tenant_id, exc)
            return Refused(503, f"tenant {tenant_id!r} cannot be loaded now: {exc}")

    async def predict(self, tenant_id: str, texts: list[str], top_k: int) -> dict[str, Any] | Refused:
        """One tenant's texts: `{"tenant_id", "adapter_version", "predictions"}`, or `Refused`."""
        tenant = await self.tenant(tenant_id)
        if isinstance(tenant, Refused):
            return tenant
        predictions = await self.batcher.submit(tenant_id, [Row(tenant_id, t, top_k, tenant) for t in texts])
        return {"tenant_id": tenant_id, "adapter_version": tenant.version, "predictions": predictions}

    async def predict_rows(self, rows: list[Row]) -> list[dict[str, Any]]:
        """One encoder forward for rows of any number of tenants (the engine gathers each row's adapter); short
        batches offered meanwhile (`interject_rows`) run between its layers."""
        top_k = max(r.top_k for r in rows)
        start = time.perf_counter()
        running = asyncio.get_running_loop().run_in_executor(
            self.forward_pool, self._forward, [r.text for r in rows], [r.tenant.model for r in rows], top_k
        )
        self._running = running
        try:
            predictions, cpu, nested_s = await running
        finally:
            if self._running is running:
                self._running = None
        return self._answers(rows, predictions, time.perf_counter() - start - nested_s, cpu)

    async def interject_rows(self, rows: list[Row]) -> list[dict[str, Any]]:
        """A short batch run inside the forward in progress, between two of its layers (adistill.inference.interject),
        or as a forward of its own when none is running or it ends first, or the adapter bank has no free slot."""
        from adistill.inference.engine import BankBusy

        running = self._running
        if running is None or running.done():
            return await self.predict_rows(rows)
        loop = asyncio.get_running_loop()
        job = Interjection(([r.text for r in rows], [r.tenant.model for r in rows], max(r.top_k for r in rows)), loop)
        self.interjections.offer(job)
        await asyncio.wait({job.done, running}, return_when=asyncio.FIRST_COMPLETED)
        if not job.done.done() and self.interjections.withdraw(job):
            return await self.predict_rows(rows)  # the forward ended before its next layer
        try:
            predictions, cpu, seconds = await job.done
        except BankBusy:
            return await self.predict_rows(rows)
        return self._answers(rows, predictions, seconds, cpu)

    def _answers(self, rows: list[Row], predictions: list[Any], seconds: float, cpu: float) -> list[dict[str, Any]]:
        tenants = len({r.tenant_id for r in rows})
        self.stats["forward_seconds"] += seconds
        self.stats["forward_cpu_seconds"] += cpu
        self.stats["batches"] += 1
        self.stats["rows"] += len(rows)
        self.stats["tenant_rows"] += tenants
        self.observer.forward(len(rows), tenants, seconds)
        self.observer.banks(self.engine.bank_usage())
        out = []
        for row, p in zip(rows, predictions):
            answer = p.to_dict()
            answer["labels"] = answer["labels"][: row.top_k]
            out.append(answer)
        return out

    def _forward(self, texts: list[str], models: list[Any], top_k: int) -> tuple[list[Any], float, float]:
        """The engine's forward on the forward thread, with the CPU seconds it took (the thread's own clock; torch's
        intra-op threads, when there are several, are not counted) and the seconds of the short batches run inside
        it, both without those batches' own time."""
        cpu, nested_cpu, nested_s = time.thread_time(), *self._nested
        predictions = self.engine.predict(texts, models, top_k, between_layers=self.interjections.run_pending)
        return predictions, time.thread_time() - cpu - (self._nested[0] - nested_cpu), self._nested[1] - nested_s

    def _interjected(self, texts: list[str], models: list[Any], top_k: int) -> tuple[list[Any], float, float]:
        """A short batch, inside another forward (forward thread): predictions, CPU and wall seconds."""
        cpu, start = time.thread_time(), time.perf_counter()
        predictions = self.engine.predict(texts, models, top_k)
        cpu, seconds = time.thread_time() - cpu, time.perf_counter() - start
        self._nested = (self._nested[0] + cpu, self._nested[1] + seconds)
        return predictions, cpu, seconds

    def metrics(self) -> dict[str, Any]:
        """Cache counters, batching figures and adapter bank occupancy of this replica."""
        batches = self.stats["batches"]
        return {
            "uptime_s": round(time.time() - self.started, 1),
            "backbone": self.backbone.name,
            "precision": self.backbone.precision,
            "device": str(self.backbone.device),
            "cache": self.cache.metrics(),
            "batches": batches,
            "rows": self.stats["rows"],
            "mean_batch_rows": self.stats["rows"] / batches if batches else None,
            "mean_batch_tenants": self.stats["tenant_rows"] / batches if batches else None,
            "queue": {
                "waiting_rows": self.batcher.waiting_rows,
                "waiting_tenants": self.batcher.waiting_tenants,
                "max_waiting_rows": self.batcher.max_waiting_rows,
                "max_waiting_tenants": self.batcher.max_waiting_tenants,
            },
            "contention": {
                **self.contention,
                "capped_batches": self.batcher.capped_batches,
                "interjected_batches": self.interjections.ran,
            },
            "forward_seconds_total": round(self.stats["forward_seconds"], 4),
            "forward_cpu_seconds_total": round(self.stats["forward_cpu_seconds"], 4),
            "bank": {
                b.name: {"capacity": b.capacity, "used": b.used, "loads": b.loads} for b in self.engine.bank_usage()
            },
        }


__all__ = ["EncoderService", "Refused", "Row"]
