"""API keys of the serving layer: one document of SHA-256 digests, never the keys themselves.

A key reads `adk_<key id>_<secret>`: the key id (12 hex characters, public: it names the key in `keys list` and
`keys revoke`) and a secret of 32 random bytes from `secrets` (43 URL-safe characters). Only the SHA-256 digest of
the whole key is stored, with the tenant it may call (or `admin`: every tenant and the listing endpoints), a name,
the creation time and the key's last four characters (to tell keys apart). High-entropy keys need no slow password
hash: a digest cannot be reversed, and a slow hash would add its cost to every request.

Layout: `<store>/keys.json`, where the store is `<registry>/_keys` by default or any URI (`--keys`). Every change
is a compare-and-swap write of the whole document (the registry's backends: atomic replace under a lock for a folder,
conditional PUT on S3), so concurrent `keys create` never lose a key; the service re-reads the document (one small
object) every poll interval, so new and revoked keys take effect without a restart.

No Ray and no torch here: the CLI and the serving ingress both use this module.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import re
import secrets
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from typing import Any

from adistill.errors import AdistillError, ConfigError
from adistill.store.backends import open_store, storage_errors
from adistill.tenant_id import validate_tenant_id

log = logging.getLogger(__name__)

KEYS_DIR = "_keys"  # under the registry root; never a tenant (tenant ids start with a letter or digit)
KEYS_FILE = "keys.json"
FORMAT = "adistill-keys"
FORMAT_VERSION = 1
PREFIX = "adk"
_KEY = re.compile(r"^adk_([0-9a-f]{12})_([A-Za-z0-9_-]{43,})$")
_KEY_ID = re.compile(r"^[0-9a-f]{12}$")
_CAS_ATTEMPTS = 100


class KeyStoreError(AdistillError):
    """The key store cannot be read or written, or holds something that is not a key document."""


class KeyNotFound(AdistillError):
    """No key with that id in the store."""


@dataclass(frozen=True)
class KeyRecord:
    """What the store keeps about one key (never the key)."""

    key_id: str
    tenant: str | None  # None: an admin key
    name: str
    created_at: str
    sha256: str  # hex digest of the whole key
    last4: str
    revoked_at: str | None = None

    @property
    def admin(self) -> bool:
        return self.tenant is None

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    @property
    def scope(self) -> str:
        return "admin" if self.tenant is None else self.tenant


def new_key() -> tuple[str, str]:
    """(key id, key): a fresh key of 32 random bytes with a 12-hex-character public id in front."""
    key_id = secrets.token_hex(6)
    return key_id, f"{PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"


def key_id_of(key: str) -> str | None:
    """The key id of a well-formed key, else None (no exception: callers treat it as an unknown key)."""
    match = _KEY.match(key)
    return match.group(1) if match else None


def digest(key: str) -> str:
    """The hex SHA-256 of a key, as stored."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def keys_uri(registry: str | None, keys: str | None = None) -> str:
    """Where the keys live: `keys` when given, else `<registry>/_keys`."""
    if keys:
        return keys
    if not registry:
        raise ConfigError("a key store needs --registry (keys under <registry>/_keys) or --keys URI")
    return f"{registry.rstrip('/')}/{KEYS_DIR}"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class KeyStore:
    """The key document at `uri` (a folder, file://, s3://...; the registry's storage backends)."""

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None) -> None:
        if "://" not in uri:
            import os

            uri = os.path.abspath(os.path.expanduser(uri))
        self.uri = uri.rstrip("/") or uri
        self.storage_options = dict(storage_options or {})
        self._store = open_store(self.uri, self.storage_options)

    @classmethod
    def for_registry(
        cls, registry: str | None, storage_options: dict[str, Any] | None = None, keys: str | None = None
    ) -> KeyStore:
        """The store of a registry (`<registry>/_keys`), or the one at `keys` when given."""
        return cls(keys_uri(registry, keys), storage_options)

    def __repr__(self) -> str:
        return f"KeyStore({self.uri!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (KeyStore, (self.uri, self.storage_options))

    def _storage(self, doing: str) -> AbstractContextManager[None]:
        return storage_errors(f"key store {self.uri}", doing, KeyStoreError)

    # ------------------------------------------------------------------------------------------------ reading
    def read_tagged(self) -> tuple[list[KeyRecord], str | None]:
        """(every key, active or revoked; the document's tag). An absent document is ([], None)."""
        with self._storage("read the keys"):
            got = self._store.read_tagged(KEYS_FILE)
        if got is None:
            return [], None
        data, tag = got
        return self._parse(data), tag

    def tag(self) -> str | None:
        """The document's tag (one read): the service re-parses the keys only when it changes."""
        return self.read_tagged()[1]

    def records(self, include_revoked: bool = False) -> list[KeyRecord]:
        """Keys sorted by creation time; active ones only unless `include_revoked`."""
        records, _ = self.read_tagged()
        return [r for r in records if include_revoked or r.active]

    def _parse(self, data: bytes) -> list[KeyRecord]:
        where = f"{self.uri}/{KEYS_FILE}"
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise KeyStoreError(f"{where}: not valid JSON ({exc})") from exc
        if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("keys"), dict):
            raise KeyStoreError(f"{where}: not an adistill key document")
        out = []
        for key_id, entry in doc["keys"].items():
            try:
                record = KeyRecord(key_id=key_id, **entry)
            except TypeError as exc:
                raise KeyStoreError(f"{where}: key {key_id!r} is malformed ({exc})") from exc
            if not _KEY_ID.match(key_id) or not re.fullmatch(r"[0-9a-f]{64}", str(record.sha256)):
                raise KeyStoreError(f"{where}: key {key_id!r} is malformed")
            out.append(record)
        return sorted(out, key=lambda r: r.created_at)  # stable: creation order within a second too

    # ------------------------------------------------------------------------------------------------ writing
    def _update(self, change: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        """Compare-and-swap loop over the whole document: `change(keys) -> keys`."""
        for attempt in range(_CAS_ATTEMPTS):
            with self._storage("read the keys"):
                got = self._store.read_tagged(KEYS_FILE)
            keys: dict[str, Any] = {}
            tag = None
            if got is not None:
                data, tag = got
                keys = {r.key_id: _entry(r) for r in self._parse(data)}
            doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "keys": change(keys)}
            body = (json.dumps(doc, indent=2) + "\n").encode()  # keys in creation order
            with self._storage("write the keys"):
                if self._store.write_if(KEYS_FILE, body, tag):
                    return
            time.sleep(0.01 * min(attempt + 1, 10))
        raise KeyStoreError(f"key store {self.uri}: the key document kept changing; gave up")

    def create(self, tenant: str | None = None, admin: bool = False, name: str = "") -> tuple[KeyRecord, str]:
        """A new key for `tenant`, or an admin key (`admin=True`, no tenant): (its record, the key itself).
        The key is returned once and never stored: show it to the user and forget it."""
        if admin == (tenant is not None):
            raise ConfigError("a key is either for one tenant (--tenant ID) or an admin key (--admin), not both")
        if tenant is not None:
            validate_tenant_id(tenant)
        if not isinstance(name, str) or len(name) > 100 or any(c in name for c in "\n\r\t"):
            raise ConfigError(f"key name must be one line of at most 100 characters, got {name!r}")
        key_id, key = new_key()
        record = KeyRecord(key_id, tenant, name, _now(), digest(key), key[-4:])

        def add(keys: dict[str, Any]) -> dict[str, Any]:
            if key_id in keys:  # 48 random bits: practically never; a retry draws a new id
                raise _IdTaken
            return {**keys, key_id: _entry(record)}

        try:
            self._update(add)
        except _IdTaken:
            return self.create(tenant, admin, name)
        log.info("created key %s for %s", key_id, record.scope)
        return record, key

    def revoke(self, key_id: str) -> KeyRecord:
        """Mark a key revoked (kept in the document, listed with `--all`); the service refuses it within its poll
        interval. Revoking a revoked key is a no-op."""
        found: list[KeyRecord] = []

        def mark(keys: dict[str, Any]) -> dict[str, Any]:
            found.clear()
            if key_id not in keys:
                raise KeyNotFound(f"no key {key_id!r} in {self.uri}")
            entry = dict(keys[key_id])
            entry["revoked_at"] = entry.get("revoked_at") or _now()
            found.append(KeyRecord(key_id=key_id, **entry))
            return {**keys, key_id: entry}

        self._update(mark)
        log.info("revoked key %s", key_id)
        return found[0]


class _IdTaken(Exception):
    pass


def _entry(record: KeyRecord) -> dict[str, Any]:
    entry = asdict(record)
    del entry["key_id"]
    return entry


def create_key(
    registry: str | None,
    tenant: str | None = None,
    admin: bool = False,
    name: str = "",
    storage_options: dict[str, Any] | None = None,
    keys: str | None = None,
) -> str:
    """Create a key in a registry's key store (or at `keys`) and return it: what the demo and scripts call.

    `create_key("./registry", admin=True, name="demo")` -> "adk_..."; send it as `Authorization: Bearer <key>`."""
    return KeyStore.for_registry(registry, storage_options, keys).create(tenant, admin, name)[1]


__all__ = [
    "KEYS_DIR",
    "KeyNotFound",
    "KeyRecord",
    "KeyStore",
    "KeyStoreError",
    "create_key",
    "digest",
    "key_id_of",
    "keys_uri",
    "new_key",
]
