"""The HTTP ingress of the Serve application: FastAPI routes, API keys, quotas, JSON errors, offline docs.

Every request passes the front door (`FrontDoor`, before routing and before the body is read):
1. auth (when `ServeConfig.auth`): `/v1/...` and `/metrics` need `Authorization: Bearer <key>`; 401 without a key or
   with an unknown or revoked one, 403 when a tenant's key calls another tenant or an admin route (the listing,
   `/metrics`); `/healthz`, `/docs` and `/openapi.json` are open;
2. a predict body without a JSON content type (curl's `-d` default, or none) is read as JSON;
3. 413 for a Content-Length over `max_body_bytes`.
The predict route then validates the body (422), applies the tenant's quota (429 with `Retry-After`) and sends the
texts to the encoder group. Every error is JSON `{"error": ...}`; refusals are counted per tenant (`/metrics`) and
summarised in the log. Keys are never logged or echoed.

No `from __future__ import annotations` here: FastAPI and Serve read the route signatures at runtime.
"""

import asyncio
import logging
import os
import re
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from adistill.errors import AdistillError, InvalidTenantId, TenantNotFound
from adistill.inference.auth import ANYONE, Authenticator, Principal
from adistill.inference.quotas import QuotaLimiter, Refusal, RefusalCounter
from adistill.inference.serve_config import ServeConfig
from adistill.tenant_id import TENANT_ID_PATTERN, validate_tenant_id

log = logging.getLogger(__name__)


class PredictRequest(BaseModel):
    """`texts`: non-empty strings (over-long ones are truncated to the tenant's max length in tokens)."""

    model_config = ConfigDict(extra="forbid")
    texts: list[StrictStr] = Field(min_length=1, examples=[["how do i pay my bill", "what is my balance"]])
    top_k: StrictInt = Field(default=3, examples=[3])


class Label(BaseModel):
    label: str
    score: float


class PredictionOut(BaseModel):
    labels: list[Label]
    out_of_scope: bool


class PredictResponse(BaseModel):
    tenant_id: str
    adapter_version: int
    predictions: list[PredictionOut]


class ErrorResponse(BaseModel):
    error: str


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "malformed tenant id",
        401: "no API key, or an unknown or revoked one",
        403: "the key may not call this tenant (or this admin route)",
        404: "unknown tenant",
        413: "too many texts or body too large",
        422: "bad body: empty list, non-string or empty text, top_k out of range",
        429: "over the tenant's requests/s or rows in flight: retry after `Retry-After` seconds",
        503: "the tenant's artifact cannot be loaded",
    }.items()
}

api = FastAPI(
    title="adistill",
    description="Multi-tenant FAQ / intent retrieval on one shared frozen encoder (per-tenant adapters). "
    "Send `Authorization: Bearer <key>` (`adistill keys create`); see docs/serving.md.",
    version="1",
    docs_url=None,  # served below from the packaged Swagger UI assets: /docs works offline
    redoc_url=None,
)
# Declares the scheme in OpenAPI (Swagger UI's "Authorize" button); the front door does the checking.
bearer = HTTPBearer(auto_error=False, description="an adistill API key: `adistill keys create`")
SECURED = [Depends(bearer)]


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    parts = []
    for e in exc.errors():
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return error(422, "; ".join(parts) or "invalid request body")


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error(exc.status_code, str(exc.detail))


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error(500, "internal error")


_TENANT_ROUTE = re.compile(r"^/v1/tenants/([^/]+)(?:/predict)?/?$")
_JSON_TYPE = re.compile(r"^application/([\w.+-]+\+)?json\b", re.I)


def required_access(path: str) -> tuple[str, str | None] | None:
    """What a path needs: ("tenant", id), ("admin", None), or None (open: /healthz, /docs, /openapi.json)."""
    if path.rstrip("/") in ("/v1/tenants", "/metrics"):
        return "admin", None
    if path == "/v1" or path.startswith("/v1/"):
        match = _TENANT_ROUTE.match(path)
        return ("tenant", match.group(1)) if match else ("admin", None)
    return None


def counted_tenant(tenant: str | None) -> str | None:
    """The name a refusal is counted under: a valid tenant id, else "_invalid" (never the raw text)."""
    if tenant is None:
        return None
    return tenant if TENANT_ID_PATTERN.fullmatch(tenant) else "_invalid"


class FrontDoor:
    """Pure ASGI middleware (cheaper per request than `@app.middleware("http")`, which matters under a flood): auth,
    the JSON content type of predict bodies, and 413 before reading a body that is too large."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ingress: Ingress | None = getattr(scope["app"].state, "ingress", None)  # the running app (Serve's copy)
        root = scope.get("root_path", "") or ""
        path = scope["path"]
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        headers = {k.lower(): v for k, v in scope["headers"]}
        need = required_access(path)
        if ingress is not None and need is not None:
            authorization = headers.get(b"authorization")
            header = authorization.decode("latin-1") if authorization is not None else None
            refused = await ingress.check_access(header, *need)
            if refused is not None:
                await refused(scope, receive, send)
                return
        if scope["method"] == "POST" and path.endswith("/predict"):
            content_type = headers.get(b"content-type", b"").decode("latin-1")
            if not _JSON_TYPE.match(content_type) and not content_type.lower().startswith("multipart/"):
                # no header, or curl's `-d` default (application/x-www-form-urlencoded): the body is read as JSON
                kept = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
                scope = {**scope, "headers": [*kept, (b"content-type", b"application/json")]}
        limit = ingress.config.max_body_bytes if ingress is not None else None
        length = headers.get(b"content-length", b"").decode("latin-1")
        if limit is not None and length.isdigit() and int(length) > limit:
            await error(413, f"request body of {length} bytes is over the limit of {limit} bytes")(scope, receive, send)
            return
        await self.app(scope, receive, send)


api.add_middleware(FrontDoor)


# -- Swagger UI from the packaged assets (swagger-ui-bundle-v2), so /docs renders without reaching a CDN ------------

DOC_ASSETS = {"swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png"}


def swagger_assets() -> Path | None:
    try:
        import swagger_ui_bundle
    except ImportError:  # pragma: no cover - a dependency of adistill
        return None
    return Path(str(swagger_ui_bundle.swagger_ui_path))


@api.get("/docs", include_in_schema=False)
async def _docs(request: Request) -> HTMLResponse:
    root = (request.scope.get("root_path", "") or "").rstrip("/")
    assets = f"{root}/docs/assets"
    if swagger_assets() is None:
        return get_swagger_ui_html(openapi_url=f"{root}/openapi.json", title="adistill API")
    return get_swagger_ui_html(
        openapi_url=f"{root}/openapi.json",
        title="adistill API",
        swagger_js_url=f"{assets}/swagger-ui-bundle.js",
        swagger_css_url=f"{assets}/swagger-ui.css",
        swagger_favicon_url=f"{assets}/favicon-32x32.png",
    )


@api.get("/docs/assets/{name}", include_in_schema=False)
async def _docs_asset(name: str) -> Response:
    folder = swagger_assets()
    if folder is None or name not in DOC_ASSETS:
        return error(404, f"no docs asset {name!r}")
    return FileResponse(folder / name, headers={"Cache-Control": "public, max-age=86400"})


# -- the deployment ---------------------------------------------------------------------------------------------


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    """HTTP in front of the encoder group. Keys and quotas are checked here; predictions go to the group."""

    def __init__(self, encoder: DeploymentHandle, config: ServeConfig) -> None:
        from adistill.store.keys import KeyStore
        from adistill.store.registry import Registry

        self.encoder = encoder
        self.config = config
        self.registry = Registry(config.registry, config.storage_options)
        env_key = os.environ.get(config.admin_key_env, "") if config.admin_key_env else ""
        store = KeyStore.for_registry(self.registry.uri, config.storage_options, config.keys) if config.auth else None
        self.auth = Authenticator(store, [env_key] if env_key else [], config.poll_interval_s)
        self.limiter = QuotaLimiter(config.quota, config.quota_overrides(), share=config.ingress_replicas)
        self.refusals = RefusalCounter()
        self._refresh_lock: asyncio.Lock | None = None
        self._key_poll: asyncio.Task[None] | None = None
        if config.auth:
            self.auth.refresh()
            if self.auth.key_count == 0:
                log.warning("auth is on and no API key exists yet: adistill keys create --registry %s", config.registry)
        else:
            log.warning("auth is off: anyone who reaches this service may call every tenant")
        api.state.ingress = self

    # -- the front door ----------------------------------------------------------------------------------------

    async def check_access(self, authorization: str | None, need: str, tenant: str | None) -> JSONResponse | None:
        """None when the caller may go on, else the 401/403 response (counted)."""
        if not self.config.auth:
            return None
        principal = await self.authenticate(authorization)
        if principal is None:
            return self.refuse(401, "missing or unknown API key: send 'Authorization: Bearer <key>'", tenant)
        if need == "admin" and not principal.admin:
            return self.refuse(403, "this route needs an admin key", tenant)
        if need == "tenant" and tenant is not None and not principal.may_call(tenant):
            return self.refuse(403, f"this key may not call tenant {tenant!r}", tenant)
        return None

    async def authenticate(self, authorization: str | None) -> Principal | None:
        if not self.config.auth:
            return ANYONE
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

    # -- routes ------------------------------------------------------------------------------------------------

    @api.post(
        "/v1/tenants/{tenant_id}/predict",
        response_model=PredictResponse,
        responses=ERRORS,
        dependencies=SECURED,
        summary="Top-k labels for each text, from the tenant's adapter",
    )
    async def predict(self, tenant_id: str, body: PredictRequest, request: Request) -> Any:
        try:
            validate_tenant_id(tenant_id)
        except InvalidTenantId as exc:
            return error(400, str(exc))
        size = len(await request.body())
        if size > self.config.max_body_bytes:
            return error(413, f"request body of {size} bytes is over the limit of {self.config.max_body_bytes} bytes")
        if len(body.texts) > self.config.max_texts:
            return error(413, f"{len(body.texts)} texts is over the limit of {self.config.max_texts} per request")
        empty = [i for i, t in enumerate(body.texts) if not t.strip()]
        if empty:
            return error(422, f"texts: empty text at position(s) {empty[:10]}")
        if not 1 <= body.top_k <= self.config.max_top_k:
            return error(422, f"top_k must be in [1, {self.config.max_top_k}], got {body.top_k}")
        ticket = self.limiter.admit(tenant_id, len(body.texts))
        if isinstance(ticket, Refusal):
            return self.refuse(429, ticket.reason, tenant_id, ticket.retry_after_s)
        with ticket:
            result: dict[str, Any] = await self.encoder.predict.remote(tenant_id, body.texts, body.top_k)
        status = result.pop("status")
        if status != 200:
            return error(status, result["error"])
        return result

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

    @api.get("/healthz", summary="Liveness: the ingress answers and an encoder replica answers (no key needed)")
    async def healthz(self) -> Any:
        try:
            metrics = await asyncio.wait_for(self.encoder.metrics.remote(), timeout=10)
        except Exception as exc:  # reported as unhealthy, not raised
            return error(503, f"encoder group unavailable: {type(exc).__name__}")
        cache = metrics["cache"]
        return {"status": "ok", "replica": metrics["replica"], "cached_tenants": cache["entries"]}

    @api.get(
        "/metrics",
        dependencies=SECURED,
        summary="Counters of the encoder replica that answers (cache, batching, bank) and of this ingress replica "
        "(refused requests per tenant, rows in flight, keys) (admin key)",
    )
    async def metrics(self) -> Any:
        result: dict[str, Any] = await self.encoder.metrics.remote()
        context = serve.get_replica_context()
        result["ingress"] = {
            "replica": context.replica_id.unique_id,
            "auth": self.config.auth,
            **self.auth.metrics(),
            "refused": self.refusals.snapshot(),
            "rows_in_flight": self.limiter.in_flight(),
        }
        return result


__all__ = ["ERRORS", "Ingress", "PredictRequest", "api", "required_access"]
