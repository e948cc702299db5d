"""Builders for serving tests: artifact files of random tenants, an in-memory registry stand-in, and the serving app
on the test session's Ray."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

from helpers import fast_config, free_port, random_tenant

from adistill.backbone import Backbone
from adistill.errors import TenantNotFound
from adistill.store.artifact import WEIGHTS, Artifact, artifact_files, artifact_from_files


def tenant_files(backbone: Backbone, tenant_id: str, seed: int, num_labels: int = 3) -> dict[str, bytes]:
    """A published-ready artifact of a tenant with random (non-zero) adapter and head weights."""
    model = random_tenant(backbone, seed=seed, num_labels=num_labels)
    return artifact_files(
        tenant_id, model, backbone, fast_config(), {"source": f"random:{seed}"}, {"val_accuracy": 0.0}
    )


@contextlib.contextmanager
def serve_app(settings: dict[str, Any], name: str) -> Iterator[str]:
    """The serving app built from `settings` (ServeConfig fields), run as `name` at route "/" of the session's Serve;
    yields its base URL; the app is deleted on the way out."""
    from ray import serve

    from adistill.distributed.serve import build_app

    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    port = serve.context._get_global_client().http_config.port  # Serve may already run on the shared instance
    serve.run(build_app(settings), name=name, route_prefix="/")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.delete(name)


def corrupted(files: dict[str, bytes]) -> dict[str, bytes]:
    """The same artifact with its weights flipped in one byte: fails its sha256."""
    weights = bytearray(files[WEIGHTS])
    weights[-1] ^= 0xFF
    return {**files, WEIGHTS: bytes(weights)}


class MemorySource:
    """The registry methods the tenant cache calls, in memory; counts `get` calls; can block or fail loads."""

    def __init__(self) -> None:
        self.store: dict[str, dict[int, dict[str, bytes]]] = {}
        self.gets: Counter[str] = Counter()
        self.delay_s = 0.0
        self.gate: threading.Event | None = None  # when set to an Event, loads wait for it
        self.fail_latest: Exception | None = None

    def publish(self, tenant_id: str, files: dict[str, bytes]) -> int:
        versions = self.store.setdefault(tenant_id, {})
        version = max(versions, default=0) + 1
        versions[version] = files
        return version

    def delete(self, tenant_id: str) -> None:
        self.store.pop(tenant_id, None)

    def latest_version(self, tenant_id: str) -> int | None:
        if self.fail_latest is not None:
            raise self.fail_latest
        return max(self.store.get(tenant_id, {}), default=None)

    def versions(self, tenant_id: str) -> list[int]:
        return sorted(self.store.get(tenant_id, {}))

    def get(self, tenant_id: str, backbone: Backbone, version: int | None = None) -> Artifact:
        self.gets[tenant_id] += 1
        if self.gate is not None:
            self.gate.wait(10)
        time.sleep(self.delay_s)
        versions = self.store.get(tenant_id, {})
        version = version or max(versions, default=0)
        if version not in versions:
            raise TenantNotFound(f"tenant {tenant_id!r} version {version} not found")
        artifact = artifact_from_files(versions[version], backbone, f"{tenant_id}@{version}")
        artifact.meta["version"] = version
        return artifact
