"""The replica's gate: a request the front door is sure to refuse is refused before Ray Serve's per-request work.

In Serve's HAProxy mode (`adistill serve --http-proxy haproxy`, the KubeRay default) every encoder replica runs its
own HTTP server, and Serve wraps each request in its bookkeeping (request metadata, a task that watches for the
client going away, an ongoing-request slot, its metrics and access log) before the application's `FrontDoor` sees
it. A client hammering past its tenant's quota, or with a wrong key, would pay all of that per refusal, on the core
that runs the encoder forward. `Gate` sits around the replica's HTTP server (Serve applies the middlewares named by
`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH` there; `serve.build` sets it for the replicas): when the replica's
`EncoderGroup` says the front door will refuse the request now (`EncoderGroup.refuses_now`: 401, 403, or 429 for a
predict of a tenant at its quota), the same `FrontDoor` answers it here, with the same status, body, headers,
metrics and log line, plus the `X-Request-Id` Serve would have added. Everything else goes on to Serve untouched.

Behind Serve's Python proxy the replicas receive requests through Ray, not their own HTTP server, so the gate is not
on the path (the front door still refuses, after Serve's bookkeeping). Paths are read as the app's: with a route
prefix other than `/` nothing matches and the gate lets everything through.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.middleware import Middleware

from adistill.distributed.serve_http import FrontDoor, app_path, required_access
from adistill.inference.request_log import new_request_id

if TYPE_CHECKING:
    from adistill.distributed.serve_group import EncoderGroup

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "adistill.distributed.serve_gate:middlewares"

_group: EncoderGroup | None = None  # the encoder replica of this process (one replica actor per process)


def install(group: EncoderGroup) -> None:
    """Called by the replica's constructor: the gate asks this group what it will refuse."""
    global _group
    _group = group


def middlewares() -> list[Middleware]:
    """Serve's HTTP middleware hook (`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`)."""
    return [Middleware(Gate)]


def _header(scope: Any, name: bytes) -> bytes | None:
    return next((v for k, v in scope["headers"] if k.lower() == name), None)


class Gate:
    """Pure ASGI middleware around Serve's per-replica HTTP app."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._door: FrontDoor | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        group = _group
        need = required_access(app_path(scope)) if group is not None and scope["type"] == "http" else None
        if group is None or need is None:
            await self.app(scope, receive, send)
            return
        authorization = _header(scope, b"authorization")
        header = authorization.decode("latin-1") if authorization is not None else None
        if not group.refuses_now(scope["method"], need, header):
            await self.app(scope, receive, send)
            return
        rid = _header(scope, b"x-request-id")
        if rid is None:  # as Serve's RequestIdMiddleware: a new id, in the request (the log line) and the response
            rid = new_request_id().encode("ascii")
            scope = {**scope, "headers": [*scope["headers"], (b"x-request-id", rid)]}

        async def send_with_id(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid)]}
            await send(message)

        group.refused_at_gate += 1
        if self._door is None or self._door.group is not group:
            self._door = FrontDoor(self.app, group)  # refuses: nothing between refuses_now and its checks awaits
        await self._door(scope, receive, send_with_id)
