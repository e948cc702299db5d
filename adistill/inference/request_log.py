"""Structured request logs: one JSON line per request, and the request id that ties a line to a client's call.

- `request_id(header)`: the client's `X-Request-Id` when it is a safe short token (1-64 characters of letters,
  digits, `.`, `_`, `-`, `:`; never something shaped like an API key), else a new random id (`new_request_id`).
  Return it to the client in the `X-Request-Id` response header.
- `log_request(RequestRecord(...))`: a JSON line on the `adistill.requests` logger, at DEBUG for every request and
  at WARNING for a server-side error (status >= 500). Client errors (4xx: bad bodies, unknown tenants, 401/403/429
  refusals) stay at DEBUG: a client must not be able to flood the WARNING log, and refusals already have their own
  rate-limited summary lines (`quotas.RefusalCounter`).
- `endpoint_of(path)`: the endpoint a URL path belongs to, from a fixed set (`ENDPOINTS`), so logs and metric labels
  never carry raw paths.

A line holds exactly the fields of `RequestRecord`: request id, tenant id, endpoint, status, latency in ms and the
number of texts. Never an API key, a text or a raw header: a tenant id that is not a valid id is logged as
`_invalid`, a missing one as `-`.

Plain Python: no Ray, no FastAPI.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from dataclasses import dataclass

from adistill.tenant_id import TENANT_ID_PATTERN

log = logging.getLogger("adistill.requests")

REQUEST_ID_HEADER = "X-Request-Id"
SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
KEY_PREFIX = "adk_"  # adistill API keys (adistill.store.keys) start so: never echoed or logged, even as an id
KEY_SHAPE = re.compile(r"adk_[0-9a-f]{12}_", re.IGNORECASE)  # `adk_<key id>_<secret>`: may look like a tenant id
ENDPOINTS = ("predict", "batch", "tenant", "tenants", "healthz", "metrics", "docs", "other")
WARN_FROM_STATUS = 500


def new_request_id() -> str:
    """A fresh request id: 16 random hex characters (64 bits)."""
    return secrets.token_hex(8)


def is_safe_request_id(value: str | None) -> bool:
    """A short token that may be logged and echoed: 1-64 safe characters, not shaped like an API key."""
    if not value or SAFE_REQUEST_ID.fullmatch(value) is None:
        return False
    return not value.lower().startswith(KEY_PREFIX)


def request_id(header: str | None) -> str:
    """The client's request id when it is a safe short token, else a new one."""
    return header if header and is_safe_request_id(header) else new_request_id()


def endpoint_of(path: str) -> str:
    """One of `ENDPOINTS` for a URL path: `/v1/tenants/{id}/predict` -> `predict`, `/v1/predict` -> `batch`,
    `/v1/tenants/{id}` -> `tenant`, `/v1/tenants` -> `tenants`, `/docs...` and `/openapi.json` -> `docs`, unknown
    paths -> `other`."""
    parts = [p for p in path.split("/") if p]
    if parts == ["v1", "predict"]:
        return "batch"
    if parts[:2] == ["v1", "tenants"]:
        return {2: "tenants", 3: "tenant"}.get(len(parts), "predict" if parts[3:] == ["predict"] else "other")
    if len(parts) == 1 and parts[0] in ("healthz", "metrics"):
        return parts[0]
    if parts and (parts[0] == "docs" or parts == ["openapi.json"]):
        return "docs"
    return "other"


def logged_tenant(tenant_id: str | None) -> str:
    """The tenant id as it may be logged: a valid id, `-` for none, `_invalid` for anything else (an API key
    pasted into the URL included)."""
    if tenant_id is None:
        return "-"
    valid = TENANT_ID_PATTERN.fullmatch(tenant_id) and not KEY_SHAPE.match(tenant_id)
    return tenant_id if valid else "_invalid"


@dataclass(frozen=True)
class RequestRecord:
    """What one request's log line says. `rows`: the number of texts (0 for routes without texts)."""

    request_id: str
    tenant_id: str | None
    endpoint: str
    status: int
    latency_ms: float
    rows: int = 0

    def to_json(self) -> str:
        return json.dumps(
            {
                "event": "request",
                "request_id": self.request_id if is_safe_request_id(self.request_id) else "_invalid",
                "tenant_id": logged_tenant(self.tenant_id),
                "endpoint": self.endpoint if self.endpoint in ENDPOINTS else "other",
                "status": int(self.status),
                "latency_ms": round(float(self.latency_ms), 3),
                "rows": int(self.rows),
            },
            separators=(",", ":"),
        )


def log_request(record: RequestRecord, logger: logging.Logger = log) -> None:
    """Log `record` as one JSON line: WARNING for a status >= 500, DEBUG otherwise (nothing is built when the
    level is off)."""
    level = logging.WARNING if record.status >= WARN_FROM_STATUS else logging.DEBUG
    if logger.isEnabledFor(level):
        logger.log(level, "%s", record.to_json())
