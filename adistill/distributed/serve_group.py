"""The one Serve deployment: the encoder replica group is also the HTTP ingress.

Each replica holds the frozen encoder, the tenant cache, the engine and the fair batch queue
(`adistill.inference.encoder_service.EncoderService`) and serves the FastAPI routes of `serve_http.api` itself: a
request goes proxy -> replica -> encoder forward, with no second deployment and no handle call in between (the
measured cost of that hop is in benchmarks/results/serving.md). Keys and quotas are checked here too; quotas are
per replica (each enforces limit / replicas).

Responses are JSON bytes built once (`json.dumps` of plain dicts): no pydantic objects per row on the hot path; the
schemas in serve_http document the API (/docs) and validate request bodies.

No `from __future__ import annotations` here: FastAPI and Serve read the route signatures at runtime.
"""

import asyncio
import json
import logging
import os
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from adistill.distributed import metrics, serve_gate
from adistill.distributed.serve_http import (
    ERRORS,
    SECURED,
    BatchRequest,
    BatchResponse,
    PredictRequest,
    PredictResponse,
    api,
    counted_tenant,
    error,
)
from adistill.errors import AdistillError, InvalidTenantId, TenantNotFound
from adistill.inference.auth import ANYONE, Authenticator, Principal
from adistill.inference.encoder_service import EncoderService, Refused
from adistill.inference.gc_pauses import GcPauses
from adistill.inference.quotas import QuotaLimiter, Refusal, RefusalCounter, Ticket
from adistill.inference.serve_config import ServeConfig
from adistill.tenant_id import TENANT_ID_PATTERN, validate_tenant_id

log = logging.getLogger(__name__)


def access_denial(principal: Principal | None, need: str, tenant: str | None) -> tuple[int, str] | None:
    """(401 or 403, why) when `principal` (None: no valid key) may not call a route that needs `need` ("tenant", for
    `tenant`; "admin"; "any" valid key), else None."""
    if principal is None:
        return 401, "missing or unknown API key: send 'Authorization: Bearer <key>'"
    if need == "admin" and not principal.admin:
        return 403, "this route needs an admin key"
    if need == "tenant" and tenant is not None and not principal.may_call(tenant):
        return 403, f"this key may not call tenant {tenant!r}"
    return None


def json_response(payload: dict[str, Any], status: int = 200) -> Response:
    return Response(json.dumps(payload, separators=(",", ":")), status_code=status, media_type="application/json")


@serve.deployment(name="EncoderGroup")
@serve.ingress(api)
class EncoderGroup:
    """Every tenant behind one shared encoder: HTTP, keys, quotas and mixed-tenant batches in one replica."""

    def __init__(self, config: ServeConfig) -> None:
        from adistill.store.keys import KeyStore
        from adistill.store.registry import Registry

        self.config = config
        self.observer = metrics.serving  # Prometheus, through Ray's metrics export (docs/operations.md)
        self.encoder = EncoderService(config, self.observer)
        self.registry = Registry(config.registry, config.storage_options)
        env_key = os.environ.get(config.admin_key_env, "") if config.admin_key_env else ""
        store = KeyStore.for_registry(self.registry.uri, config.storage_options, config.keys) if config.auth else None
        self.auth = Authenticator(store, [env_key] if env_key else [], config.poll_interval_s)
        self.limiter = QuotaLimiter(config.quota, config.quota_overrides(), share=config.quota_share)
        self.refusals = RefusalCounter()
        self.refused_at_gate = 0  # refusals serve_gate answered before Serve's per-request bookkeeping
        self._refresh_lock: asyncio.Lock | None = None
        self._key_poll: asyncio.Task[None] | None = None
        if config.auth:
            self.auth.refresh()
            if self.auth.key_count == 0:
                log.warning("auth is on and no API key exists yet: adistill keys create --registry %s", config.registry)
        else:
            log.warning("auth is off: anyone who reaches this service may call every tenant")
        api.state.group = self
        serve_gate.install(self)  # refusals before Serve's per-request bookkeeping (in Serve's HAProxy mode)
        self.gc = GcPauses().start()  # /metrics: the collector's pauses (Serve freezes the start-up heap after this)

    # -- the front door (called by serve_http.FrontDoor before routing) ----------------------------------------

    async def check_access(self, authorization: str | None, need: str, tenant: str | None) -> Principal | Response:
        """The caller, or the 401/403 response (counted) when it may not go on."""
        if not self.config.auth:
            return ANYONE
        principal = await self.authenticate(authorization)
        denial = access_denial(principal, need, tenant)
        if denial is not None:
            return self.refuse(*denial, tenant)
        assert principal is not None  # access_denial refuses a missing principal
        return principal

    def over_quota(self, tenant: str) -> JSONResponse | None:
        """The front door's 429 (counted) for a tenant already at its limit, before the request's body is read."""
        refusal = self.limiter.precheck(tenant)
        return None if refusal is None else self.refuse(429, refusal.reason, tenant, refusal.retry_after_s)

    def refuses_now(self, method: str, need: tuple[str, str | None], authorization: str | None) -> bool:
        """Whether the front door will refuse this request (401, 403, or the 429 of a predict for a tenant at its
        quota) without waiting for anything: serve_gate then answers it before Serve's per-request bookkeeping.
        False while the keys are due a refresh (the front door reads them first) and for anything else."""
        kind, tenant = need
        if self.config.auth:
            if self.auth.stale():
                return False
            if access_denial(self.auth.authenticate(authorization), kind, tenant) is not None:
                return True
        if kind != "tenant" or tenant is None or method != "POST":
            return False
        return self.limiter.precheck(tenant) is not None

    async def authenticate(self, authorization: str | None) -> Principal | None:
        self._start_key_poll()
        if self.auth.stale():  # idle for a while (or the poll is late): read the keys before deciding
            assert self._refresh_lock is not None
            async with self._refresh_lock:
                if self.auth.stale():
                    await asyncio.to_thread(self.auth.refresh)
        return self.auth.authenticate(authorization)

    def _start_key_poll(self) -> None:
        if self._key_poll is None:
            self._refresh_lock = asyncio.Lock()
            self._key_poll = asyncio.get_running_loop().create_task(self._poll_keys())

    async def _poll_keys(self) -> None:
        while True:
            await asyncio.sleep(self.config.poll_interval_s / 2)
            try:
                await asyncio.to_thread(self.auth.refresh)
            except Exception:  # the poll must outlive any one bad round
                log.exception("key refresh failed")

    def refuse(self, status: int, message: str, tenant: str | None, retry_after_s: int | None = None) -> JSONResponse:
        self.refusals.count(counted_tenant(tenant), status)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
        if retry_after_s is not None:
            headers["Retry-After"] = str(retry_after_s)
        return error(status, message, headers)

    # -- prediction routes -------------------------------------------------------------------------------------

    def check_body(self, size: int) -> Response | None:
        """413 for a body over the limit sent without a Content-Length (chunked; the front door checks the rest)."""
        if size > self.config.max_body_bytes:
            return error(413, f"request body of {size} bytes is over the limit of {self.config.max_body_bytes} bytes")
        return None

    def check_texts(self, texts: list[str], top_k: int, what: str = "texts") -> Response | None:
        if len(texts) > self.config.max_texts:
            return error(413, f"{len(texts)} {what} is over the limit of {self.config.max_texts} per request")
        empty = [i for i, t in enumerate(texts) if not t.strip()]
        if empty:
            return error(422, f"{what}: empty text at position(s) {empty[:10]}")
        if not 1 <= top_k <= self.config.max_top_k:
            return error(422, f"top_k must be in [1, {self.config.max_top_k}], got {top_k}")
        return None

    @api.post(
        "/v1/tenants/{tenant_id}/predict",
        response_model=PredictResponse,
        responses=ERRORS,
        dependencies=SECURED,
        summary="Top-k labels for each text, from the tenant's adapter",
    )
    async def predict(self, tenant_id: str, body: PredictRequest, request: Request) -> Response:
        request.state.rows = len(body.texts)
        try:
            validate_tenant_id(tenant_id)
        except InvalidTenantId as exc:
            return error(400, str(exc))
        bad = self.check_body(len(await request.body())) or self.check_texts(body.texts, body.top_k)
        if bad is not None:
            return bad
        ticket = self.limiter.admit(tenant_id, len(body.texts))
        if isinstance(ticket, Refusal):
            return self.refuse(429, ticket.reason, tenant_id, ticket.retry_after_s)
        with ticket:
            result = await self.encoder.predict(tenant_id, body.texts, body.top_k)
        if isinstance(result, Refused):
            return error(result.status, result.error)
        return json_response(result)

    @api.post(
        "/v1/predict",
        response_model=BatchResponse,
        responses=ERRORS,
        dependencies=SECURED,
        summary="Rows of many tenants in one request (for gateways); each row answered or refused on its own",
    )
    async def predict_batch(self, body: BatchRequest, request: Request) -> Response:
        principal: Principal = getattr(request.state, "principal", ANYONE)
        request.state.rows = len(body.rows)
        bad = self.check_body(len(await request.body())) or self.check_texts(
            [r.text for r in body.rows], body.top_k, what="rows"
        )
        if bad is not None:
            return bad
        by_tenant: dict[str, list[int]] = {}
        for i, row in enumerate(body.rows):
            by_tenant.setdefault(row.tenant_id, []).append(i)
        forbidden = sorted(t for t in by_tenant if TENANT_ID_PATTERN.fullmatch(t) and not principal.may_call(t))
        if forbidden:
            return self.refuse(403, f"this key may not call tenant(s) {forbidden[:5]}", forbidden[0])
        results: list[dict[str, Any]] = [{} for _ in body.rows]

        async def answer(tenant_id: str, rows: list[int]) -> None:
            outcome = await self._tenant_rows(tenant_id, [body.rows[i].text for i in rows], body.top_k)
            for k, i in enumerate(rows):
                results[i] = outcome[k] if isinstance(outcome, list) else outcome

        await asyncio.gather(*(answer(t, rows) for t, rows in by_tenant.items()))
        return json_response({"results": results})

    async def _tenant_rows(self, tenant_id: str, texts: list[str], top_k: int) -> list[dict[str, Any]] | dict[str, Any]:
        """One tenant's rows of a batch request: their answers, or one refusal for all of them."""
        try:
            validate_tenant_id(tenant_id)
        except InvalidTenantId as exc:
            return {"tenant_id": counted_tenant(tenant_id), "status": 400, "error": str(exc)}
        ticket: Ticket | Refusal = self.limiter.admit(tenant_id, len(texts))
        if isinstance(ticket, Refusal):
            self.refusals.count(tenant_id, 429)
            self.observer.refusal(429)
            retry = ticket.retry_after_s
            return {"tenant_id": tenant_id, "status": 429, "error": ticket.reason, "retry_after_s": retry}
        with ticket:
            result = await self.encoder.predict(tenant_id, texts, top_k)
        if isinstance(result, Refused):
            return {"tenant_id": tenant_id, "status": result.status, "error": result.error}
        version = result["adapter_version"]
        return [{"tenant_id": tenant_id, "adapter_version": version, **p} for p in result["predictions"]]

    # -- registry and operations routes ------------------------------------------------------------------------

    @api.get("/v1/tenants", responses=ERRORS, dependencies=SECURED, summary="Published tenants (admin key)")
    async def tenants(self) -> dict[str, Any]:
        names = await asyncio.to_thread(self.registry.tenants)
        return {"tenants": names, "count": len(names)}

    @api.get(
        "/v1/tenants/{tenant_id}",
        responses=ERRORS,
        dependencies=SECURED,
        summary="A tenant's latest version and metadata",
    )
    async def tenant(self, tenant_id: str) -> Any:
        try:
            validate_tenant_id(tenant_id)
            meta, versions = await asyncio.to_thread(self._describe, tenant_id)
        except InvalidTenantId as exc:
            return error(400, str(exc))
        except TenantNotFound:
            return error(404, f"tenant {tenant_id!r} not found")
        except AdistillError as exc:
            return error(503, f"tenant {tenant_id!r}: {exc}")
        return {
            "tenant_id": tenant_id,
            "version": meta.get("version"),
            "versions": versions,
            "method": meta.get("method"),
            "labels": meta.get("labels"),
            "max_length": meta.get("max_length"),
            "oos_threshold": meta.get("oos_threshold"),
            "created_at": meta.get("created_at"),
            "backbone": meta.get("backbone", {}).get("name"),
            "parameters": meta.get("parameters"),
            "metrics": meta.get("metrics"),
        }

    def _describe(self, tenant_id: str) -> tuple[dict[str, Any], list[int]]:
        return self.registry.meta(tenant_id), self.registry.versions(tenant_id)

    @api.get("/healthz", summary="Liveness: this replica answers (no key needed)")
    async def healthz(self) -> Any:
        return {"status": "ok", "replica": self.replica_id(), "cached_tenants": self.encoder.cache.metrics()["entries"]}

    @api.get(
        "/metrics",
        dependencies=SECURED,
        summary="Counters of the replica that answers: cache, batching, bank, refused requests per tenant, rows in "
        "flight, keys (admin key)",
    )
    async def metrics(self) -> Any:
        return {
            "replica": self.replica_id(),
            **self.encoder.metrics(),
            "gc": self.gc.snapshot(),
            "http": {
                "auth": self.config.auth,
                **self.auth.metrics(),
                "refused": self.refusals.snapshot(),
                "refused_at_gate": self.refused_at_gate,
                "rows_in_flight": self.limiter.in_flight(),
            },
        }

    @staticmethod
    def replica_id() -> str:
        return str(serve.get_replica_context().replica_id.unique_id)


__all__ = ["EncoderGroup"]
