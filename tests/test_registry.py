"""The registry behaves the same on a local folder, on moto's S3 server and on a real S3 store (SeaweedFS)."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import pickle
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch
from helpers import fast_config, random_tenant

from adistill.backbone import Backbone, load_backbone
from adistill.errors import BackboneMismatch, ConfigError, CorruptArtifact, InvalidTenantId, TenantNotFound
from adistill.store.artifact import CONFIG, WEIGHTS, artifact_files
from adistill.store.registry import POINTER, Registry, RegistryError

BACKENDS = ["local", "moto", "seaweed"]
METRICS = {"test": {"accuracy": 0.75, "examples": 24.0}, "validation": {"accuracy": 0.7, "examples": 18.0}}


@dataclass
class Backend:
    name: str
    uri: str
    storage_options: dict[str, Any]

    def registry(self) -> Registry:
        return Registry(self.uri, self.storage_options)

    def _fs(self) -> tuple[Any, str]:
        options = dict(self.storage_options)
        if self.uri.startswith("s3://"):
            options["use_listings_cache"] = False
        fs, root = fsspec.core.url_to_fs(self.uri, **options)
        return fs, root.rstrip("/")

    def raw_put(self, rel: str, data: bytes) -> None:
        fs, root = self._fs()
        fs.pipe_file(f"{root}/{rel}", data)

    def raw_get(self, rel: str) -> bytes:
        fs, root = self._fs()
        return bytes(fs.cat_file(f"{root}/{rel}"))

    def raw_rm(self, rel: str) -> None:
        fs, root = self._fs()
        fs.rm_file(f"{root}/{rel}")

    def raw_files(self) -> list[str]:
        fs, root = self._fs()
        fs.invalidate_cache()
        try:
            return sorted(p[len(root) + 1 :] for p in fs.find(root))
        except FileNotFoundError:
            return []


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "local":
        return Backend("local", str(tmp_path / "registry"), {})
    bucket = request.getfixturevalue(f"s3_{request.param}")
    return Backend(request.param, bucket.uri("reg/istry"), bucket.storage_options)


def make_files(tiny: Backbone, tenant_id: str, seed: int, method: str = "adapter") -> dict[str, bytes]:
    """An artifact with random (non-zero) weights: no training needed."""
    model = random_tenant(tiny, seed, method=method)
    return artifact_files(tenant_id, model, tiny, fast_config(method), {"source": "synthetic"}, METRICS)


@pytest.fixture(scope="module")
def arts(tiny: Backbone) -> dict[str, dict[str, bytes]]:
    return {
        "bank1": make_files(tiny, "bank", 1),
        "bank2": make_files(tiny, "bank", 2),
        "travel": make_files(tiny, "travel", 3),
        "mix": make_files(tiny, "mix", 4, method="fusion"),
    }


def without_version(config: bytes) -> dict[str, Any]:
    meta = json.loads(config)
    meta.pop("version")
    return meta  # type: ignore[no-any-return]


# ----------------------------------------------------------------------------------------------------------------


def test_publish_get_list_delete(backend: Backend, tiny: Backbone, arts: dict[str, dict[str, bytes]]) -> None:
    reg = backend.registry()
    assert reg.tenants() == [] and reg.latest_version("bank") is None and reg.versions("bank") == []
    with pytest.raises(TenantNotFound, match="'bank'"):
        reg.get("bank", tiny)

    assert reg.publish("bank", arts["bank1"]) == 1
    assert reg.publish("bank", arts["bank2"]) == 2
    assert reg.publish("travel", arts["travel"]) == 1
    assert reg.publish("mix", arts["mix"]) == 1
    assert reg.tenants() == ["bank", "mix", "travel"]
    assert reg.versions("bank") == [1, 2] and reg.latest_version("bank") == 2
    assert reg.meta("bank")["version"] == 2 and reg.meta("bank", 1)["version"] == 1

    # round trip: weights byte-identical, config identical but for the version, model tensors equal
    for version, key in ((1, "bank1"), (2, "bank2")):
        files = reg.get_files("bank", version)
        assert files[WEIGHTS] == arts[key][WEIGHTS]
        assert without_version(files[CONFIG]) == without_version(arts[key][CONFIG])
    latest = reg.get("bank", tiny)
    assert latest.version == 2 and latest.tenant_id == "bank"
    expected = random_tenant(tiny, 2).state_dict()
    assert all(torch.equal(expected[k], v) for k, v in latest.model.state_dict().items())
    with pytest.raises(TenantNotFound, match="version 9"):
        reg.get("bank", tiny, 9)

    # teachers: single-adapter tenants on that backbone only, metadata only
    assert reg.adapters_for(tiny.fingerprint) == [("bank", 2), ("travel", 1)]
    assert reg.adapters_for(tiny.fingerprint, exclude=["bank"]) == [("travel", 1)]
    assert reg.adapters_for("0" * 64) == []

    # deleting the latest version moves the pointer back; numbers are not reused
    reg.delete("bank", 2)
    assert reg.versions("bank") == [1] and reg.latest_version("bank") == 1
    assert reg.get_files("bank")[WEIGHTS] == arts["bank1"][WEIGHTS]
    assert reg.publish("bank", arts["bank2"]) == 3
    reg.delete("bank", 1)
    assert reg.versions("bank") == [3]
    reg.delete("bank", 3)  # the last version: the tenant goes
    assert "bank" not in reg.tenants() and reg.latest_version("bank") is None
    reg.delete("travel")
    assert reg.tenants() == ["mix"]
    assert not [f for f in backend.raw_files() if "/travel/" in f or "/bank/" in f]
    with pytest.raises(TenantNotFound):
        reg.delete("travel")
    with pytest.raises(TenantNotFound):
        reg.delete("mix", 5)


def test_a_registry_pickles_by_uri(backend: Backend, arts: dict[str, dict[str, bytes]]) -> None:
    reg = backend.registry()
    reg.publish("bank", arts["bank1"])
    copy = pickle.loads(pickle.dumps(reg))
    assert copy.uri == reg.uri and copy.versions("bank") == [1]


CORRUPTIONS = [
    "flip-weights",
    "truncate-weights",
    "missing-weights",
    "flip-config",
    "foreign-config",
    "missing-config",
    "garbage-pointer",
    "foreign-pointer",
]


def corrupt(backend: Backend, tenant: str, kind: str, arts: dict[str, dict[str, bytes]]) -> None:
    folder = f"tenants/{tenant}/v000001"
    weights = backend.raw_get(f"{folder}/{WEIGHTS}")
    if kind == "flip-weights":
        backend.raw_put(f"{folder}/{WEIGHTS}", weights[:100] + bytes([weights[100] ^ 1]) + weights[101:])
    elif kind == "truncate-weights":
        backend.raw_put(f"{folder}/{WEIGHTS}", weights[: len(weights) // 2])
    elif kind == "missing-weights":
        backend.raw_rm(f"{folder}/{WEIGHTS}")
    elif kind == "flip-config":
        config = backend.raw_get(f"{folder}/{CONFIG}").replace(b'"adapter"', b'"finetune"', 1)
        backend.raw_put(f"{folder}/{CONFIG}", config)
    elif kind == "foreign-config":
        backend.raw_put(f"{folder}/{CONFIG}", arts["travel"][CONFIG])
    elif kind == "missing-config":
        backend.raw_rm(f"{folder}/{CONFIG}")
    elif kind == "garbage-pointer":
        backend.raw_put(f"tenants/{tenant}/{POINTER}", b"\x00not json")
    elif kind == "foreign-pointer":
        backend.raw_put(f"tenants/{tenant}/{POINTER}", json.dumps({"version": 1, "hello": "world"}).encode())


def test_corrupt_versions_are_never_returned(
    backend: Backend, tiny: Backbone, arts: dict[str, dict[str, bytes]]
) -> None:
    reg = backend.registry()
    for i, kind in enumerate(CORRUPTIONS):
        tenant = f"c{i}"
        files = make_files(tiny, tenant, 10 + i)
        assert reg.publish(tenant, files) == 1
        corrupt(backend, tenant, kind, arts)
        with pytest.raises(CorruptArtifact, match=f"tenants/{tenant}"):
            reg.get(tenant, tiny)
        with pytest.raises(CorruptArtifact):
            reg.get_files(tenant)
        if "weights" not in kind:  # metadata itself is bad: not listed as a teacher either
            with pytest.raises(CorruptArtifact):
                reg.meta(tenant)
            assert tenant not in [t for t, _ in reg.adapters_for(tiny.fingerprint)]
        if "pointer" in kind:
            with pytest.raises(CorruptArtifact, match=POINTER):
                reg.latest_version(tenant)
        reg.delete(tenant)  # a corrupt tenant can always be removed
        assert tenant not in reg.tenants()


def test_wrong_backbone_is_refused(
    backend: Backend, tiny: Backbone, other_tiny_path: Path, arts: dict[str, dict[str, bytes]]
) -> None:
    reg = backend.registry()
    reg.publish("bank", arts["bank1"])
    with pytest.raises(BackboneMismatch, match="fingerprint"):
        reg.get("bank", load_backbone(str(other_tiny_path)))


def test_corrupt_input_is_not_published(backend: Backend, arts: dict[str, dict[str, bytes]]) -> None:
    reg = backend.registry()
    good = arts["bank1"]
    weights = good[WEIGHTS]
    bad_inputs: list[tuple[dict[str, bytes], type[Exception]]] = [
        ({**good, WEIGHTS: weights[:-1] + bytes([weights[-1] ^ 1])}, CorruptArtifact),
        ({**good, WEIGHTS: weights[:10]}, CorruptArtifact),
        ({WEIGHTS: weights}, CorruptArtifact),
        ({CONFIG: good[CONFIG]}, CorruptArtifact),
        ({**good, CONFIG: b'{"format": "something-else"}'}, CorruptArtifact),
        ({**good, "../escape": b"x"}, CorruptArtifact),
        (arts["travel"], ConfigError),  # built for another tenant
    ]
    for files, error in bad_inputs:
        with pytest.raises(error):
            reg.publish("bank", files)
    assert reg.tenants() == [] and backend.raw_files() == []


HOSTILE_IDS = ["../x", "a/b", "", "Bank", "x" * 64, ".hidden", "-x", "a\nb", "a b", "..", "/abs", "a/../../b"]


class _NoTouch:
    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the store was touched ({name}) for a hostile tenant id")


@pytest.mark.parametrize("tenant_id", HOSTILE_IDS)
def test_hostile_ids_are_refused_before_any_path(
    tenant_id: str, tmp_path: Path, tiny: Backbone, arts: dict[str, dict[str, bytes]]
) -> None:
    reg = Registry(str(tmp_path / "registry"))
    reg._store = _NoTouch()  # type: ignore[assignment]
    calls = [
        lambda: reg.publish(tenant_id, arts["bank1"]),
        lambda: reg.get(tenant_id, tiny),
        lambda: reg.get_files(tenant_id),
        lambda: reg.meta(tenant_id),
        lambda: reg.latest_version(tenant_id),
        lambda: reg.versions(tenant_id),
        lambda: reg.delete(tenant_id),
        lambda: reg.delete(tenant_id, 1),
    ]
    for call in calls:
        with pytest.raises(InvalidTenantId):
            call()
    assert not (tmp_path / "registry").exists() and not (tmp_path / "x").exists()


# --- crashes and races ------------------------------------------------------------------------------------------


class _Crash(Exception):
    pass


class _CrashingStore:
    """Wraps a store; raises on the first write whose path ends with `at` (or on the pointer update)."""

    def __init__(self, inner: Any, at: str) -> None:
        self.inner, self.at = inner, at

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def write(self, path: str, data: bytes) -> None:
        if path.endswith(self.at):
            raise _Crash(path)
        self.inner.write(path, data)

    def write_if(self, path: str, data: bytes, tag: str | None) -> bool:
        if self.at == POINTER:
            raise _Crash(path)
        return bool(self.inner.write_if(path, data, tag))


def assert_serves_v1(reg: Registry, tiny: Backbone, arts: dict[str, dict[str, bytes]]) -> None:
    assert reg.latest_version("bank") == 1 and reg.versions("bank") == [1]
    assert reg.get_files("bank")[WEIGHTS] == arts["bank1"][WEIGHTS]
    assert reg.get("bank", tiny).version == 1
    assert reg.adapters_for(tiny.fingerprint) == [("bank", 1)]


@pytest.mark.parametrize("at", [WEIGHTS, CONFIG, POINTER])
def test_publish_killed_midway_keeps_previous_version(
    backend: Backend, at: str, tiny: Backbone, arts: dict[str, dict[str, bytes]]
) -> None:
    reg = backend.registry()
    reg.publish("bank", arts["bank1"])
    store = reg._store
    reg._store = _CrashingStore(store, at)  # type: ignore[assignment]
    with pytest.raises(_Crash):
        reg.publish("bank", arts["bank2"])
    reg._store = store
    assert_serves_v1(backend.registry(), tiny, arts)
    # the half version's number stays claimed: the next publish never writes into its folder
    assert reg.publish("bank", arts["bank2"]) == 3
    assert reg.versions("bank") == [1, 3]


def _publish_then_die(uri: str, options: dict[str, Any], files: dict[str, bytes]) -> None:
    """In a child process: publish, and SIGKILL ourselves just before the config (the last file) is written."""
    reg = Registry(uri, options)
    inner = reg._store

    class Dying(_CrashingStore):
        def write(self, path: str, data: bytes) -> None:
            if path.endswith(CONFIG):
                os.kill(os.getpid(), signal.SIGKILL)
            inner.write(path, data)

    reg._store = Dying(inner, CONFIG)  # type: ignore[assignment]
    reg.publish("bank", files)


@pytest.mark.parametrize("backend", ["local", "moto"], indirect=True)
def test_publisher_process_killed_keeps_previous_version(
    backend: Backend, tiny: Backbone, arts: dict[str, dict[str, bytes]]
) -> None:
    reg = backend.registry()
    reg.publish("bank", arts["bank1"])
    child = mp.get_context("fork").Process(
        target=_publish_then_die, args=(backend.uri, backend.storage_options, arts["bank2"])
    )
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    assert_serves_v1(backend.registry(), tiny, arts)
    assert any(f.startswith("tenants/bank/v000002/") for f in backend.raw_files())  # the half version is there...
    assert reg.versions("bank") == [1]  # ...and invisible


def _race(uri: str, options: dict[str, Any], files: list[dict[str, bytes]], barrier: Any, out: Any) -> None:
    reg = Registry(uri, options)
    barrier.wait(30)
    out.put([reg.publish("bank", f) for f in files])


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_racing_publishers_get_distinct_complete_versions(backend: Backend, tiny: Backbone) -> None:
    workers, each = 4, 2
    files = {(w, i): make_files(tiny, "bank", 100 + 10 * w + i) for w in range(workers) for i in range(each)}
    ctx = mp.get_context("fork")
    barrier, out = ctx.Barrier(workers), ctx.Queue()
    procs = [
        ctx.Process(
            target=_race,
            args=(backend.uri, backend.storage_options, [files[(w, i)] for i in range(each)], barrier, out),
        )
        for w in range(workers)
    ]
    for p in procs:
        p.start()
    got = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    numbers = sorted(v for vs in got for v in vs)
    assert numbers == list(range(1, workers * each + 1))  # distinct: nobody shared a version folder
    reg = backend.registry()
    assert reg.versions("bank") == numbers and reg.latest_version("bank") == workers * each
    by_version = {v: files[(w, i)] for w, vs in enumerate(got) for i, v in enumerate(vs)}
    # queue order is not worker order: match each version's weights to what some worker published
    published = {f[WEIGHTS] for f in files.values()}
    for v in numbers:
        stored = reg.get_files("bank", v)
        assert stored[WEIGHTS] in published
        assert json.loads(stored[CONFIG])["version"] == v
    assert len({reg.get_files("bank", v)[WEIGHTS] for v in numbers}) == len(by_version)


# --- S3 settings ------------------------------------------------------------------------------------------------


def test_s3_credentials_and_endpoint_from_environment(
    s3_moto: Any, monkeypatch: pytest.MonkeyPatch, arts: dict[str, dict[str, bytes]]
) -> None:
    for name, value in s3_moto.env.items():
        monkeypatch.setenv(name, value)
    reg = Registry(s3_moto.uri())  # no storage options: AWS_* variables only
    assert reg.publish("bank", arts["bank1"]) == 1
    assert Registry(s3_moto.uri(), s3_moto.storage_options).versions("bank") == [1]


def test_seaweedfs_wrong_credentials_give_a_clear_error(s3_seaweed: Any, arts: dict[str, dict[str, bytes]]) -> None:
    good = Registry(s3_seaweed.uri(), s3_seaweed.storage_options)
    good.publish("bank", arts["bank1"])
    for wrong in ({"key": "nobody"}, {"secret": "wrong-secret"}):
        reg = Registry(s3_seaweed.uri(), {**s3_seaweed.storage_options, **wrong})
        with pytest.raises(RegistryError, match=s3_seaweed.uri()) as info:
            reg.latest_version("bank")
        assert "access key" in str(info.value).lower() or "signature" in str(info.value).lower()
        with pytest.raises(RegistryError):
            reg.publish("bank", arts["bank2"])
    assert good.versions("bank") == [1]


def test_missing_bucket_is_a_clear_error(s3_moto: Any) -> None:
    reg = Registry("s3://no-such-bucket-here/registry", s3_moto.storage_options)
    with pytest.raises(RegistryError, match="bucket does not exist"):
        reg.tenants()


def test_other_fsspec_stores_work_with_check_then_write(tiny: Backbone, arts: dict[str, dict[str, bytes]]) -> None:
    """The generic path (no conditional writes; docs/registry.md): fsspec's in-memory filesystem."""
    import uuid

    reg = Registry(f"memory://adistill-{uuid.uuid4().hex[:8]}/registry")
    assert reg.publish("bank", arts["bank1"]) == 1 and reg.publish("bank", arts["bank2"]) == 2
    assert reg.tenants() == ["bank"] and reg.versions("bank") == [1, 2]
    assert reg.get("bank", tiny, 1).version == 1
    reg.delete("bank", 2)
    assert reg.latest_version("bank") == 1
    reg.delete("bank")
    assert reg.tenants() == []


def test_a_relative_local_registry_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray workers run in other working directories: a relative folder must mean the same folder for them."""
    monkeypatch.chdir(tmp_path)
    assert Registry("reg").uri == str(tmp_path / "reg")
    assert Registry("./reg/").uri == str(tmp_path / "reg")
