"""Tenant isolation without Ray: who a key is (auth), per-tenant quotas, refusal counters, the fair batch queue."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from adistill.errors import ConfigError
from adistill.inference.auth import Authenticator, bearer_token
from adistill.inference.fair_queue import FairBatcher, rows_within_budget
from adistill.inference.interject import Interjection, Interjections
from adistill.inference.quotas import Quota, QuotaLimiter, Refusal, RefusalCounter, Ticket
from adistill.store.keys import KeyStore


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# ----------------------------------------------------------------------------------------------------------- auth


def test_bearer_header_parsing() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer   abc ") == "abc"
    for bad in (None, "", "Bearer", "Bearer ", "Basic abc", "abc"):
        assert bearer_token(bad) is None


def test_tenant_admin_unknown_and_revoked_keys(tmp_path: Path) -> None:
    store = KeyStore(str(tmp_path))
    rec_a, key_a = store.create(tenant="a")
    _, admin = store.create(admin=True)
    clock = Clock()
    auth = Authenticator(store, poll_interval_s=5, clock=clock)
    assert auth.stale()
    auth.refresh()
    assert not auth.stale()
    p = auth.authenticate(f"Bearer {key_a}")
    assert p is not None and p.tenant == "a" and p.may_call("a") and not p.may_call("b") and not p.admin
    q = auth.authenticate(f"Bearer {admin}")
    assert q is not None and q.admin and q.may_call("b")
    wrong = key_a[:-1] + ("A" if key_a[-1] != "A" else "B")  # the right id, a wrong secret
    for header in (None, "", f"Bearer {wrong}", "Bearer nonsense", f"Basic {key_a}", key_a):
        assert auth.authenticate(header) is None, header

    store.revoke(rec_a.key_id)
    _, key_c = store.create(tenant="c")
    assert auth.authenticate(f"Bearer {key_a}") is not None  # until the next refresh
    clock.now += 6
    assert auth.stale()
    auth.refresh()
    assert auth.authenticate(f"Bearer {key_a}") is None
    c = auth.authenticate(f"Bearer {key_c}")
    assert c is not None and c.tenant == "c"
    assert auth.metrics()["keys"] == 2


def test_every_check_compares_digests_in_constant_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = KeyStore(str(tmp_path))
    _, key = store.create(tenant="a")
    auth = Authenticator(store, admin_keys=["x" * 40])
    auth.refresh()
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr("adistill.inference.auth.hmac.compare_digest", spy)
    for header in (f"Bearer {key}", "Bearer adk_000000000000_" + "a" * 43, "Bearer junk", None):
        calls.clear()
        auth.authenticate(header)
        assert len(calls) == 2, header  # the key table (or a dummy digest) and the one environment admin key
        assert all(len(a) == len(b) == 32 for a, b in calls)


def test_environment_admin_key(tmp_path: Path) -> None:
    auth = Authenticator(None, admin_keys=["s" * 40])
    auth.refresh()
    p = auth.authenticate("Bearer " + "s" * 40)
    assert p is not None and p.admin and p.source == "env"
    assert auth.authenticate("Bearer " + "s" * 39) is None
    with pytest.raises(ConfigError, match="at least 32 characters"):
        Authenticator(None, admin_keys=["short"])


def test_an_unreadable_key_store_keeps_the_previous_keys(tmp_path: Path) -> None:
    store = KeyStore(str(tmp_path))
    _, key = store.create(tenant="a")
    auth = Authenticator(store)
    auth.refresh()
    (tmp_path / "keys.json").write_text("{broken")
    assert auth.refresh() is False and auth.refresh_errors == 1
    assert auth.authenticate(f"Bearer {key}") is not None


# --------------------------------------------------------------------------------------------------------- quotas


def test_rate_limit_with_burst_and_retry_after() -> None:
    clock = Clock()
    limiter = QuotaLimiter(Quota(requests_per_s=2, burst=3, rows_in_flight=None), clock=clock)
    tickets = [limiter.admit("a", 1) for _ in range(3)]
    assert all(isinstance(t, Ticket) for t in tickets)
    refused = limiter.admit("a", 1)
    assert isinstance(refused, Refusal) and refused.retry_after_s == 1 and "2 requests/s" in refused.reason
    assert isinstance(limiter.admit("b", 1), Ticket)  # another tenant is not affected
    clock.now += 0.5  # one token back at 2/s
    assert isinstance(limiter.admit("a", 1), Ticket)
    assert isinstance(limiter.admit("a", 1), Refusal)
    slow = QuotaLimiter(Quota(requests_per_s=0.1, rows_in_flight=None), clock=clock)
    assert isinstance(slow.admit("a", 1), Ticket)
    r = slow.admit("a", 1)
    assert isinstance(r, Refusal) and r.retry_after_s == 10


def test_rows_in_flight_and_release() -> None:
    limiter = QuotaLimiter(Quota(requests_per_s=None, rows_in_flight=10), clock=Clock())
    big = limiter.admit("a", 50)  # nothing in flight: always admitted, however large
    assert isinstance(big, Ticket)
    refused = limiter.admit("a", 1)
    assert isinstance(refused, Refusal) and refused.retry_after_s == 1 and "in flight" in refused.reason
    big.release()
    big.release()  # twice is once
    with limiter.admit("a", 6) as t1:  # type: ignore[union-attr]
        assert isinstance(t1, Ticket)
        assert isinstance(limiter.admit("a", 4), Ticket)
        assert isinstance(limiter.admit("a", 1), Refusal)
        assert limiter.in_flight() == {"a": 10}
    assert limiter.in_flight() == {"a": 4}


def test_precheck_refuses_like_admit_and_takes_nothing() -> None:
    clock = Clock()
    limiter = QuotaLimiter(Quota(requests_per_s=2, burst=2, rows_in_flight=3), clock=clock)
    assert limiter.precheck("a") is None and limiter.precheck("../x") is None  # unknown: no bucket is made
    assert limiter._buckets == {}
    first = limiter.admit("a", 3)  # three rows in flight: at the limit
    assert isinstance(first, Ticket)
    over = limiter.precheck("a")
    assert isinstance(over, Refusal) and "in flight" in over.reason
    assert limiter.precheck("b") is None  # another tenant is not affected
    first.release()
    assert limiter.precheck("a") is None and limiter.precheck("a") is None  # it took no token: one is still left
    assert isinstance(limiter.admit("a", 1), Ticket)
    rate = limiter.precheck("a")  # both tokens spent
    assert isinstance(rate, Refusal) and rate.retry_after_s == 1 and "2 requests/s" in rate.reason
    clock.now += 0.5
    assert limiter.precheck("a") is None and isinstance(limiter.admit("a", 1), Ticket)


def test_overrides_and_share_over_ingress_replicas() -> None:
    clock = Clock()
    limiter = QuotaLimiter(
        Quota(requests_per_s=4, burst=4, rows_in_flight=8),
        {"big": Quota(requests_per_s=100, burst=100, rows_in_flight=100)},
        share=2,
        clock=clock,
    )
    assert sum(isinstance(limiter.admit("small", 1), Ticket) for _ in range(10)) == 2  # burst 4 over 2 replicas
    assert sum(isinstance(limiter.admit("big", 1), Ticket) for _ in range(60)) == 50
    with pytest.raises(ConfigError):
        Quota(requests_per_s=0)
    with pytest.raises(ConfigError):
        Quota(rows_in_flight=0)


def test_refusal_counter_is_bounded_and_logs_no_keys(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    counter = RefusalCounter(max_tenants=3, log_every_s=10, clock=clock)
    with caplog.at_level(logging.WARNING, logger="adistill.inference.quotas"):
        counter.count("a", 401)
        for i in range(10):
            counter.count(f"t{i}", 429)
        counter.count(None, 403)
        clock.now += 11
        counter.count("a", 429)
    snap = counter.snapshot()
    assert snap["total"] == {"401": 1, "403": 1, "429": 11}
    assert set(snap["by_tenant"]) == {"a", "t0", "t1", "_other"}
    assert snap["by_tenant"]["_other"]["429"] == 8 and snap["by_tenant"]["_other"]["403"] == 1
    assert len(caplog.records) == 2  # the first at once, the rest in one summary
    assert "a 401x1" in caplog.records[0].getMessage() and "_other 429x8" in caplog.records[1].getMessage()


# ----------------------------------------------------------------------------------------------------- fair queue


def test_a_flooding_tenant_cannot_push_another_tenants_rows_behind_its_own() -> None:
    batches: list[list[str]] = []

    async def run(rows: list[tuple[str, int]]) -> list[str]:
        batches.append([t for t, _ in rows])
        await asyncio.sleep(0.01)
        return [f"{t}{i}" for t, i in rows]

    async def main() -> tuple[list[str], list[str]]:
        batcher: FairBatcher[tuple[str, int], str] = FairBatcher(run, max_batch_size=8, batch_wait_timeout_s=0.001)
        flood = [asyncio.create_task(batcher.submit("flood", [("flood", i) for i in range(4)])) for _ in range(20)]
        await asyncio.sleep(0.005)  # the first flood batch runs; 72 flood rows wait
        quiet = await batcher.submit("quiet", [("quiet", 0), ("quiet", 1)])
        got = await asyncio.gather(*flood)
        return quiet, got[0]

    quiet, first = asyncio.run(main())
    assert quiet == ["quiet0", "quiet1"] and first == ["flood0", "flood1", "flood2", "flood3"]
    served = next(i for i, b in enumerate(batches) if "quiet" in b)
    assert served <= 2, batches  # behind at most the batch in progress and the one after it, not 9 batches
    assert batches[served].count("quiet") == 2 and len(batches[served]) == 8


def test_round_robin_across_tenants_in_one_batch() -> None:
    batches: list[list[str]] = []

    async def run(rows: list[str]) -> list[str]:
        batches.append(rows)
        return rows

    async def main() -> None:
        batcher: FairBatcher[str, str] = FairBatcher(run, max_batch_size=6, batch_wait_timeout_s=0.05)
        await asyncio.gather(
            batcher.submit("a", ["a"] * 6), batcher.submit("b", ["b"] * 2), batcher.submit("c", ["c"] * 1)
        )

    asyncio.run(main())
    assert batches[0] == ["a", "b", "c", "a", "b", "a"]
    assert batches[1] == ["a", "a", "a"]


def test_errors_reach_every_row_and_cancelled_rows_are_dropped() -> None:
    seen: list[list[int]] = []

    async def run(rows: list[int]) -> list[int]:
        seen.append(rows)
        if 13 in rows:
            raise ValueError("bad row")
        await asyncio.sleep(0.02)
        return rows

    async def main() -> None:
        batcher: FairBatcher[int, int] = FairBatcher(run, max_batch_size=4, batch_wait_timeout_s=0.001)
        with pytest.raises(ValueError, match="bad row"):
            await batcher.submit("a", [13, 1])
        first = asyncio.create_task(batcher.submit("a", [1, 2, 3, 4]))
        await asyncio.sleep(0.005)
        doomed = asyncio.create_task(batcher.submit("b", [99, 98]))
        await asyncio.sleep(0)
        doomed.cancel()
        assert await first == [1, 2, 3, 4]
        assert await batcher.submit("c", [7]) == [7]
        await batcher.close()

    asyncio.run(main())
    assert all(99 not in rows for rows in seen)


def test_the_batch_wait_adapts_to_load() -> None:
    """A lone sequential caller is answered without the wait; a burst of callers still shares one batch."""
    batches: list[list[int]] = []

    async def run(rows: list[int]) -> list[int]:
        batches.append(rows)
        return rows

    async def main() -> tuple[float, float]:
        fixed: FairBatcher[int, int] = FairBatcher(run, max_batch_size=8, batch_wait_timeout_s=0.2, adaptive_wait=False)
        adaptive: FairBatcher[int, int] = FairBatcher(run, max_batch_size=8, batch_wait_timeout_s=0.2)
        timings = []
        for batcher in (fixed, adaptive):
            start = time.perf_counter()
            for i in range(3):  # one caller: each request only after the previous answer
                assert await batcher.submit("a", [i]) == [i]
                await asyncio.sleep(0.25)  # slower than the wait: no other rows are coming
            timings.append(time.perf_counter() - start - 3 * 0.25)
        batches.clear()
        burst = await asyncio.gather(*(adaptive.submit(t, [k]) for k, t in enumerate("abcdefgh")))  # 8 callers at once
        assert burst == [[k] for k in range(8)]
        await fixed.close()
        await adaptive.close()
        return timings[0], timings[1]

    fixed_s, adaptive_s = asyncio.run(main())
    assert fixed_s >= 3 * 0.2  # the fixed wait is paid by every lone request
    assert adaptive_s < 0.5  # the adaptive one skips it (0.6 s if it waited)
    assert len(batches) <= 2 and sum(map(len, batches)) == 8


def test_a_light_tenant_keeps_a_heavy_tenants_batches_short() -> None:
    """With `tenant_batch_rows`, a heavy tenant's batches stay short while a light tenant is active; they fill when
    it is alone, when every active tenant is heavy, and once the light tenant has been quiet past the window."""
    batches: list[str] = []

    async def run(rows: list[str]) -> list[str]:
        batches.append("".join(rows))
        await asyncio.sleep(0.001)
        return rows

    def batcher(window_s: float = 5.0) -> FairBatcher[str, str]:
        return FairBatcher(run, 8, 0.001, tenant_batch_rows=2, active_window_s=window_s)

    async def main() -> dict[str, list[str]]:
        seen: dict[str, list[str]] = {}
        alone = batcher()
        await alone.submit("h", ["h"] * 12)
        seen["alone"], _ = batches[:], batches.clear()

        light = batcher()
        await light.submit("l", ["l"])  # the light tenant is active, nothing of it waiting
        batches.clear()
        await asyncio.gather(light.submit("h", ["h"] * 6), light.submit("l", ["l"]))
        seen["light"], _ = batches[:], batches.clear()
        assert light.capped_batches >= 1

        heavy = batcher()
        await asyncio.gather(heavy.submit("a", ["a"] * 6), heavy.submit("b", ["b"] * 6))
        seen["heavy"], _ = batches[:], batches.clear()

        expired = batcher(window_s=0.05)
        await expired.submit("l", ["l"])
        await asyncio.sleep(0.1)
        batches.clear()
        await expired.submit("h", ["h"] * 12)
        seen["expired"] = batches[:]
        assert expired.capped_batches == 0
        return seen

    seen = asyncio.run(main())
    assert seen["alone"] == ["h" * 8, "h" * 4]
    assert seen["light"] == ["hlh", "hh", "hh"]  # the light row in the first batch, the heavy one 2 rows at a time
    assert seen["heavy"] == ["ab" * 4, "abab"]  # both heavy: the first batch fills
    assert seen["expired"] == ["h" * 8, "h" * 4]


def test_rows_within_a_forward_budget() -> None:
    # the line through a 1-row and a full-batch forward: CPU-like (a large fixed cost), GPU-like (almost flat)
    assert rows_within_budget(0.0132, 0.0838, 32, 1.1) == 1
    assert rows_within_budget(0.0132, 0.0838, 32, 1.25) == 2
    assert rows_within_budget(0.0025, 0.0030, 32, 1.1) == 16
    assert rows_within_budget(0.0025, 0.0024, 32, 1.1) == 32  # noise: no cost per row measured
    assert rows_within_budget(0.0132, 0.0838, 1, 1.1) == 1
    with pytest.raises(ValueError, match="budget"):
        rows_within_budget(0.01, 0.02, 8, 0.9)


def test_a_light_tenants_rows_are_interjected_into_the_batch_in_progress() -> None:
    """With `interject`, a light tenant's row that arrives while a heavy tenant's batch runs is handed over at once
    (answered before that batch ends); rows of the heavy tenant never are."""
    events: list[str] = []

    async def run(rows: list[str]) -> list[str]:
        events.append("start " + "".join(rows))
        await asyncio.sleep(0.2)
        events.append("end " + "".join(rows))
        return rows

    async def interject(rows: list[str]) -> list[str]:
        events.append("interject " + "".join(rows))
        return rows

    async def main() -> None:
        batcher: FairBatcher[str, str] = FairBatcher(run, 8, 0.001, tenant_batch_rows=1, interject=interject)
        await batcher.submit("l", ["l"])  # the light tenant is active
        events.clear()
        heavy = asyncio.create_task(batcher.submit("h", ["h"] * 3))
        await asyncio.sleep(0.05)  # the heavy tenant's first batch runs
        assert await batcher.submit("l", ["l"]) == ["l"]
        events.append("light answered")
        assert await heavy == ["h"] * 3
        await batcher.close()

    asyncio.run(main())
    assert events[:3] == ["start h", "interject l", "light answered"], events
    assert "interject h" not in " ".join(events)


def test_interjections_run_once_on_the_forward_thread_or_are_withdrawn() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        interjections = Interjections(lambda x: x * 2 if x >= 0 else 1 / 0)
        done, withdrawn, failed = (Interjection((x,), loop) for x in (21, 5, -1))
        for job in (done, withdrawn, failed):
            interjections.offer(job)
        assert interjections.withdraw(withdrawn) and not interjections.withdraw(withdrawn)
        await asyncio.to_thread(interjections.run_pending)  # the forward thread, between two layers
        assert await done.done == 42 and not interjections.withdraw(done)
        with pytest.raises(ZeroDivisionError):
            await failed.done
        assert interjections.ran == 1 and not withdrawn.done.done()  # the failed one is not counted

    asyncio.run(main())
