"""Ray Serve: every tenant behind one shared backbone replica group, with mixed-tenant batches.

Two deployments:
- `Ingress` (FastAPI): the HTTP API of docs/serving.md. Validates the tenant id and the body, enforces the limits,
  answers errors as JSON `{"error": ...}`, and sends each request's texts to the encoder group in one call.
- `EncoderGroup` (the replica group): the frozen encoder, a `TenantCache` (host memory, bytes-bounded, hot versions)
  and an `Engine` (device-side adapter bank). Each text becomes one row `(tenant_id, text, top_k)` queued for
  `@serve.batch`, so rows of *different* tenants share one encoder forward. `@serve.multiplexed` is not used: it
  splits every batch by model id (docs/serving.md, "Replica affinity").

Build the application with `build_app(args)` (`serve run adistill.distributed.serve:build_app registry=./registry` or a
file under serve_apps/); `args` becomes a frozen `ServeConfig` once, here at the edge.

No `from __future__ import annotations` here: FastAPI and Serve read the route signatures at runtime.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from adistill.distributed.common import ensure_ray
from adistill.errors import (
    AdistillError,
    BackboneMismatch,
    CorruptArtifact,
    InvalidTenantId,
    TenantNotFound,
)
from adistill.inference.serve_config import ServeConfig
from adistill.inference.tenant_cache import LoadedTenant
from adistill.tenant_id import validate_tenant_id

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------
# The replica group: encoder + tenant cache + engine, mixed-tenant batches
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One text to answer: the tenant id travels with it, so one batch holds rows of many tenants."""

    tenant_id: str
    text: str
    top_k: int
    tenant: LoadedTenant


@serve.deployment(name="EncoderGroup")
class EncoderGroup:
    """The frozen encoder and every tenant's adapter. Each replica loads tenants on first use."""

    def __init__(self, config: ServeConfig) -> None:
        import torch

        from adistill.backbone import load_backbone
        from adistill.inference.engine import Engine
        from adistill.inference.tenant_cache import TenantCache
        from adistill.store.registry import Registry

        device = config.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.config = config
        self.backbone = load_backbone(config.backbone, device, config.storage_options)
        self.cache = TenantCache(
            Registry(config.registry, config.storage_options),
            self.backbone,
            config.cache_bytes,
            config.poll_interval_s,
            config.load_workers,
        )
        self.engine = Engine(self.backbone, config.bank_slots, config.bank_bytes)
        self.forward_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encoder-forward")
        batcher: Any = self.predict_rows  # serve.batch's wrapper: its setters are not in the type
        batcher.set_max_batch_size(config.max_batch_size)
        batcher.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        self.stats = {"batches": 0, "rows": 0, "tenant_rows": 0, "forward_seconds": 0.0}
        self.started = time.time()
        log.info("encoder group replica ready: backbone %s on %s", self.backbone.name, device)

    async def predict(self, tenant_id: str, texts: list[str], top_k: int) -> dict[str, Any]:
        """Answer one request. Errors come back as `{"status", "error"}` (an HTTP status), never raised."""
        try:
            tenant = await self.cache.get(tenant_id)
        except TenantNotFound:
            return {"status": 404, "error": f"tenant {tenant_id!r} not found"}
        except (CorruptArtifact, BackboneMismatch) as exc:
            return {"status": 503, "error": f"tenant {tenant_id!r} cannot be served: {exc}"}
        except (AdistillError, OSError) as exc:  # registry unreachable or refusing access: worth a retry
            log.warning("tenant %r: load failed: %s", tenant_id, exc)
            return {"status": 503, "error": f"tenant {tenant_id!r} cannot be loaded now: {exc}"}
        rows = [Row(tenant_id, text, top_k, tenant) for text in texts]
        predictions = await asyncio.gather(*(self.predict_rows(row) for row in rows))
        return {
            "status": 200,
            "tenant_id": tenant_id,
            "adapter_version": tenant.version,
            "predictions": predictions,
        }

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def predict_rows(self, rows: list[Row]) -> list[dict[str, Any]]:
        """One encoder forward for rows of any number of tenants (the engine gathers each row's adapter)."""
        top_k = max(r.top_k for r in rows)
        start = time.perf_counter()
        predictions = await asyncio.get_running_loop().run_in_executor(
            self.forward_pool, self.engine.predict, [r.text for r in rows], [r.tenant.model for r in rows], top_k
        )
        self.stats["forward_seconds"] += time.perf_counter() - start
        self.stats["batches"] += 1
        self.stats["rows"] += len(rows)
        self.stats["tenant_rows"] += len({r.tenant_id for r in rows})
        out = []
        for row, p in zip(rows, predictions):
            answer = p.to_dict()
            answer["labels"] = answer["labels"][: row.top_k]
            out.append(answer)
        return out

    def metrics(self) -> dict[str, Any]:
        """This replica's cache counters, batching figures and adapter bank occupancy."""
        batches = self.stats["batches"]
        context = serve.get_replica_context()
        return {
            "replica": context.replica_id.unique_id,
            "uptime_s": round(time.time() - self.started, 1),
            "backbone": self.backbone.name,
            "device": str(self.backbone.device),
            "cache": self.cache.metrics(),
            "batches": batches,
            "rows": self.stats["rows"],
            "mean_batch_rows": self.stats["rows"] / batches if batches else None,
            "mean_batch_tenants": self.stats["tenant_rows"] / batches if batches else None,
            "forward_seconds_total": round(self.stats["forward_seconds"], 4),
            "bank": {
                str(cfg): {"capacity": b.bank.capacity, "used": len(b.slots), "loads": b.loads}
                for cfg, b in list(self.engine.banks.items())  # the forward thread may add a bank
            },
        }


# --------------------------------------------------------------------------------------------------------------
# The HTTP ingress
# --------------------------------------------------------------------------------------------------------------


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
        404: "unknown tenant",
        413: "too many texts or body too large",
        422: "bad body: empty list, non-string or empty text, top_k out of range",
        503: "the tenant's artifact cannot be loaded",
    }.items()
}

api = FastAPI(
    title="adistill",
    description="Multi-tenant FAQ / intent retrieval on one shared frozen encoder (per-tenant adapters).",
    version="1",
)


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


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


@api.middleware("http")
async def _limit_body(request: Request, call_next: Any) -> Any:
    """413 before reading a body whose Content-Length is over the limit (the route checks the bytes read too)."""
    limit = getattr(request.app.state, "max_body_bytes", None)
    length = request.headers.get("content-length")
    if limit is not None and length is not None and length.isdigit() and int(length) > limit:
        return error(413, f"request body of {length} bytes is over the limit of {limit} bytes")
    return await call_next(request)


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    """HTTP in front of the encoder group. Registry listings are read here; predictions go to the group."""

    def __init__(self, encoder: DeploymentHandle, config: ServeConfig) -> None:
        from adistill.store.registry import Registry

        self.encoder = encoder
        self.config = config
        self.registry = Registry(config.registry, config.storage_options)
        api.state.max_body_bytes = config.max_body_bytes

    @api.post(
        "/v1/tenants/{tenant_id}/predict",
        response_model=PredictResponse,
        responses=ERRORS,
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
        result: dict[str, Any] = await self.encoder.predict.remote(tenant_id, body.texts, body.top_k)
        status = result.pop("status")
        if status != 200:
            return error(status, result["error"])
        return result

    @api.get("/v1/tenants", summary="Published tenants")
    async def tenants(self) -> dict[str, Any]:
        names = await asyncio.to_thread(self.registry.tenants)
        return {"tenants": names, "count": len(names)}

    @api.get("/v1/tenants/{tenant_id}", responses=ERRORS, summary="A tenant's latest version and metadata")
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

    @api.get("/healthz", summary="Liveness: the ingress answers and an encoder replica answers")
    async def healthz(self) -> Any:
        try:
            metrics = await asyncio.wait_for(self.encoder.metrics.remote(), timeout=10)
        except Exception as exc:  # reported as unhealthy, not raised
            return error(503, f"encoder group unavailable: {type(exc).__name__}")
        cache = metrics["cache"]
        return {"status": "ok", "replica": metrics["replica"], "cached_tenants": cache["entries"]}

    @api.get("/metrics", summary="Counters of the encoder replica that answers (cache, batching, bank)")
    async def metrics(self) -> Any:
        result: dict[str, Any] = await self.encoder.metrics.remote()
        return result


# --------------------------------------------------------------------------------------------------------------
# The application
# --------------------------------------------------------------------------------------------------------------


def build(config: ServeConfig) -> serve.Application:
    """The two deployments bound together, sized from `config`."""
    scaling: dict[str, Any] = (
        {"autoscaling_config": config.autoscaling_config}
        if config.autoscaling_config
        else {"num_replicas": config.replicas}
    )
    encoder = EncoderGroup.options(  # type: ignore[attr-defined]
        **scaling,
        max_ongoing_requests=config.ongoing_requests,
        ray_actor_options=config.ray_actor_options,
    ).bind(config)
    return Ingress.options(  # type: ignore[attr-defined]
        num_replicas=config.ingress_replicas,
        max_ongoing_requests=max(256, config.ongoing_requests),
        ray_actor_options=config.ingress_ray_actor_options,
    ).bind(encoder, config)


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder for `serve run adistill.distributed.serve:build_app KEY=VALUE...` and serve_apps/*.yaml."""
    return build(ServeConfig.from_dict(args))


def run_until_interrupted(
    config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, address: str | None = None
) -> None:
    """`adistill serve`: start (or join, with `address`) Ray, deploy the app, block until Ctrl-C or SIGTERM (raised
    as KeyboardInterrupt), then delete the app and stop what this call started."""
    import os
    import signal
    import threading

    import ray

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if address is None and not ray.is_initialized():
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local instance (STACK-NOTES)
    started_ray = ensure_ray(address)
    previous = None
    if threading.current_thread() is threading.main_thread():
        # after ray.init, which installs its own SIGTERM handler (log + abort): a stop cleans up like Ctrl-C
        previous = signal.signal(signal.SIGTERM, stop)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build(config), name=APP_NAME, route_prefix="/")
        log.info("adistill serving %s on http://%s:%d", config.registry, host, port)
        while True:
            time.sleep(1.0)
    finally:
        try:
            serve.delete(APP_NAME)
            if started_ray:
                serve.shutdown()
        finally:
            if started_ray:
                ray.shutdown()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


APP_NAME = "adistill"


@contextlib.contextmanager
def serving(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000) -> Iterator[str]:
    """Serve `config` on the Ray this process is connected to while the block runs (yields the base URL), then shut
    Serve down: what the demo and tests use."""
    serve.start(http_options={"host": host, "port": port})
    try:
        serve.run(build(config), name=APP_NAME, route_prefix="/")
        yield f"http://{host}:{port}"
    finally:
        serve.shutdown()
