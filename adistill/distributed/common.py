"""Cluster plumbing shared by onboarding, tuning and serving: connecting to Ray, paths that workers on other nodes
can read, Train storage, resources per worker, the backbone check and teachers shipped once per batch."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

import fsspec
import ray

from adistill.backbone import Backbone, load_backbone
from adistill.errors import ConfigError
from adistill.store.uris import absolute_uri

log = logging.getLogger(__name__)


def ensure_ray(address: str | None = None, num_cpus: int | None = None, log_to_driver: bool = False) -> bool:
    """Connect to Ray unless this process already is: the cluster of a `ray job submit`, `address`, `RAY_ADDRESS`,
    or a new local instance (`num_cpus` applies to a new local instance only). True when this call connected."""
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"address": address, "configure_logging": False, "log_to_driver": log_to_driver}
    if num_cpus is not None and address is None:
        kwargs["num_cpus"] = num_cpus
    ray.init(**kwargs)
    return True


def shutdown_ray() -> None:
    """Disconnect from Ray (and stop a local instance this process started)."""
    ray.shutdown()


def run_storage(storage_uri: str | None, storage_options: dict[str, Any]) -> tuple[str | None, Any]:
    """(storage_path, storage_filesystem) for a Train/Tune `RunConfig`: a local folder made absolute, a remote URI
    (s3://...) through fsspec with the registry's options, wrapped for pyarrow. None: Ray's default."""
    if storage_uri is None:
        return None, None
    if "://" not in storage_uri or storage_uri.startswith("file://"):
        return absolute_uri(storage_uri), None
    import pyarrow.fs

    fs, root = open_fs(storage_uri, storage_options)
    return root.rstrip("/"), pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def open_fs(uri: str, storage_options: dict[str, Any]) -> tuple[Any, str]:
    """(fsspec filesystem, path) for `uri`; a bad URI or options is one ConfigError."""
    try:
        fs, root = fsspec.core.url_to_fs(uri, **storage_options)
    except (ImportError, ValueError, TypeError, OSError) as exc:
        raise ConfigError(f"storage path {uri!r}: cannot open its filesystem: {exc}") from exc
    return fs, str(root)


def check_resources(resources: Any, name: str = "resources_per_worker") -> dict[str, float] | None:
    """A resources mapping such as {"CPU": 1, "GPU": 0.25}: names to numbers >= 0 (never booleans), one > 0."""
    if resources is None:
        return None
    ok = (
        isinstance(resources, dict)
        and all(
            isinstance(k, str)
            and isinstance(v, int | float)
            and not isinstance(v, bool)
            and math.isfinite(v)
            and v >= 0
            for k, v in resources.items()
        )
        and any(v > 0 for v in resources.values())
    )
    if not ok:
        raise ConfigError(
            f'{name} must map resource names to numbers >= 0, one of them > 0 (e.g. {{"CPU": 1, "GPU": 0.25}}), '
            f"got {resources!r}"
        )
    return {k: float(v) for k, v in resources.items()}


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def uses_gpu(resources: dict[str, float]) -> bool:
    return resources.get("GPU", 0.0) > 0


def default_resources(workers: int, cpu: float = 1.0) -> dict[str, float]:
    """`cpu` CPUs per worker; with GPUs in the cluster also an equal share of them (at most one each)."""
    gpus = float(ray.cluster_resources().get("GPU", 0.0))
    if gpus <= 0:
        return {"CPU": cpu}
    return {"CPU": cpu, "GPU": min(1.0, gpus / max(1, workers))}


def workers_that_fit(resources: dict[str, float], cap: int) -> int:
    """How many workers of `resources` the cluster holds now (at least 1, at most `cap`)."""
    cluster = ray.cluster_resources()
    fits = [math.floor(cluster.get(k, 0.0) / v + 1e-9) for k, v in resources.items() if v > 0]
    return max(1, min([cap, *fits]))


def warn_if_short(resources: dict[str, float], what: str) -> None:
    """An autoscaling cluster may still grow; a fixed one never will, and the run would wait forever."""
    cluster = ray.cluster_resources()
    short = {k: v for k, v in resources.items() if v > cluster.get(k, 0.0)}
    if short:
        log.warning("each %s asks for %s but the cluster has only %s now", what, short, dict(cluster))


def load_checked_backbone(spec: str | None, device: Any, storage_options: dict[str, Any], fingerprint: str) -> Backbone:
    """Load the backbone on a worker and check it is the driver's (same weights on every node)."""
    backbone = load_backbone(spec, device, storage_options)
    if backbone.fingerprint != fingerprint:
        raise ConfigError(
            f"backbone {spec!r} on this node has fingerprint {backbone.fingerprint[:12]}, "
            f"the driver's has {fingerprint[:12]}: every node must load the same weights"
        )
    return backbone


def ship_teachers(registry: Any, pairs: Iterable[tuple[str, int | None]]) -> dict[str, Any]:
    """Read each teacher's files from the registry once (checksums verified) and put them in the object store:
    {"tenant@version": ObjectRef}. Workers turn them into `Teacher`s with `TeacherShelf`."""
    return {f"{t}@{v}": ray.put(registry.get_files(t, v)) for t, v in sorted(set(pairs), key=str)}


class TeacherShelf:
    """A worker's teachers, loaded from shipped files on first use and kept for every later tenant."""

    def __init__(self, shipped: dict[str, Any], backbone: Backbone) -> None:
        self.shipped, self.backbone = shipped, backbone
        self.loaded: dict[str, Any] = {}

    def get(self, pairs: Iterable[tuple[str, int | None]]) -> list[Any]:
        from adistill.store.artifact import artifact_from_files

        out = []
        for tenant, version in pairs:
            key = f"{tenant}@{version}"
            if key not in self.loaded:
                files = ray.get(self.shipped[key])
                self.loaded[key] = artifact_from_files(files, self.backbone, f"teacher {key}").as_teacher()
            out.append(self.loaded[key])
        return out


def short_error(exc: BaseException) -> str:
    """The root cause of a (possibly wrapped) Ray error, on one line: `Type: last line of its message`."""
    failures = getattr(exc, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        exc = next(iter(failures.values()))
    cause: BaseException = exc
    while getattr(cause, "cause", None) is not None or cause.__cause__ is not None:
        cause = getattr(cause, "cause", None) or cause.__cause__  # type: ignore[assignment]
    lines = [line for line in str(cause).strip().splitlines() if line.strip()]
    return f"{type(cause).__name__}: {lines[-1] if lines else ''}".strip()
