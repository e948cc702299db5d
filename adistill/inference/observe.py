"""What the serving code reports, as a protocol: the ray-free core calls an observer, Ray's metrics implement it.

`adistill.distributed.metrics.serving` is the observer that records Prometheus metrics through Ray; `NO_OBSERVER`
records nothing (tests, or serving without Ray). Code in `inference/` takes a `ServingObserver` and never imports
the Ray layer.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from adistill.inference.engine import BankUsage


class ServingObserver(Protocol):
    def request(self, endpoint: str, status: int, seconds: float) -> None:
        """One answered HTTP request (`endpoint`: one of request_log.ENDPOINTS)."""

    def refusal(self, status: int) -> None:
        """A 401/403/429 inside a request answered otherwise (one tenant's rows of a batch request)."""

    def forward(self, rows: int, tenants: int, seconds: float) -> None:
        """One encoder forward: its rows, their distinct tenants, its wall time."""

    def cache_event(self, event: str, value: int) -> None:
        """`TenantCache(on_event=...)`."""

    def banks(self, usage: Iterable[BankUsage]) -> None:
        """The adapter banks' occupancy (`Engine.bank_usage()`)."""


class NoObserver:
    """Records nothing."""

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        pass

    def refusal(self, status: int) -> None:
        pass

    def forward(self, rows: int, tenants: int, seconds: float) -> None:
        pass

    def cache_event(self, event: str, value: int) -> None:
        pass

    def banks(self, usage: Iterable[BankUsage]) -> None:
        pass


NO_OBSERVER: ServingObserver = NoObserver()
