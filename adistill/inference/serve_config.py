"""`ServeConfig`: everything the serving application reads, validated once at the edge (no Ray here)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from adistill.config import Config, at_least, require
from adistill.inference.quotas import Quota
from adistill.tenant_id import TENANT_ID_PATTERN


@dataclass(frozen=True)
class ServeConfig(Config):
    """Everything the application reads; `build_app` args and `adistill serve` flags become this once.

    Types are checked from the annotations (adistill.config.Config); in `from_dict`, a None
    storage_options/ray_actor_options/quota/tenant_quotas (an empty YAML value) means the default."""

    label = "serve config"
    none_means_default = ("storage_options", "ray_actor_options", "quota", "tenant_quotas")

    registry: str  # fsspec URI of the registry: ./registry, file:///..., s3://bucket/prefix
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec options (s3: key, secret, client_kwargs)
    backbone: str | None = None  # HF folder, s3:// URI or all-MiniLM-L6-v2 (default); must match the artifacts
    device: str = "auto"  # "auto" (cuda if the replica has a GPU), "cpu", "cuda", "cuda:1"...
    precision: str = "fp32"  # "fp32", or "int8": the encoder's linear layers dynamically quantized (CPU only)
    max_batch_size: int = 32  # rows (texts) per encoder forward
    batch_wait_timeout_s: float = 0.005  # how long a partial batch waits for more rows
    # while a light tenant is active beside a heavy one, a forward holds at most the rows of one tenant that take
    # <= contention_budget x a one-row forward (timed at start-up): 1 on our CPU, more where rows are nearly free;
    # light tenants' rows also run inside the forward in progress (interject.py). None: neither
    contention_budget: float | None = 1.1
    cache_bytes: int = 512 * 2**20  # loaded tenants per replica (host memory), bytes
    bank_slots: int = 256  # tenants per device-side adapter bank
    bank_bytes: int | None = None  # optional cap on each bank's device bytes (fewer slots if smaller)
    poll_interval_s: float = 5.0  # how often cached tenants' registry pointers are read
    load_workers: int = 4  # threads loading artifacts off the event loop
    max_texts: int = 64  # texts per request, else 413
    max_body_bytes: int = 256 * 1024  # request body, else 413
    max_top_k: int = 20  # top_k in [1, max_top_k], else 422
    replicas: int = 1  # encoder replicas (ignored when autoscaling_config is set)
    autoscaling_config: dict[str, Any] | None = None  # Serve autoscaling for the encoder group
    max_ongoing_requests: int | None = None  # per encoder replica; default 4 x max_batch_size
    ray_actor_options: dict[str, Any] = field(default_factory=lambda: {"num_cpus": 1})  # encoder replicas
    # security and quotas (docs/serving.md, "Security" and "Quotas and fairness")
    auth: bool = True  # require `Authorization: Bearer <key>`; false only behind something that authenticates
    keys: str | None = None  # key store URI (`adistill keys --keys`); default: <registry>/_keys
    admin_key_env: str | None = "ADISTILL_ADMIN_KEY"  # an environment variable holding one more admin key
    quota: Quota = field(default_factory=Quota)  # every tenant's limits (per tenant, split over the replicas)
    tenant_quotas: dict[str, dict[str, Any]] = field(default_factory=dict)  # tenant id -> its own limits

    def quota_for(self, tenant_id: str) -> Quota:
        """`quota` with the tenant's own `tenant_quotas` entry on top."""
        override = self.tenant_quotas.get(tenant_id)
        if not override:
            return self.quota
        return Quota.from_dict({**self.quota.to_dict(), **override}, where=f"tenant_quotas.{tenant_id}")

    def quota_overrides(self) -> dict[str, Quota]:
        return {t: self.quota_for(t) for t in self.tenant_quotas}

    def check(self) -> None:
        require(bool(self.registry.strip()), "registry is required (the registry URI)")
        at_least(self, 1, "max_batch_size", "cache_bytes", "bank_slots", "bank_bytes", "load_workers")
        at_least(self, 1, "max_texts", "max_body_bytes", "max_top_k", "replicas")
        require(
            self.max_ongoing_requests is None or self.max_ongoing_requests >= self.max_batch_size,
            f"max_ongoing_requests must be >= max_batch_size ({self.max_batch_size}), got {self.max_ongoing_requests}",
        )
        at_least(self, 0, "batch_wait_timeout_s")
        require(
            self.contention_budget is None or self.contention_budget >= 1.0,
            f"contention_budget must be >= 1 (x a one-row forward) or null, got {self.contention_budget!r}",
        )
        require(self.poll_interval_s > 0, f"poll_interval_s must be > 0, got {self.poll_interval_s!r}")
        require(
            re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None,
            f"device must be auto, cpu or cuda[:N], got {self.device!r}",
        )
        require(self.precision in ("fp32", "int8"), f"precision must be fp32 or int8, got {self.precision!r}")
        require(
            self.precision == "fp32" or not self.device.startswith("cuda"),
            f"precision int8 runs on CPU only, not on device {self.device!r}",
        )
        require(self.keys is None or bool(self.keys.strip()), "keys must be a URI or null")
        require(
            self.admin_key_env is None or re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.admin_key_env) is not None,
            f"admin_key_env must be an environment variable name or null, got {self.admin_key_env!r}",
        )
        for tenant_id, override in self.tenant_quotas.items():
            require(
                TENANT_ID_PATTERN.fullmatch(tenant_id) is not None,
                f"tenant_quotas: {tenant_id!r} is not a valid tenant id",
            )
            unknown = sorted(set(override) - {"requests_per_s", "burst", "rows_in_flight"})
            require(
                not unknown,
                f"tenant_quotas.{tenant_id}: unknown key(s) {unknown}; expected some of "
                "['burst', 'requests_per_s', 'rows_in_flight']",
            )
            self.quota_for(tenant_id)  # the merged limits validate (ConfigError naming the tenant)

    @property
    def quota_share(self) -> int:
        """How many replicas split each tenant's quota: `replicas`, or the autoscaler's minimum (so a quota is never
        exceeded; with more replicas running, each still enforces limit / minimum)."""
        if self.autoscaling_config:
            return max(1, int(self.autoscaling_config.get("min_replicas", 1) or 1))
        return self.replicas

    @property
    def ongoing_requests(self) -> int:
        return self.max_ongoing_requests or 4 * self.max_batch_size


__all__ = ["ServeConfig"]
