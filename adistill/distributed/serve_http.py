"""The HTTP surface of the Serve application: the FastAPI app, its schemas, JSON errors, the front door, offline docs.

The routes themselves live on the deployment that serves them (adistill.distributed.serve_group.EncoderGroup: the
encoder replicas are the ingress, no second hop). Every request first passes the front door (`FrontDoor`, before
routing and before the body is read):
1. auth (when `ServeConfig.auth`): `/v1/...` and `/metrics` need `Authorization: Bearer <key>`; 401 without a key or
   with an unknown or revoked one, 403 when a tenant's key calls another tenant or an admin route (the listing,
   `/metrics`); `POST /v1/predict` takes any valid key and checks each row's tenant; `/healthz`, `/docs` and
   `/openapi.json` are open;
2. a predict body without a JSON content type (curl's `-d` default, or none) is read as JSON;
3. 429 for a tenant's predict while the tenant is at its quota (`QuotaLimiter.precheck`: no token left, or its rows in
   flight at the limit), so refusing a flooding client costs no body read, parsing or routing;
4. 413 for a Content-Length over `max_body_bytes`.
Every error is JSON `{"error": ...}`; keys are never logged or echoed. Every response carries Serve's `X-Request-Id`
(the client's own, else a new UUID), is counted in the Prometheus metrics (requests by endpoint
and status, latency) and logged as one JSON line (adistill.inference.request_log: DEBUG, WARNING for a 5xx).

No `from __future__ import annotations` here: FastAPI reads the route signatures at runtime.
"""

import logging
import re
import time
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from adistill.inference.request_log import RequestRecord, endpoint_of, log_request, request_id
from adistill.tenant_id import TENANT_ID_PATTERN

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


class BatchRow(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tenant_id: StrictStr = Field(examples=["acme-bank"])
    text: StrictStr = Field(examples=["how do i pay my bill"])


class BatchRequest(BaseModel):
    """Rows of any tenants, answered in one pass; each row is answered or refused on its own."""

    model_config = ConfigDict(extra="forbid")
    rows: list[BatchRow] = Field(min_length=1)
    top_k: StrictInt = Field(default=3, examples=[3])


class BatchResult(BaseModel):
    """A row's answer (`adapter_version`, `labels`, `out_of_scope`) or its refusal (`status`, `error`)."""

    tenant_id: str
    adapter_version: int | None = None
    labels: list[Label] | None = None
    out_of_scope: bool | None = None
    status: int | None = None
    error: str | None = None
    retry_after_s: int | None = None


class BatchResponse(BaseModel):
    results: list[BatchResult]


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
    """What a path needs: ("tenant", id), ("admin", None), ("any", None) (a valid key: the batch endpoint checks each
    row's tenant), or None (open: /healthz, /docs, /openapi.json)."""
    if path.rstrip("/") in ("/v1/tenants", "/metrics"):
        return "admin", None
    if path.rstrip("/") == "/v1/predict":
        return "any", None
    if path == "/v1" or path.startswith("/v1/"):
        match = _TENANT_ROUTE.match(path)
        return ("tenant", match.group(1)) if match else ("admin", None)
    return None


def counted_tenant(tenant: str | None) -> str | None:
    """The name a refusal is counted under: a valid tenant id, else "_invalid" (never the raw text)."""
    if tenant is None:
        return None
    return tenant if TENANT_ID_PATTERN.fullmatch(tenant) else "_invalid"


def app_path(scope: Any) -> str:
    """The request's path inside the app: Serve's route prefix (the ASGI root_path) taken off."""
    root = scope.get("root_path", "") or ""
    path = str(scope["path"])
    if root and path.startswith(root):
        path = path[len(root) :] or "/"
    return path


class FrontDoor:
    """Pure ASGI middleware (cheaper per request than `@app.middleware("http")`, which matters under a flood): auth,
    the JSON content type of predict bodies, and 413 before reading a body that is too large."""

    def __init__(self, app: Any, group: Any = None) -> None:
        self.app = app
        self.group = group  # the EncoderGroup; None: the one serving the app (`scope["app"].state.group`)

    def _group(self, scope: Any) -> Any:
        return self.group if self.group is not None else getattr(scope["app"].state, "group", None)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        # Ray Serve gives every request an id (the client's `X-Request-Id`, else a UUID), passes it in the request's
        # headers and returns it in the response's: the log line uses the same id (when safe to log)
        header = next((v for k, v in scope["headers"] if k.lower() == b"x-request-id"), None)
        rid = request_id(header.decode("latin-1") if header is not None else None)
        state = scope.setdefault("state", {})
        status = 500

        async def send_with_status(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.route(scope, receive, send_with_status)
        finally:
            group = self._group(scope)
            path = app_path(scope)
            endpoint = endpoint_of(path)
            seconds = time.perf_counter() - start
            if group is not None:
                group.observer.request(endpoint, status, seconds)
            tenant = path.split("/")[3] if endpoint in ("predict", "tenant") else None
            log_request(RequestRecord(rid, tenant, endpoint, status, 1000 * seconds, state.get("rows", 0)))

    async def route(self, scope: Any, receive: Any, send: Any) -> None:
        group = self._group(scope)
        path = app_path(scope)
        headers = {k.lower(): v for k, v in scope["headers"]}
        need = required_access(path)
        if group is not None and need is not None:
            authorization = headers.get(b"authorization")
            header = authorization.decode("latin-1") if authorization is not None else None
            principal = await group.check_access(header, *need)
            if isinstance(principal, Response):
                await principal(scope, receive, send)
                return
            scope["state"]["principal"] = principal  # request.state.principal in the routes
            if need[0] == "tenant" and need[1] is not None and scope["method"] == "POST":
                over = group.over_quota(need[1])  # 429 before the body is read: a flood's refusals stay cheap
                if over is not None:
                    await over(scope, receive, send)
                    return
        if scope["method"] == "POST" and path.endswith("/predict"):
            content_type = headers.get(b"content-type", b"").decode("latin-1")
            if not _JSON_TYPE.match(content_type) and not content_type.lower().startswith("multipart/"):
                # no header, or curl's `-d` default (application/x-www-form-urlencoded): the body is read as JSON
                kept = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
                scope = {**scope, "headers": [*kept, (b"content-type", b"application/json")]}
        limit = group.config.max_body_bytes if group is not None else None
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


__all__ = ["ERRORS", "FrontDoor", "PredictRequest", "api", "error", "required_access"]
