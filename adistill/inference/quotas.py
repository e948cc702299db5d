"""Per-tenant quotas at the HTTP front of each serving replica: requests per second (token bucket) and rows in
flight, plus the counters of refused requests (401/403/429) per tenant that `/metrics` and the logs report.

- `Quota`: the limits of one tenant (`ServeConfig.quota` for everyone, `ServeConfig.tenant_quotas` per tenant).
- `QuotaLimiter.admit(tenant, rows)`: a `Ticket` (release it when the answer is back) or a `Refusal` with the
  seconds after which a retry may succeed (the `Retry-After` header); `precheck(tenant)` the refusal any request
  would get now, taking nothing (the front door's cheap 429 before a body is read). A tenant's limits are split
  evenly over the serving replicas (`share`), since the HTTP proxy spreads requests over them.
- `RefusalCounter`: counts per tenant and status, bounded in tenants, and logs one summary line at most every
  `log_every_s` seconds (never a key: the caller passes a tenant id and a status).

Plain Python: no Ray, no FastAPI.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from adistill.config import Config, at_least, require

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Quota(Config):
    """One tenant's limits; null means no limit. `burst`: requests allowed at once above the steady rate (null:
    one second's worth). `rows_in_flight`: texts sent to the encoder and not answered yet; a request is always
    admitted when the tenant has nothing in flight, so a request of `max_texts` texts never starves."""

    requests_per_s: float | None = 100.0
    burst: int | None = None
    rows_in_flight: int | None = 64

    def check(self) -> None:
        require(
            self.requests_per_s is None or self.requests_per_s > 0,
            f"requests_per_s must be > 0 or null, got {self.requests_per_s!r}",
        )
        at_least(self, 1, "burst", "rows_in_flight")

    @property
    def bucket(self) -> float:
        """The token bucket's capacity (requests)."""
        if self.burst is not None:
            return float(self.burst)
        return float(max(1, math.ceil(self.requests_per_s or 1)))


@dataclass(frozen=True)
class Refusal:
    """Why a request is refused (429) and when to retry (whole seconds, >= 1, for `Retry-After`)."""

    reason: str
    retry_after_s: int


@dataclass
class _Bucket:
    tokens: float
    at: float
    rows: int = 0


class Ticket:
    """Rows admitted for one request; `release()` (or `with ticket:`) once the answer is back."""

    def __init__(self, limiter: QuotaLimiter, tenant: str, rows: int) -> None:
        self._limiter, self.tenant, self.rows = limiter, tenant, rows
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._limiter._release(self.tenant, self.rows)

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class QuotaLimiter:
    """Token buckets and rows in flight per tenant (one serving replica's share of every limit)."""

    def __init__(
        self,
        default: Quota,
        overrides: Mapping[str, Quota] | None = None,
        share: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if share < 1:
            raise ValueError(f"share must be >= 1, got {share}")
        self.default = default
        self.overrides = dict(overrides or {})
        self.share = share
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()
        self._calls = 0

    def quota(self, tenant: str) -> Quota:
        return self.overrides.get(tenant, self.default)

    def _rate(self, q: Quota) -> float | None:
        return None if q.requests_per_s is None else q.requests_per_s / self.share

    def _capacity(self, q: Quota) -> float:
        return max(1.0, q.bucket / self.share)

    def _rows_limit(self, q: Quota) -> int | None:
        return None if q.rows_in_flight is None else max(1, math.ceil(q.rows_in_flight / self.share))

    def admit(self, tenant: str, rows: int) -> Ticket | Refusal:
        """Take one request token and `rows` rows in flight for `tenant`, or say why not and when to retry."""
        q = self.quota(tenant)
        now = self._clock()
        with self._lock:
            self._calls += 1
            if self._calls % 4096 == 0:
                self._prune(now)
            b = self._buckets.get(tenant)
            if b is None:
                b = self._buckets[tenant] = _Bucket(self._capacity(q), now)
            refusal = self._refusal(tenant, q, b, rows, now)
            if refusal is not None:
                return refusal
            if self._rate(q) is not None:
                b.tokens -= 1.0
            b.rows += rows
        return Ticket(self, tenant, rows)

    def precheck(self, tenant: str) -> Refusal | None:
        """The refusal any request of `tenant` would get now (no token left, or its rows in flight at the limit),
        taking nothing: lets the HTTP front door answer 429 before the body is read and parsed, so a client
        hammering past its limit costs the replica little. `admit` still decides for the requests it lets through."""
        q = self.quota(tenant)
        now = self._clock()
        with self._lock:
            b = self._buckets.get(tenant)  # no bucket: nothing in flight, a full bucket (and none made for a stranger)
            return None if b is None else self._refusal(tenant, q, b, 1, now)

    def _refusal(self, tenant: str, q: Quota, b: _Bucket, rows: int, now: float) -> Refusal | None:
        """Refill `b` to `now`; the refusal for a request of `rows` rows, if any (called under the lock)."""
        rate, rows_limit = self._rate(q), self._rows_limit(q)
        if rate is not None:
            b.tokens = min(self._capacity(q), b.tokens + (now - b.at) * rate)
        b.at = now
        if rows_limit is not None and b.rows > 0 and b.rows + rows > rows_limit:
            return Refusal(f"tenant {tenant!r} has {b.rows} texts in flight (limit {q.rows_in_flight})", 1)
        if rate is not None and b.tokens < 1.0:
            wait = (1.0 - b.tokens) / rate
            return Refusal(f"tenant {tenant!r} is over {q.requests_per_s:g} requests/s", max(1, math.ceil(wait)))
        return None

    def _release(self, tenant: str, rows: int) -> None:
        with self._lock:
            b = self._buckets.get(tenant)
            if b is not None:
                b.rows = max(0, b.rows - rows)

    def _prune(self, now: float) -> None:
        """Forget idle tenants (full bucket, nothing in flight): memory stays bounded by active tenants."""
        for tenant, b in list(self._buckets.items()):
            q = self.quota(tenant)
            rate = self._rate(q)
            full = rate is None or b.tokens + (now - b.at) * rate >= self._capacity(q)
            if b.rows == 0 and full:
                del self._buckets[tenant]

    def in_flight(self) -> dict[str, int]:
        with self._lock:
            return {t: b.rows for t, b in self._buckets.items() if b.rows}


STATUSES = ("401", "403", "429")


class RefusalCounter:
    """Refused requests per tenant (the tenant in the URL; "-" for routes without one) and status."""

    def __init__(self, max_tenants: int = 1000, log_every_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.max_tenants = max_tenants
        self.log_every_s = log_every_s
        self._clock = clock
        self._counts: dict[str, dict[str, int]] = {}
        self._since_log: dict[tuple[str, str], int] = {}
        self._logged_at = -math.inf  # the first refusal is logged at once, later ones in summaries
        self._lock = threading.Lock()

    def count(self, tenant: str | None, status: int) -> None:
        name = tenant or "-"
        code = str(status)
        with self._lock:
            if name not in self._counts and len(self._counts) >= self.max_tenants:
                name = "_other"  # a flood of made-up tenant ids cannot grow this without bound
            row = self._counts.setdefault(name, dict.fromkeys(STATUSES, 0))
            row[code] = row.get(code, 0) + 1
            self._since_log[(name, code)] = self._since_log.get((name, code), 0) + 1
            now = self._clock()
            if now - self._logged_at < self.log_every_s:
                return
            pending, self._since_log, self._logged_at = self._since_log, {}, now
        parts = [f"{t} {c}x{n}" for (t, c), n in sorted(pending.items())]
        log.warning("refused requests (tenant status x count) since the last report: %s", ", ".join(parts))

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            per_tenant = {t: dict(c) for t, c in sorted(self._counts.items())}
        totals = {s: sum(c.get(s, 0) for c in per_tenant.values()) for s in STATUSES}
        return {"total": totals, "by_tenant": per_tenant}


__all__ = ["Quota", "QuotaLimiter", "Refusal", "RefusalCounter", "Ticket"]
