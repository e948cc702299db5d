"""The adapter registry: immutable numbered versions of every tenant's artifact plus a pointer, on any fsspec store.

Layout under the root URI (a local folder, `file://...` or `s3://bucket/prefix`):

    tenants/<tenant_id>/LATEST                        the pointer: committed versions, the latest one, checksums
    tenants/<tenant_id>/v000001/.claim                written first, exclusively: reserves version 1 for one publisher
    tenants/<tenant_id>/v000001/adapter.safetensors
    tenants/<tenant_id>/v000001/adapter_config.json   written last of the version's files

Publishing: claim the next free version folder by an exclusive create, write the weights, then the config, then
add the version to the pointer with a compare-and-swap write. Only versions the pointer names exist for readers,
so a publish killed at any point leaves the previous version served and no half version visible. Every read
checks the config against the pointer's sha256 and the weights against the config's. docs/registry.md has
the details, including what each store guarantees. The stores themselves are in `adistill.store.backends`.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import random
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Any

from adistill.backbone import Backbone
from adistill.errors import AdistillError, ConfigError, CorruptArtifact, TenantNotFound
from adistill.store.artifact import CONFIG, WEIGHTS, Artifact, artifact_from_files, parse_meta, sha256, verify_files
from adistill.store.backends import open_store, storage_errors
from adistill.tenant_id import TENANT_ID_PATTERN, validate_tenant_id

log = logging.getLogger(__name__)

POINTER = "LATEST"
CLAIM = ".claim"
POINTER_FORMAT = "adistill-registry-pointer"
POINTER_FORMAT_VERSION = 1
TEACHER_METHODS = ("adapter", "distill")
_VERSION_DIR = re.compile(r"^v(\d{6,})$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_CAS_ATTEMPTS = 200
_CLAIM_ATTEMPTS = 1000


class RegistryError(AdistillError):
    """The registry's storage cannot be reached, refuses access, or keeps losing a concurrent update."""


def version_dir(version: int) -> str:
    return f"v{version:06d}"


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _pointer(tenant_id: str, versions: dict[str, Any]) -> dict[str, Any]:
    """The LATEST document for a set of committed versions: the highest one is the latest."""
    latest = max(int(v) for v in versions)
    return {
        "format": POINTER_FORMAT,
        "format_version": POINTER_FORMAT_VERSION,
        "tenant_id": tenant_id,
        "version": latest,
        "config_sha256": versions[str(latest)]["config_sha256"],
        "weights_sha256": versions[str(latest)]["weights_sha256"],
        "updated_at": _now(),
        "versions": versions,
    }


# --------------------------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------------------------


class Registry:
    """Published tenant artifacts on one fsspec root. See the module docstring for the layout and protocol.

    `s3://` credentials and endpoint come from the usual AWS variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    AWS_ENDPOINT_URL, AWS_DEFAULT_REGION) or from `storage_options` (s3fs: key, secret, client_kwargs.endpoint_url).
    """

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None) -> None:
        if not isinstance(uri, str) or not uri.strip():
            raise ConfigError(f"registry URI must be a non-empty string, got {uri!r}")
        uri = uri.rstrip("/") or uri
        if "://" not in uri:  # a local folder: absolute, so Ray workers (other working directories) see the same one
            uri = os.path.abspath(os.path.expanduser(uri))
        self.uri = uri
        self.storage_options = dict(storage_options or {})
        self._store = open_store(self.uri, self.storage_options)

    def __repr__(self) -> str:
        return f"Registry({self.uri!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # pickles (Ray tasks, multiprocessing) re-open the store from the URI and options in the new process
        return (Registry, (self.uri, self.storage_options))

    # paths: only ever built from validated ids, integer versions and checked file names
    def _tenant(self, tenant_id: str) -> str:
        return f"tenants/{validate_tenant_id(tenant_id)}"

    def _where(self, tenant_id: str, version: int | None = None) -> str:
        base = f"{self.uri}/tenants/{tenant_id}"
        return base if version is None else f"{base}/{version_dir(version)}"

    def _storage(self, doing: str) -> AbstractContextManager[None]:
        """Storage failures (network, credentials, missing bucket) become one clear RegistryError."""
        return storage_errors(f"registry {self.uri}", doing, RegistryError)

    # ---------------------------------------------------------------------------------------------- pointer
    def _read_pointer(self, tenant_id: str) -> tuple[dict[str, Any], str] | None:
        path = f"{self._tenant(tenant_id)}/{POINTER}"
        with self._storage(f"read the pointer of tenant {tenant_id!r}"):
            got = self._store.read_tagged(path)
        if got is None:
            return None
        data, tag = got
        return self._parse_pointer(tenant_id, data), tag

    def _parse_pointer(self, tenant_id: str, data: bytes) -> dict[str, Any]:
        where = f"{self._where(tenant_id)}/{POINTER}"
        try:
            pointer = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptArtifact(f"{where}: not valid JSON ({exc})") from exc
        ok = (
            isinstance(pointer, dict)
            and pointer.get("format") == POINTER_FORMAT
            and pointer.get("tenant_id") == tenant_id
            and isinstance(pointer.get("versions"), dict)
            and isinstance(pointer.get("version"), int)
            and str(pointer["version"]) in pointer["versions"]
        )
        if not ok:
            raise CorruptArtifact(f"{where}: not a registry pointer for tenant {tenant_id!r}")
        return pointer

    def _pointer_or_raise(self, tenant_id: str) -> dict[str, Any]:
        got = self._read_pointer(tenant_id)
        if got is None:
            raise TenantNotFound(f"tenant {tenant_id!r} is not published in registry {self.uri}")
        return got[0]

    def _resolve(self, tenant_id: str, version: int | None) -> tuple[int, dict[str, Any]]:
        """(version, its pointer entry); TenantNotFound unless the pointer names that version."""
        pointer = self._pointer_or_raise(tenant_id)
        if version is None:
            version = int(pointer["version"])
        if isinstance(version, bool) or not isinstance(version, int) or str(version) not in pointer["versions"]:
            known = ", ".join(str(v) for v in _versions(pointer))
            raise TenantNotFound(
                f"tenant {tenant_id!r} has no version {version!r} in registry {self.uri} (versions: {known})"
            )
        return version, pointer["versions"][str(version)]

    def _update_pointer(
        self, tenant_id: str, change: Callable[[dict[str, Any] | None], dict[str, Any] | None]
    ) -> dict[str, Any] | None:
        """Compare-and-swap loop: `change(pointer or None) -> new pointer or None (delete)`; returns the result."""
        path = f"{self._tenant(tenant_id)}/{POINTER}"
        for attempt in range(_CAS_ATTEMPTS):
            got = self._read_pointer(tenant_id)
            current, tag = got if got else (None, None)
            new = change(current)
            with self._storage(f"update the pointer of tenant {tenant_id!r}"):
                if new is None:
                    if current is not None:
                        self._store.delete(path)  # not conditional: see docs/registry.md (deletes vs publishes)
                    return None
                if self._store.write_if(path, _json_bytes(new), tag):
                    return dict(new)
            time.sleep(random.uniform(0.0, 0.02 * min(attempt + 1, 10)))
        raise RegistryError(f"registry {self.uri}: pointer of tenant {tenant_id!r} kept changing; gave up")

    # ---------------------------------------------------------------------------------------------- writes
    def publish(self, tenant_id: str, files: dict[str, bytes]) -> int:
        """Verify `files` (an artifact), write them as the tenant's next version, then move the pointer to it.

        Returns the new version number. The config's `version` field is rewritten to that number; the checksums
        it records (of the weights) still hold.
        """
        tenant = self._tenant(tenant_id)
        meta = _check_input(tenant_id, files)
        token = uuid.uuid4().hex
        version = self._claim(tenant_id, token)
        where = self._where(tenant_id, version)
        meta["version"] = version
        config = _json_bytes(meta)
        folder = f"{tenant}/{version_dir(version)}"
        with self._storage(f"write {where}"):
            for name in sorted(files):
                if name != CONFIG:
                    self._store.write(f"{folder}/{name}", files[name])
            self._store.write(f"{folder}/{CONFIG}", config)  # last: its presence means the files are complete
        entry = {
            "config_sha256": sha256(config),
            "weights_sha256": sha256(files[WEIGHTS]),
            "bytes": len(config) + sum(len(d) for n, d in files.items() if n != CONFIG),
            "method": meta.get("method"),
            "published_at": _now(),
        }

        def add(pointer: dict[str, Any] | None) -> dict[str, Any]:
            versions = dict(pointer["versions"]) if pointer else {}
            versions[str(version)] = entry
            return _pointer(tenant_id, versions)  # latest = max: never moves backwards, a slower publisher only adds

        pointer = self._update_pointer(tenant_id, add)
        log.info("published %s version %d (latest is %s)", tenant_id, version, pointer["version"] if pointer else None)
        return version

    def _claim(self, tenant_id: str, token: str) -> int:
        """Reserve the next version number by creating its `.claim` exclusively (two publishers never share one)."""
        tenant = self._tenant(tenant_id)
        with self._storage(f"list the versions of tenant {tenant_id!r}"):
            taken = [int(m.group(1)) for d in self._store.list_dirs(tenant) if (m := _VERSION_DIR.match(d))]
        pointer = self._read_pointer(tenant_id)
        if pointer:
            taken += _versions(pointer[0])
        version = max(taken, default=0) + 1
        claim = _json_bytes({"token": token, "host": socket.gethostname(), "pid": os.getpid(), "claimed_at": _now()})
        for _ in range(_CLAIM_ATTEMPTS):
            with self._storage(f"claim {self._where(tenant_id, version)}"):
                if self._store.create(f"{tenant}/{version_dir(version)}/{CLAIM}", claim):
                    return version
            version += 1
        raise RegistryError(f"registry {self.uri}: could not claim a version for tenant {tenant_id!r}")

    def delete(self, tenant_id: str, version: int | None = None) -> None:
        """Delete a whole tenant, or one version (the pointer moves back to the newest remaining version; deleting
        the only version deletes the tenant). Version numbers are not reused while the tenant exists."""
        tenant = self._tenant(tenant_id)
        if version is None:  # works on a corrupt tenant too: the pointer is not parsed
            with self._storage(f"delete tenant {tenant_id!r}"):
                pointer = self._store.read(f"{tenant}/{POINTER}")
                if pointer is None and not self._store.list_dirs(tenant):
                    raise TenantNotFound(f"tenant {tenant_id!r} is not in registry {self.uri}")
                self._store.delete(f"{tenant}/{POINTER}")  # first: the tenant disappears for readers at once
                self._store.delete_tree(tenant)
            log.info("deleted tenant %s from %s", tenant_id, self.uri)
            return
        self._resolve(tenant_id, version)

        def remove(pointer: dict[str, Any] | None) -> dict[str, Any] | None:
            if pointer is None or str(version) not in pointer["versions"]:
                raise TenantNotFound(f"tenant {tenant_id!r} has no version {version} in registry {self.uri}")
            versions = {k: v for k, v in pointer["versions"].items() if k != str(version)}
            if not versions:
                return None
            return _pointer(tenant_id, versions)

        remaining = self._update_pointer(tenant_id, remove)
        with self._storage(f"delete {self._where(tenant_id, version)}"):
            if remaining is None:
                self._store.delete_tree(tenant)
            else:  # keep the .claim: the number stays taken
                folder = f"{tenant}/{version_dir(version)}"
                for name in (CONFIG, WEIGHTS):
                    self._store.delete(f"{folder}/{name}")
        log.info("deleted %s version %d from %s", tenant_id, version, self.uri)

    # ---------------------------------------------------------------------------------------------- reads
    def exists(self) -> bool:
        """Whether anything is at the registry's root (a folder; on S3, objects under the prefix). Publishing
        creates it; read commands refuse a registry that does not exist, so a typo is not an empty registry."""
        with self._storage("check that it exists"):
            return self._store.root_exists()

    def latest_version(self, tenant_id: str) -> int | None:
        """The version the pointer names (one small read), or None for an unknown tenant."""
        got = self._read_pointer(tenant_id)
        return None if got is None else int(got[0]["version"])

    def versions(self, tenant_id: str) -> list[int]:
        """Committed versions, ascending ([] for an unknown tenant)."""
        got = self._read_pointer(tenant_id)
        return [] if got is None else _versions(got[0])

    def tenants(self) -> list[str]:
        """Tenants with a published pointer, sorted."""
        with self._storage("list tenants"):
            names = self._store.list_pointers("tenants", POINTER)
        return [n for n in names if TENANT_ID_PATTERN.fullmatch(n)]

    def _config(self, tenant_id: str, version: int | None) -> tuple[int, bytes, dict[str, Any]]:
        version, entry = self._resolve(tenant_id, version)
        where = self._where(tenant_id, version)
        with self._storage(f"read {where}/{CONFIG}"):
            config = self._store.read(f"{self._tenant(tenant_id)}/{version_dir(version)}/{CONFIG}")
        if config is None:
            raise CorruptArtifact(f"{where}: missing {CONFIG}")
        if sha256(config) != entry.get("config_sha256"):
            raise CorruptArtifact(f"{where}: {CONFIG} does not match the sha256 recorded in {POINTER}")
        meta = parse_meta(config, where)
        if meta.get("tenant_id") != tenant_id or meta.get("version") != version:
            raise CorruptArtifact(
                f"{where}: {CONFIG} describes tenant {meta.get('tenant_id')!r} version {meta.get('version')!r}"
            )
        return version, config, meta

    def meta(self, tenant_id: str, version: int | None = None) -> dict[str, Any]:
        """The parsed adapter_config.json of a version (latest by default): cheap, no weights read."""
        return self._config(tenant_id, version)[2]

    def get_files(self, tenant_id: str, version: int | None = None) -> dict[str, bytes]:
        """The verified files of a version (latest by default): checksums checked, backbone not."""
        version, config, meta = self._config(tenant_id, version)
        where = self._where(tenant_id, version)
        files = {CONFIG: config}
        folder = f"{self._tenant(tenant_id)}/{version_dir(version)}"
        for name in meta.get("files", {}):
            if not _FILE_NAME.fullmatch(name):
                raise CorruptArtifact(f"{where}: {CONFIG} lists a bad file name {name!r}")
            with self._storage(f"read {where}/{name}"):
                data = self._store.read(f"{folder}/{name}")
            if data is None:
                raise CorruptArtifact(f"{where}: missing {name}")
            files[name] = data
        verify_files(meta, files, where)
        return files

    def get(self, tenant_id: str, backbone: Backbone, version: int | None = None) -> Artifact:
        """Load a version (latest by default) onto `backbone`; CorruptArtifact / BackboneMismatch otherwise."""
        files = self.get_files(tenant_id, version)
        version = int(json.loads(files[CONFIG])["version"])
        return artifact_from_files(files, backbone, self._where(tenant_id, version))

    def adapters_for(self, backbone_fingerprint: str, exclude: Iterable[str] = ()) -> list[tuple[str, int]]:
        """(tenant_id, latest version) of published single-adapter tenants (adapter, distill) on that backbone.

        Metadata only; tenants whose metadata is unreadable or corrupt are skipped with a warning."""
        excluded = set(exclude)
        out = []
        for tenant_id in self.tenants():
            if tenant_id in excluded:
                continue
            try:
                version, _, meta = self._config(tenant_id, None)
            except (CorruptArtifact, TenantNotFound) as exc:
                log.warning("not a teacher: %s", exc)
                continue
            fingerprint = meta.get("backbone", {}).get("fingerprint")
            if meta.get("method") in TEACHER_METHODS and fingerprint == backbone_fingerprint:
                out.append((tenant_id, version))
        return out


def _versions(pointer: dict[str, Any]) -> list[int]:
    return sorted(int(v) for v in pointer["versions"])


def _check_input(tenant_id: str, files: dict[str, bytes]) -> dict[str, Any]:
    """The artifact to publish: a config, the files it lists with matching checksums, nothing else."""
    where = f"artifact to publish as {tenant_id!r}"
    if not isinstance(files, dict) or CONFIG not in files:
        raise CorruptArtifact(f"{where}: missing {CONFIG}")
    meta = parse_meta(files[CONFIG], where)
    listed = meta.get("files")
    if not isinstance(listed, dict) or WEIGHTS not in listed:
        raise CorruptArtifact(f"{where}: {CONFIG} records no checksum for {WEIGHTS}")
    verify_files(meta, files, where)
    extra = sorted(set(files) - set(listed) - {CONFIG})
    if extra:
        raise CorruptArtifact(f"{where}: unexpected file(s) {extra} not recorded in {CONFIG}")
    bad = sorted(n for n in files if not _FILE_NAME.fullmatch(n))
    if bad:
        raise CorruptArtifact(f"{where}: bad file name(s) {bad}")
    if meta.get("tenant_id") != tenant_id:
        raise ConfigError(f"{where}: the artifact was built for tenant {meta.get('tenant_id')!r}, not {tenant_id!r}")
    return meta
