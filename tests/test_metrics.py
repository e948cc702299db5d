"""adistill's Prometheus metrics (adistill.distributed.metrics) and the ray-free hooks that feed them.

Fast tests replace the Ray metric objects with recorders (or check that nothing is created without Ray); the slow
test records every metric inside a real Ray actor and reads it back from the node's Prometheus endpoint over HTTP.
"""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import fast_config, random_tenant
from serving_helpers import MemorySource, tenant_files

from adistill.backbone import Backbone
from adistill.distributed import metrics
from adistill.distributed.metrics import SPECS, exported_names, onboarding, serving
from adistill.errors import TenantNotFound
from adistill.inference.engine import BankUsage, Engine
from adistill.inference.request_log import ENDPOINTS
from adistill.inference.tenant_cache import TenantCache
from adistill.onboard_plan import STATUSES


class Recorder:
    """Stands in for a ray.util.metrics object: remembers every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float, dict[str, str]]] = []

    def inc(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.calls.append(("inc", value, tags or {}))

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.calls.append(("set", value, tags or {}))

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.calls.append(("observe", value, tags or {}))


class RecordingRegistry:
    def __init__(self) -> None:
        self.made: dict[str, Recorder] = {}

    def get(self, name: str) -> Recorder:
        assert name in SPECS, name
        return self.made.setdefault(name, Recorder())

    def calls(self, name: str) -> list[tuple[str, float, dict[str, str]]]:
        return self.made[name].calls if name in self.made else []


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> RecordingRegistry:
    registry = RecordingRegistry()
    monkeypatch.setattr(metrics, "_registry", registry)
    return registry


def test_every_metric_is_defined_once_with_bounded_labels() -> None:
    assert len(SPECS) == len({s.name for s in SPECS.values()})
    for spec in SPECS.values():
        assert re.fullmatch(r"adistill_[a-z_]+", spec.name), spec.name
        assert not spec.name.endswith("_total"), f"{spec.name}: Ray adds _total to counters"
        assert not {"tenant", "tenant_id"} & set(spec.tags), f"{spec.name}: no tenant label (unbounded)"
        if spec.kind == "histogram":
            assert list(spec.boundaries) == sorted(set(spec.boundaries)) and spec.boundaries[0] > 0, spec.name
        else:
            assert not spec.boundaries, spec.name
    assert len(exported_names()) == sum(len(s.exported) for s in SPECS.values())
    assert metrics.OUTCOMES == STATUSES
    assert "predict" in ENDPOINTS and "other" in ENDPOINTS


def every_call() -> None:
    serving.request("predict", 200, 0.01)
    serving.request("tenants", 403, 0.001)
    serving.refusal(429)
    serving.forward(8, 2, 0.02)
    for event in ("hits", "misses", "evictions", "loads", "load_failures", "poll_errors", "bytes"):
        serving.cache_event(event, 3)
    serving.banks([BankUsage("seq_bn_r16", 1, 4, 2)])
    onboarding.outcome("published")
    onboarding.stage("stage1", 2.0)
    onboarding.rate(10.0)


def test_the_null_observer_takes_every_call() -> None:
    from adistill.inference.observe import NO_OBSERVER

    for name in ("request", "refusal", "forward", "cache_event", "banks"):
        assert callable(getattr(NO_OBSERVER, name)) and callable(getattr(serving, name))
    NO_OBSERVER.request("predict", 200, 0.1)
    NO_OBSERVER.banks([BankUsage("seq_bn_r16", 1, 4, 1)])


def test_every_call_is_a_no_op_without_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    registry = metrics._Registry()
    monkeypatch.setattr(metrics, "_registry", registry)
    monkeypatch.setattr(metrics.ray, "is_initialized", lambda: False)

    def never(spec: Any) -> Any:
        raise AssertionError(f"{spec.name} made without Ray")

    monkeypatch.setattr(metrics._Registry, "_make", staticmethod(never))
    every_call()
    assert registry._made == {}


def test_serving_calls_record_what_they_say(recorded: RecordingRegistry) -> None:
    serving.request("predict", 200, 0.012)
    serving.request("batch", 429, 0.002)
    serving.request("/v1/whatever", 700, -1.0)  # unknown endpoint and status: bounded label values
    serving.refusal(500)  # not a refusal: ignored
    assert recorded.calls("adistill_requests") == [
        ("inc", 1.0, {"endpoint": "predict", "status": "200"}),
        ("inc", 1.0, {"endpoint": "batch", "status": "429"}),
        ("inc", 1.0, {"endpoint": "other", "status": "other"}),
    ]
    assert recorded.calls("adistill_request_seconds") == [
        ("observe", 0.012, {"endpoint": "predict"}),
        ("observe", 0.002, {"endpoint": "batch"}),
        ("observe", 0.0, {"endpoint": "other"}),
    ]
    assert recorded.calls("adistill_refusals") == [("inc", 1.0, {"status": "429"})]
    serving.forward(24, 3, 0.05)
    assert recorded.calls("adistill_forward_rows") == [("observe", 24.0, {})]
    assert recorded.calls("adistill_rows") == [("inc", 24.0, {})]
    assert recorded.calls("adistill_forward_tenants") == [("observe", 3.0, {})]
    assert recorded.calls("adistill_forward_seconds") == [("observe", 0.05, {})]
    for event in ("hits", "hits", "misses", "evictions", "loads", "load_failures", "poll_errors", "polls", "reloads"):
        serving.cache_event(event, 1)
    serving.cache_event("hits", 0)  # nothing to add: Ray's counters refuse 0
    serving.cache_event("bytes", 4096)
    assert len(recorded.calls("adistill_cache_hits")) == 2
    for name in ("cache_misses", "cache_evictions", "adapter_loads", "adapter_load_failures", "registry_poll_errors"):
        assert recorded.calls(f"adistill_{name}") == [("inc", 1.0, {})], name
    assert recorded.calls("adistill_cache_bytes") == [("set", 4096.0, {})]
    serving.banks([BankUsage("seq_bn_r16", 3, 256, 9), BankUsage("houlsby_r16", 1, 64, 1)])
    assert recorded.calls("adistill_bank_slots_used") == [
        ("set", 3.0, {"bank": "seq_bn_r16"}),
        ("set", 1.0, {"bank": "houlsby_r16"}),
    ]
    assert recorded.calls("adistill_bank_slots_capacity")[0] == ("set", 256.0, {"bank": "seq_bn_r16"})


def test_onboarding_calls_record_what_they_say(recorded: RecordingRegistry) -> None:
    onboarding.outcome("published")
    onboarding.outcome("exploded")
    onboarding.stage("stage2", 42.0)
    onboarding.stage("warp", 1.0)
    onboarding.rate(12.5)
    assert recorded.calls("adistill_onboard_tenants") == [
        ("inc", 1.0, {"outcome": "published"}),
        ("inc", 1.0, {"outcome": "other"}),
    ]
    assert recorded.calls("adistill_onboard_stage_seconds") == [
        ("observe", 42.0, {"stage": "stage2"}),
        ("observe", 1.0, {"stage": "other"}),
    ]
    assert recorded.calls("adistill_onboard_tenants_per_hour") == [("set", 12.5, {})]


# ----------------------------------------------------------------------------------------------------------------
# The ray-free hooks: TenantCache(on_event=...) and Engine.bank_usage()
# ----------------------------------------------------------------------------------------------------------------


def test_the_cache_tells_on_event_every_counter_and_its_bytes(tiny: Backbone) -> None:
    source = MemorySource()
    for i in range(3):
        source.publish(f"t{i}", tenant_files(tiny, f"t{i}", seed=i))
    events: Counter[str] = Counter()
    sizes: list[int] = []

    def on_event(event: str, value: int) -> None:
        if event == "bytes":
            sizes.append(value)
        else:
            events[event] += value

    async def main() -> dict[str, Any]:
        probe = TenantCache(source, tiny, max_bytes=1 << 30, poll_interval_s=None)
        one = (await probe.get("t0")).nbytes
        await probe.close()
        cache = TenantCache(source, tiny, max_bytes=2 * one, poll_interval_s=None, on_event=on_event)
        for t in ("t0", "t0", "t1", "t2", "t0"):
            await cache.get(t)
        with pytest.raises(TenantNotFound):
            await cache.get("missing")
        assert sizes[-1] == cache.bytes
        m = cache.metrics()
        await cache.close()
        return m

    m = asyncio.run(main())
    assert m["hits"] == 1 and m["evictions"] >= 2 and m["not_found"] == 1
    for name in ("hits", "misses", "loads", "evictions", "not_found", "load_failures"):
        assert events[name] == m[name], name
    assert len(sizes) == m["loads"]  # each load was inserted, and every insert reports the new bytes


def test_a_failing_listener_never_breaks_the_cache(tiny: Backbone, caplog: pytest.LogCaptureFixture) -> None:
    source = MemorySource()
    source.publish("t0", tenant_files(tiny, "t0", seed=0))

    def broken(event: str, value: int) -> None:
        raise RuntimeError("metrics backend down")

    async def main() -> None:
        cache = TenantCache(source, tiny, max_bytes=1 << 30, poll_interval_s=None, on_event=broken)
        assert (await cache.get("t0")).version == 1
        assert (await cache.get("t0")).version == 1
        await cache.close()

    asyncio.run(main())
    assert sum("on_event" in r.getMessage() for r in caplog.records) == 1, "reported once"


def test_engine_bank_usage(tiny: Backbone) -> None:
    engine = Engine(tiny, bank_slots=4)
    assert engine.bank_usage() == []
    tenants = [random_tenant(tiny, seed=s) for s in range(6)]
    engine.predict(["pay my bill"] * 6, tenants, top_k=1)
    [usage] = engine.bank_usage()
    config = tenants[0].adapters.config
    assert usage.name == f"{config.kind}_r{config.reduction_factor}"
    assert (usage.used, usage.capacity) == (4, 4) and usage.loads == 6


# ----------------------------------------------------------------------------------------------------------------
# Onboarding's driver records outcomes, publish time and rate (no Ray needed for the path tested here)
# ----------------------------------------------------------------------------------------------------------------


def test_onboarding_records_outcomes_publish_time_and_rate(
    recorded: RecordingRegistry, tiny: Backbone, tiny_path: Path, tenants_dir: Path, tmp_path: Path
) -> None:
    """A finished-but-unpublished tenant is published by the driver (no Ray work), then skipped on a rerun."""
    from adistill.data import read_tenant_data
    from adistill.distributed.onboard import OnboardOptions, onboard_manifest
    from adistill.manifest import load_manifest
    from adistill.onboard_plan import plan_batch
    from adistill.recipes import train_tenant
    from adistill.recipes.tenant import TenantJob, data_record
    from adistill.store.checkpoints import RunFolder
    from adistill.store.registry import Registry

    registry = Registry(str(tmp_path / "registry"))
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({"tenants": [{"id": "bank", "data": str(tenants_dir / "bank.parquet")}]}))
    manifest = load_manifest(str(path))
    cfg = fast_config("adapter", epochs=1)
    [plan], _ = plan_batch(manifest, registry, tiny, cfg, None, {}, lambda e: None)
    data = read_tenant_data(plan.job.data)
    files = train_tenant(tiny, data, cfg).files(
        "bank", tiny, cfg, data_record(TenantJob("bank", plan.job.data, cfg), data)
    )
    RunFolder(str(tmp_path / "runs"), plan.run_name).write("done", files)
    options = OnboardOptions(backbone=str(tiny_path), storage_path=str(tmp_path / "runs"))
    [first] = onboard_manifest(manifest, registry, cfg, None, options)
    [again] = onboard_manifest(manifest, registry, cfg, None, options)
    assert (first.status, again.status) == ("published", "skipped")
    outcomes = [c[2]["outcome"] for c in recorded.calls("adistill_onboard_tenants")]
    assert outcomes == ["published", "skipped"]
    [(kind, seconds, tags)] = recorded.calls("adistill_onboard_stage_seconds")
    assert (kind, tags) == ("observe", {"stage": "publish"}) and seconds > 0
    [(kind, rate, _)] = recorded.calls("adistill_onboard_tenants_per_hour")
    assert kind == "set" and rate > 0


# ----------------------------------------------------------------------------------------------------------------
# End to end: recorded in a Ray actor, read from the node's Prometheus endpoint
# ----------------------------------------------------------------------------------------------------------------


def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every sample of a Prometheus text page: name -> [(labels, value)]."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return out


def metrics_url(ray: Any) -> str:
    """The local node's metrics endpoint (what KubeRay exposes as the container port `metrics`)."""
    node_id = ray.get_runtime_context().get_node_id()
    [node] = [n for n in ray.nodes() if n["NodeID"] == node_id]
    return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"


@pytest.mark.slow
def test_every_metric_reaches_the_nodes_prometheus_endpoint(ray_local: Any) -> None:
    ray = ray_local

    @ray.remote(num_cpus=0)
    class Replica:
        def record(self) -> str:
            import ray as ray_in_actor

            from adistill.distributed.metrics import onboarding, serving
            from adistill.inference.engine import BankUsage

            serving.request("predict", 200, 0.012)
            serving.request("predict", 200, 0.02)
            serving.request("predict", 429, 0.002)
            serving.request("tenants", 401, 0.001)
            serving.forward(24, 3, 0.03)
            for event in ("hits", "hits", "hits", "misses", "evictions", "loads", "load_failures", "poll_errors"):
                serving.cache_event(event, 1)
            serving.cache_event("bytes", 123456)
            serving.banks([BankUsage("seq_bn_r16", 3, 256, 5)])
            onboarding.outcome("published")
            onboarding.outcome("failed")
            onboarding.stage("stage2", 42.0)
            onboarding.rate(12.5)
            return str(ray_in_actor.get_runtime_context().get_worker_id())

    actor = Replica.remote()  # type: ignore[attr-defined]
    worker = ray.get(actor.record.remote(), timeout=120)
    url = metrics_url(ray)
    expected = exported_names()
    deadline = time.monotonic() + 90  # Ray exports every few seconds
    while True:
        samples = {
            name: [(labels, value) for labels, value in rows if labels.get("WorkerId") == worker]
            for name, rows in scrape(url).items()
        }
        missing = {n for n in expected if not samples.get(n)}
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(2)
    ray.kill(actor)
    assert missing == set(), f"not exported after 90 s from {url}"

    def value(name: str, **labels: str) -> float:
        rows = [v for tags, v in samples[name] if all(tags.get(k) == x for k, x in labels.items())]
        assert len(rows) == 1, (name, labels, samples[name])
        return rows[0]

    assert value("ray_adistill_requests_total", endpoint="predict", status="200") == 2
    assert value("ray_adistill_requests_total", endpoint="predict", status="429") == 1
    assert value("ray_adistill_refusals_total", status="429") == 1
    assert value("ray_adistill_refusals_total", status="401") == 1
    assert value("ray_adistill_request_seconds_count", endpoint="predict") == 3
    buckets = {
        float(t["le"]): v for t, v in samples["ray_adistill_request_seconds_bucket"] if t["endpoint"] == "predict"
    }
    assert (buckets[0.01], buckets[0.025], buckets[float("inf")]) == (1, 3, 3)  # 0.002 | 0.012, 0.02 | all
    # Ray 2.60 exports a histogram's _sum from bucket midpoints (0.03675 here, not 0.034): check the bucket bounds
    assert 0.001 + 0.01 + 0.01 <= value("ray_adistill_request_seconds_sum", endpoint="predict") <= 0.0025 + 0.05
    assert 16 <= value("ray_adistill_forward_rows_sum") <= 32 and 2 <= value("ray_adistill_forward_tenants_sum") <= 4
    assert value("ray_adistill_forward_seconds_count") == 1
    assert value("ray_adistill_rows_total") == 24  # exact, unlike the histogram's _sum
    assert value("ray_adistill_cache_hits_total") == 3 and value("ray_adistill_cache_misses_total") == 1
    for name in ("cache_evictions", "adapter_loads", "adapter_load_failures", "registry_poll_errors"):
        assert value(f"ray_adistill_{name}_total") == 1, name
    assert value("ray_adistill_cache_bytes") == 123456
    assert value("ray_adistill_bank_slots_used", bank="seq_bn_r16") == 3
    assert value("ray_adistill_bank_slots_capacity", bank="seq_bn_r16") == 256
    assert value("ray_adistill_onboard_tenants_total", outcome="published") == 1
    assert value("ray_adistill_onboard_tenants_total", outcome="failed") == 1
    assert 30 <= value("ray_adistill_onboard_stage_seconds_sum", stage="stage2") <= 60
    assert value("ray_adistill_onboard_stage_seconds_count", stage="stage2") == 1
    assert value("ray_adistill_onboard_tenants_per_hour") == 12.5
    for labels, _ in samples["ray_adistill_requests_total"]:
        assert {"NodeAddress", "SessionName"} <= set(labels), "Ray's own labels (per node, per session)"
        assert not {k for k in labels if "tenant" in k.lower()}
