"""The tenant cache without Ray: bytes-bounded LRU, single flight, loads off the event loop, hot versions."""

from __future__ import annotations

import asyncio
import threading

import pytest
from serving_helpers import MemorySource, corrupted, tenant_files

from adistill.backbone import Backbone
from adistill.errors import CorruptArtifact, TenantNotFound
from adistill.inference.tenant_cache import TenantCache


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def source(tiny: Backbone) -> MemorySource:
    src = MemorySource()
    for i in range(6):
        src.publish(f"t{i}", tenant_files(tiny, f"t{i}", seed=i))
    return src


def fresh(tiny: Backbone, source: MemorySource) -> MemorySource:
    """A private copy of the module's source (same bytes), so tests do not see each other's publishes."""
    src = MemorySource()
    src.store = {t: dict(v) for t, v in source.store.items()}
    return src


def test_hit_miss_and_the_loaded_model(tiny: Backbone, source: MemorySource) -> None:
    async def main() -> None:
        cache = TenantCache(source, tiny, max_bytes=1 << 30, poll_interval_s=None)
        a = await cache.get("t0")
        b = await cache.get("t0")
        assert a is b and a.version == 1 and a.tenant_id == "t0"
        assert a.model.labels == ["t0_l0", "t0_l1", "t0_l2"]
        assert a.nbytes > 0 and cache.bytes == a.nbytes
        m = cache.metrics()
        assert (m["hits"], m["misses"], m["loads"], m["entries"]) == (1, 1, 1, 1)
        assert m["load_p50_s"] is not None and m["load_p50_s"] > 0
        await cache.close()

    asyncio.run(main())


def test_lru_bounded_by_bytes(tiny: Backbone, source: MemorySource) -> None:
    async def main() -> None:
        probe = TenantCache(source, tiny, max_bytes=1 << 30, poll_interval_s=None)
        one = (await probe.get("t0")).nbytes
        await probe.close()
        cache = TenantCache(source, tiny, max_bytes=3 * one, poll_interval_s=None)
        for t in ("t0", "t1", "t2"):
            await cache.get(t)
        await cache.get("t0")  # t1 is now the least recently used
        await cache.get("t3")
        assert list(cache.cached()) == ["t2", "t0", "t3"]
        assert cache.bytes <= 3 * one
        for i in range(6):
            loaded = await cache.get(f"t{i}")
            assert loaded.tenant_id == f"t{i}"
        m = cache.metrics()
        assert m["entries"] == 3 and m["evictions"] == m["loads"] - 3
        await cache.close()

    asyncio.run(main())


def test_concurrent_first_requests_load_once(tiny: Backbone, source: MemorySource) -> None:
    src = fresh(tiny, source)
    src.delay_s = 0.2

    async def main() -> None:
        cache = TenantCache(src, tiny, max_bytes=1 << 30, poll_interval_s=None)
        results = await asyncio.gather(*(cache.get("t1") for _ in range(25)))
        assert src.gets["t1"] == 1
        assert all(r is results[0] for r in results)
        await cache.close()

    asyncio.run(main())


def test_a_slow_load_does_not_stall_other_tenants(tiny: Backbone, source: MemorySource) -> None:
    src = fresh(tiny, source)

    async def main() -> None:
        cache = TenantCache(src, tiny, max_bytes=1 << 30, poll_interval_s=None)
        await cache.get("t0")
        src.gate = threading.Event()  # every further load blocks until the gate opens
        slow = asyncio.ensure_future(cache.get("t2"))
        await asyncio.sleep(0.05)
        # The cached tenant answers while t2's load is held at the closed gate: had it waited on that load (or had the
        # load blocked the event loop), t2 would be done by now. No clock involved.
        assert (await cache.get("t0")).tenant_id == "t0"
        assert not slow.done() and not src.gate.is_set()
        assert src.gets["t0"] == 1  # served from the cache, not loaded again
        src.gate.set()
        assert (await slow).tenant_id == "t2"
        await cache.close()

    asyncio.run(main())


def test_cancelled_waiter_does_not_cancel_the_load(tiny: Backbone, source: MemorySource) -> None:
    src = fresh(tiny, source)
    src.delay_s = 0.2

    async def main() -> None:
        cache = TenantCache(src, tiny, max_bytes=1 << 30, poll_interval_s=None)
        first = asyncio.ensure_future(cache.get("t3"))
        second = asyncio.ensure_future(cache.get("t3"))
        await asyncio.sleep(0.05)
        first.cancel()
        assert (await second).tenant_id == "t3"
        assert src.gets["t3"] == 1
        await cache.close()

    asyncio.run(main())


def test_unknown_tenant_then_published_within_the_poll_interval(tiny: Backbone, source: MemorySource) -> None:
    src, clock = fresh(tiny, source), FakeClock()

    async def main() -> None:
        cache = TenantCache(src, tiny, max_bytes=1 << 30, poll_interval_s=2.0, clock=clock)
        for _ in range(3):
            with pytest.raises(TenantNotFound):
                await cache.get("later")
        src.publish("later", tenant_files(tiny, "later", seed=40))
        with pytest.raises(TenantNotFound):  # remembered as missing for one poll interval
            await cache.get("later")
        clock.now += 2.5
        assert (await cache.get("later")).version == 1
        assert cache.metrics()["not_found"] == 4
        await cache.close()

    asyncio.run(main())


def test_new_version_swaps_in_and_a_corrupt_one_is_refused(tiny: Backbone, source: MemorySource) -> None:
    src = fresh(tiny, source)

    async def main() -> None:
        cache = TenantCache(src, tiny, max_bytes=1 << 30, poll_interval_s=None)
        v1 = await cache.get("t4")
        src.publish("t4", tenant_files(tiny, "t4", seed=104, num_labels=4))
        await cache.poll_once()
        v2 = await cache.get("t4")
        assert v2.version == 2 and len(v2.model.labels) == 4 and v2.model.key != v1.model.key
        assert cache.metrics()["reloads"] == 1

        src.publish("t4", corrupted(tenant_files(tiny, "t4", seed=105)))
        gets = src.gets["t4"]
        await cache.poll_once()
        await cache.poll_once()
        assert (await cache.get("t4")).version == 2  # the previous version keeps serving
        assert src.gets["t4"] == gets + 1  # a refused version is not retried at every poll
        m = cache.metrics()
        assert m["refused_versions"] == 1 and m["load_failures"] == 1
        await cache.close()

    asyncio.run(main())


def test_first_load_falls_back_past_a_corrupt_latest_version(tiny: Backbone, source: MemorySource) -> None:
    src = fresh(tiny, source)
    src.publish("t5", corrupted(tenant_files(tiny, "t5", seed=205)))

    async def main() -> None:
        cache = TenantCache(src, tiny, max_bytes=1 << 30, poll_interval_s=None)
        assert (await cache.get("t5")).version == 1
        assert cache.metrics()["refused_versions"] == 1
        src.publish("only", corrupted(tenant_files(tiny, "only", seed=206)))
        with pytest.raises(CorruptArtifact):
            await cache.get("only")
        await cache.close()

    asyncio.run(main())


def test_poll_drops_deleted_tenants_and_survives_registry_errors(tiny: Backbone, source: MemorySource) -> None:
    src = fresh(tiny, source)

    async def main() -> None:
        cache = TenantCache(src, tiny, max_bytes=1 << 30, poll_interval_s=None)
        await cache.get("t0")
        await cache.get("t1")
        src.fail_latest = OSError("registry unreachable")
        await cache.poll_once()
        assert set(cache.cached()) == {"t0", "t1"} and cache.metrics()["poll_errors"] == 2
        src.fail_latest = None
        src.delete("t1")
        await cache.poll_once()
        assert set(cache.cached()) == {"t0"}
        await cache.close()

    asyncio.run(main())


def test_background_poll_picks_up_a_new_version(tiny: Backbone, source: MemorySource) -> None:
    src = fresh(tiny, source)

    async def main() -> None:
        cache = TenantCache(src, tiny, max_bytes=1 << 30, poll_interval_s=0.05)
        assert (await cache.get("t2")).version == 1
        src.publish("t2", tenant_files(tiny, "t2", seed=302))
        for _ in range(100):
            await asyncio.sleep(0.02)
            if (await cache.get("t2")).version == 2:
                break
        assert (await cache.get("t2")).version == 2
        await cache.close()

    asyncio.run(main())


def test_a_registry_error_on_first_load_is_raised_counted_and_retried(tiny: Backbone, source: MemorySource) -> None:
    src = fresh(tiny, source)

    async def main() -> None:
        cache = TenantCache(src, tiny, max_bytes=1 << 30, poll_interval_s=5.0)
        src.fail_latest = OSError("registry unreachable")
        with pytest.raises(OSError):
            await cache.get("t1")
        assert cache.metrics()["load_failures"] == 1
        src.fail_latest = None
        assert (await cache.get("t1")).version == 1  # not remembered as missing: the next request retries
        await cache.close()

    asyncio.run(main())
