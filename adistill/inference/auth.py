"""Who is calling: `Authorization: Bearer <key>` -> a `Principal`, checked against the key store's digests.

- A key `adk_<id>_<secret>` is looked up by its public id, then its SHA-256 is compared with the stored digest by
  `hmac.compare_digest` (constant time). A malformed or unknown key costs the same digest and one comparison with a
  dummy digest, so timing tells nothing about which keys exist.
- Admin keys from the environment (a Kubernetes Secret, `ServeConfig.admin_key_env`) are kept as digests only and
  compared the same way; they need not have the `adk_` form but must be at least 32 characters.
- `refresh()` re-reads the key document (one small object) when its tag changed; each serving replica calls it
  every half poll interval and before a check whenever the table is older than the poll interval (unless a read is in
  progress already), so a new or revoked key takes effect within `poll_interval_s` without a restart. A failed read
  keeps the previous table (logged, counted); requests never queue behind a read of a table they already have.
- Keys are never logged: log lines name key ids at most.

Plain Python: no Ray, no FastAPI.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from adistill.errors import AdistillError, ConfigError
from adistill.store.keys import KeyStore, key_id_of

log = logging.getLogger(__name__)

MIN_ADMIN_KEY_CHARS = 32
_DUMMY = hashlib.sha256(b"adistill: no such key").digest()


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: a tenant's key, an admin key, or everyone when auth is off."""

    key_id: str | None  # None: an environment admin key, or auth off
    tenant: str | None  # None: admin
    source: str = "store"  # "store", "env" or "auth-off"

    @property
    def admin(self) -> bool:
        return self.tenant is None

    def may_call(self, tenant_id: str) -> bool:
        return self.admin or self.tenant == tenant_id


ANYONE = Principal(None, None, "auth-off")


def bearer_token(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (scheme case-insensitive), else None."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class Authenticator:
    """The key table of one serving replica. `store=None` means no key store (environment admin keys only)."""

    def __init__(
        self,
        store: KeyStore | None,
        admin_keys: Sequence[str] = (),
        poll_interval_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        for key in admin_keys:
            if len(key) < MIN_ADMIN_KEY_CHARS:
                raise ConfigError(f"an admin key from the environment needs at least {MIN_ADMIN_KEY_CHARS} characters")
        self.store = store
        self.poll_interval_s = poll_interval_s
        self._clock = clock
        self._env_admins = [hashlib.sha256(k.encode()).digest() for k in admin_keys]
        self._table: dict[str, tuple[bytes, Principal]] = {}
        self._tag: str | None = None
        self._loaded_at: float | None = None
        self._lock = threading.Lock()
        self._reading = 0  # refreshes in progress (their threads), under _reading_lock
        self._reading_lock = threading.Lock()
        self._read_once = False  # the key document was read at least once
        self.refresh_errors = 0
        self.refreshes = 0

    # -- the table -------------------------------------------------------------------------------------------

    def refresh(self) -> bool:
        """Re-read the key document if it changed (blocking: call it off the event loop). True when it worked."""
        if self.store is None:
            self._loaded_at = self._clock()
            return True
        with self._reading_lock:
            self._reading += 1
        try:
            return self._refresh(self.store)
        finally:
            with self._reading_lock:
                self._reading -= 1

    def _refresh(self, store: KeyStore) -> bool:
        with self._lock:
            try:
                records, tag = store.read_tagged()
            except (AdistillError, OSError) as exc:
                # keep the previous table and retry after the interval (not at every request while storage is down)
                self.refresh_errors += 1
                self._loaded_at = self._clock()
                log.warning("key store %s: cannot read the keys, keeping the previous ones: %s", store.uri, exc)
                return False
            self.refreshes += 1
            self._loaded_at = self._clock()
            self._read_once = True
            if tag == self._tag and self._table:
                return True
            table = {}
            for r in records:
                if r.active:
                    table[r.key_id] = (bytes.fromhex(r.sha256), Principal(r.key_id, r.tenant))
            if tag != self._tag:
                log.info("key store %s: %d active key(s)", store.uri, len(table))
            self._table, self._tag = table, tag
            return True

    def stale(self) -> bool:
        """Whether the table was last read (or tried) longer than the poll interval ago, or never. A table read once
        is not stale while a read is in progress: requests go on with it instead of queueing behind a slow or
        unreachable store (the read in progress brings any change; measured in benchmarks/results/faults.md)."""
        if self._loaded_at is None:
            return True
        if self._reading and self._read_once:
            return False
        return self._clock() - self._loaded_at > self.poll_interval_s

    @property
    def key_count(self) -> int:
        return len(self._table) + len(self._env_admins)

    # -- checking --------------------------------------------------------------------------------------------

    def authenticate(self, authorization: str | None) -> Principal | None:
        """The caller behind an Authorization header, or None (missing, malformed, unknown or revoked key)."""
        token = bearer_token(authorization)
        presented = hashlib.sha256((token or "").encode("utf-8", "surrogatepass")).digest()
        key_id = key_id_of(token) if token else None
        entry = self._table.get(key_id) if key_id else None
        expected, principal = entry if entry else (_DUMMY, None)
        found = hmac.compare_digest(presented, expected) and principal is not None and token is not None
        admin_env = False
        for admin in self._env_admins:  # every one compared: no early exit
            admin_env |= hmac.compare_digest(presented, admin)
        if found:
            return principal
        if admin_env and token is not None:
            return Principal(None, None, "env")
        return None

    def metrics(self) -> dict[str, object]:
        return {
            "keys": self.key_count,
            "key_refreshes": self.refreshes,
            "key_refresh_errors": self.refresh_errors,
            "keys_age_s": None if self._loaded_at is None else round(self._clock() - self._loaded_at, 2),
        }


__all__ = ["ANYONE", "Authenticator", "Principal", "bearer_token"]
