"""adistill's Prometheus metrics, each defined once (`SPECS`) and recorded through Ray (`ray.util.metrics`).

Ray exports the metrics recorded in every process (driver, actor, Serve replica, Train worker) on its node's metrics
endpoint (`ray.nodes()[i]["MetricsExportPort"]`; on KubeRay the container port `metrics`, 8080), with a `ray_`
prefix: counters get `_total`, histograms `_bucket`, `_sum` and `_count` (`MetricSpec.exported`), and Ray adds the
labels `NodeAddress`, `WorkerId`, `SessionName`, `Component` and `Version`. Scrape each Pod (k8s/observability/).
Ray (2.60) exports a histogram's `_sum` from bucket midpoints, not the values observed: quantiles from `_bucket` and
rates of `_count` are right, means from `_sum` are approximate (hence the exact `adistill_rows` counter).

- `serving`: what a serving replica records: requests by endpoint and status, latency, rows and time per encoder
  forward, the tenant cache (as `TenantCache(on_event=serving.cache_event)`), adapter bank occupancy, refusals.
- `onboarding`: tenants by outcome, seconds per stage (workers and driver), tenants per hour (driver).

Labels are bounded on purpose: endpoint (`request_log.ENDPOINTS`), status code, bank shape, onboarding stage and
outcome. No metric has a tenant-id label: with thousands of tenants every label value is a series per replica (and
per histogram bucket), which costs Prometheus more than all of the rest. Per-tenant detail lives in the request
logs (adistill.inference.request_log: tenant_id on every line) and in `GET /metrics` (refusals per tenant).

Every call is a no-op while Ray is not initialized (a process without Ray, a unit test): the metrics are created on
first use inside a Ray worker or driver, so importing this module starts nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import ray

from adistill.inference.observe import ServingObserver
from adistill.inference.request_log import ENDPOINTS

if TYPE_CHECKING:
    from adistill.inference.engine import BankUsage

Kind = Literal["counter", "gauge", "histogram"]
EXPORT_PREFIX = "ray_"
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

REQUEST_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
FORWARD_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
FORWARD_ROWS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0)
STAGE_SECONDS = (0.1, 0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0)

REFUSALS = (401, 403, 429)
OUTCOMES = ("published", "skipped", "failed")  # onboard_plan.STATUSES (not imported: replicas stay light)
STAGES = ("read", "stage1", "stage2", "fusion", "finetune", "package", "publish")
# TenantCache events (its counter names) -> the counter each is exported as; "bytes" sets the cache-bytes gauge
CACHE_COUNTERS = {
    "hits": "adistill_cache_hits",
    "misses": "adistill_cache_misses",
    "evictions": "adistill_cache_evictions",
    "loads": "adistill_adapter_loads",
    "load_failures": "adistill_adapter_load_failures",
    "poll_errors": "adistill_registry_poll_errors",
}


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: Kind
    description: str
    tags: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()

    @property
    def exported(self) -> tuple[str, ...]:
        """The names Prometheus sees."""
        base = EXPORT_PREFIX + self.name
        if self.kind == "counter":
            return (base + "_total",)
        if self.kind == "histogram":
            return tuple(base + s for s in HISTOGRAM_SUFFIXES)
        return (base,)


def _specs(*specs: MetricSpec) -> dict[str, MetricSpec]:
    return {s.name: s for s in specs}


SPECS = _specs(
    # serving
    MetricSpec("adistill_requests", "counter", "HTTP requests by endpoint and status", ("endpoint", "status")),
    MetricSpec("adistill_request_seconds", "histogram", "HTTP request latency (s)", ("endpoint",), REQUEST_SECONDS),
    MetricSpec("adistill_refusals", "counter", "requests refused: 401 (key), 403 (tenant), 429 (quota)", ("status",)),
    MetricSpec("adistill_forward_rows", "histogram", "rows (texts) per encoder forward", (), FORWARD_ROWS),
    MetricSpec("adistill_rows", "counter", "rows (texts) through encoder forwards (exact; histogram sums are not)"),
    MetricSpec("adistill_forward_tenants", "histogram", "distinct tenants per encoder forward", (), FORWARD_ROWS),
    MetricSpec("adistill_forward_seconds", "histogram", "time of one encoder forward (s)", (), FORWARD_SECONDS),
    MetricSpec("adistill_cache_hits", "counter", "tenant cache lookups answered from memory"),
    MetricSpec("adistill_cache_misses", "counter", "tenant cache lookups that had to load (or wait for a load)"),
    MetricSpec("adistill_cache_evictions", "counter", "tenants evicted from the cache (least recently used)"),
    MetricSpec("adistill_cache_bytes", "gauge", "bytes of the tenants in this replica's cache"),
    MetricSpec("adistill_adapter_loads", "counter", "tenant versions loaded from the registry"),
    MetricSpec("adistill_adapter_load_failures", "counter", "loads that failed (refused version, unreachable store)"),
    MetricSpec("adistill_registry_poll_errors", "counter", "registry pointer reads that failed while polling"),
    MetricSpec("adistill_bank_slots_used", "gauge", "adapter bank slots holding a tenant", ("bank",)),
    MetricSpec("adistill_bank_slots_capacity", "gauge", "adapter bank slots in all", ("bank",)),
    # onboarding
    MetricSpec("adistill_onboard_tenants", "counter", "onboarded tenants by outcome", ("outcome",)),
    MetricSpec("adistill_onboard_stage_seconds", "histogram", "a tenant's time in a stage", ("stage",), STAGE_SECONDS),
    MetricSpec("adistill_onboard_tenants_per_hour", "gauge", "tenants finished per hour in the running batch"),
)


def exported_names() -> set[str]:
    """Every name Prometheus can see from adistill (for checking dashboards and alerts)."""
    return {name for spec in SPECS.values() for name in spec.exported}


class _Registry:
    """The Ray metric objects, made on first use in a process where Ray is initialized."""

    def __init__(self) -> None:
        self._made: dict[str, Any] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> Any | None:
        """The metric `name`, or None (nothing to record) while Ray is not initialized."""
        if not ray.is_initialized():
            return None
        metric = self._made.get(name)
        if metric is None:
            with self._lock:
                metric = self._made.get(name) or self._make(SPECS[name])
                self._made[name] = metric
        return metric

    @staticmethod
    def _make(spec: MetricSpec) -> Any:
        from ray.util import metrics

        if spec.kind == "counter":
            return metrics.Counter(spec.name, spec.description, spec.tags)
        if spec.kind == "gauge":
            return metrics.Gauge(spec.name, spec.description, spec.tags)
        return metrics.Histogram(spec.name, spec.description, list(spec.boundaries), spec.tags)


_registry = _Registry()


def _inc(name: str, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
    metric = _registry.get(name)
    if metric is not None and value > 0:
        metric.inc(float(value), tags)


def _set(name: str, value: float, tags: dict[str, str] | None = None) -> None:
    metric = _registry.get(name)
    if metric is not None:
        metric.set(float(value), tags)


def _observe(name: str, value: float, tags: dict[str, str] | None = None) -> None:
    metric = _registry.get(name)
    if metric is not None:
        metric.observe(max(0.0, float(value)), tags)


def _status(status: int) -> str:
    return str(status) if 100 <= status <= 599 else "other"


class ServingMetrics:
    """What a serving replica records, as a `ServingObserver` (adistill.inference.observe) that the ray-free serving
    code can be handed. Every method is cheap and a no-op without Ray."""

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        """One answered HTTP request: `endpoint` one of request_log.ENDPOINTS (`request_log.endpoint_of(path)`),
        the response's status and its latency. A 401/403/429 also counts as a refusal."""
        endpoint = endpoint if endpoint in ENDPOINTS else "other"
        _inc("adistill_requests", 1, {"endpoint": endpoint, "status": _status(status)})
        _observe("adistill_request_seconds", seconds, {"endpoint": endpoint})
        if status in REFUSALS:
            self.refusal(status)

    def refusal(self, status: int) -> None:
        """A refusal inside a request that is answered otherwise (e.g. one tenant's 429 in a batch request)."""
        if status in REFUSALS:
            _inc("adistill_refusals", 1, {"status": str(status)})

    def forward(self, rows: int, tenants: int, seconds: float) -> None:
        """One encoder forward: its rows (texts), their distinct tenants and its wall time."""
        _observe("adistill_forward_rows", rows)
        _inc("adistill_rows", rows)
        _observe("adistill_forward_tenants", tenants)
        _observe("adistill_forward_seconds", seconds)

    def cache_event(self, event: str, value: int) -> None:
        """`TenantCache(on_event=...)`: counter increments, and `"bytes"` (the cache's new size)."""
        if event == "bytes":
            _set("adistill_cache_bytes", value)
        elif event in CACHE_COUNTERS:
            _inc(CACHE_COUNTERS[event], value)

    def banks(self, usage: Iterable[BankUsage]) -> None:
        """The adapter banks' occupancy (`Engine.bank_usage()`), e.g. after each forward."""
        for bank in usage:
            _set("adistill_bank_slots_used", bank.used, {"bank": bank.name})
            _set("adistill_bank_slots_capacity", bank.capacity, {"bank": bank.name})


class OnboardingMetrics:
    """What onboarding records: the driver (outcomes, publish time, rate) and the Train workers (stage times)."""

    def outcome(self, status: str) -> None:
        """A tenant's end: one of `OUTCOMES` (published, skipped, failed)."""
        _inc("adistill_onboard_tenants", 1, {"outcome": status if status in OUTCOMES else "other"})

    def stage(self, stage: str, seconds: float) -> None:
        """Seconds one tenant spent in `stage` (one of `STAGES`; anything else is counted as `other`)."""
        _observe("adistill_onboard_stage_seconds", seconds, {"stage": stage if stage in STAGES else "other"})

    def rate(self, tenants_per_hour: float) -> None:
        _set("adistill_onboard_tenants_per_hour", tenants_per_hour)


serving: ServingObserver = ServingMetrics()  # mypy checks that it is a ServingObserver
onboarding = OnboardingMetrics()
