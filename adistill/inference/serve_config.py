"""`ServeConfig`: everything the serving application reads, validated once at the edge (no Ray here)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from adistill.config import Config, at_least, require


@dataclass(frozen=True)
class ServeConfig(Config):
    """Everything the application reads; `build_app` args and `adistill serve` flags become this once.

    Types are checked from the annotations (adistill.config.Config); in `from_dict`, a None
    storage_options/ray_actor_options/ingress_ray_actor_options (an empty YAML value) means the default."""

    label = "serve config"
    none_means_default = ("storage_options", "ray_actor_options", "ingress_ray_actor_options")

    registry: str  # fsspec URI of the registry: ./registry, file:///..., s3://bucket/prefix
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec options (s3: key, secret, client_kwargs)
    backbone: str | None = None  # HF folder, s3:// URI or all-MiniLM-L6-v2 (default); must match the artifacts
    device: str = "auto"  # "auto" (cuda if the replica has a GPU), "cpu", "cuda", "cuda:1"...
    max_batch_size: int = 32  # rows (texts) per encoder forward
    batch_wait_timeout_s: float = 0.005  # how long a partial batch waits for more rows
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
    ingress_replicas: int = 1
    ingress_ray_actor_options: dict[str, Any] = field(default_factory=lambda: {"num_cpus": 0.1})

    def check(self) -> None:
        require(bool(self.registry.strip()), "registry is required (the registry URI)")
        at_least(self, 1, "max_batch_size", "cache_bytes", "bank_slots", "bank_bytes", "load_workers")
        at_least(self, 1, "max_texts", "max_body_bytes", "max_top_k", "replicas", "ingress_replicas")
        require(
            self.max_ongoing_requests is None or self.max_ongoing_requests >= self.max_batch_size,
            f"max_ongoing_requests must be >= max_batch_size ({self.max_batch_size}), got {self.max_ongoing_requests}",
        )
        at_least(self, 0, "batch_wait_timeout_s")
        require(self.poll_interval_s > 0, f"poll_interval_s must be > 0, got {self.poll_interval_s!r}")
        require(
            re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None,
            f"device must be auto, cpu or cuda[:N], got {self.device!r}",
        )

    @property
    def ongoing_requests(self) -> int:
        return self.max_ongoing_requests or 4 * self.max_batch_size


__all__ = ["ServeConfig"]
