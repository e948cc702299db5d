"""The replica's gate (adistill.distributed.serve_gate) around the real replica class, over ASGI: a request the front
door will refuse (unknown key, another tenant's key, a tenant at its quota) is answered at the gate, as the front
door answers it, and never reaches what stands behind (Serve's per-request path, recorded here); everything else
passes untouched. The same gate in the real stack (HAProxy, the replicas' own HTTP servers) is checked in
tests/test_serve_cli.py through `/metrics` `http.refused_at_gate`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from serving_helpers import tenant_files

from adistill.backbone import Backbone
from adistill.distributed import serve_gate
from adistill.distributed.serve import with_gate
from adistill.distributed.serve_group import EncoderGroup
from adistill.inference.serve_config import ServeConfig
from adistill.store.keys import KeyStore
from adistill.store.registry import Registry


class Behind:
    """What stands behind the gate in a replica (Serve's bookkeeping, then the app): records what reaches it."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.paths.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"passed"})


@pytest.fixture
def replica(tiny: Backbone, tiny_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    registry = Registry(str(tmp_path / "registry"))
    for i, tenant in enumerate(("a", "b")):
        registry.publish(tenant, tenant_files(tiny, tenant, seed=i))
    store = KeyStore.for_registry(registry.uri, {}, None)
    keys = {"a": store.create(tenant="a")[1], "admin": store.create(admin=True)[1]}
    config = ServeConfig.from_dict(
        {
            "registry": registry.uri,
            "backbone": str(tiny_path),
            "device": "cpu",
            "tenant_quotas": {"a": {"requests_per_s": 0.5, "burst": 1}},
        }
    )
    replica_class = EncoderGroup.func_or_class.__bases__[0]  # the class under Serve's ingress wrapper
    # the constructor installs the group in the gate and in its FastAPI app's state (Serve's copy of the app, which
    # it ships with the deployment: a replica object left there could not be shipped): both restored afterwards
    monkeypatch.setattr(serve_gate, "_group", None)
    monkeypatch.setattr(replica_class.__init__.__globals__["api"].state, "group", None, raising=False)
    group = replica_class(config)  # outside Serve: the constructor a replica runs
    group.keys = keys
    try:
        yield group
    finally:
        group.gc.stop()


def call(app: Any, method: str, path: str, key: str | None, **kwargs: Any) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key is not None else {}
    headers.update(kwargs.pop("headers", {}))

    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://replica") as client:
            return await client.request(method, path, headers=headers, **kwargs)

    return asyncio.run(go())


def test_what_the_front_door_will_refuse_is_refused_at_the_gate(replica: Any) -> None:
    behind = Behind()
    gate = serve_gate.middlewares()[0].cls(behind)  # as Serve builds it from the hook
    keys, predict = replica.keys, {"texts": ["pay my bill"]}

    r = call(gate, "POST", "/v1/tenants/a/predict", "not-a-key", json=predict)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer" and "API key" in r.json()["error"]
    assert r.headers["x-request-id"] and "not-a-key" not in r.text
    r = call(gate, "POST", "/v1/tenants/b/predict", keys["a"], json=predict, headers={"x-request-id": "gw-7"})
    assert r.status_code == 403 and "'b'" in r.json()["error"] and r.headers["x-request-id"] == "gw-7"
    assert call(gate, "GET", "/v1/tenants", keys["a"]).status_code == 403  # the listing: admin keys only
    assert call(gate, "GET", "/metrics", None).status_code == 401
    assert behind.paths == [] and replica.refused_at_gate == 4

    # allowed: they pass to Serve's path untouched (the routes answer there)
    for method, path, key in (
        ("POST", "/v1/tenants/a/predict", keys["a"]),
        ("POST", "/v1/tenants/b/predict", keys["admin"]),
        ("GET", "/v1/tenants", keys["admin"]),
        ("GET", "/healthz", None),
        ("GET", "/docs", None),
    ):
        assert call(gate, method, path, key, **({"json": predict} if method == "POST" else {})).text == "passed"
    assert len(behind.paths) == 5

    # tenant a at its quota (0.5 requests/s, burst 1): its predicts stop at the gate with Retry-After, others pass
    ticket = replica.limiter.admit("a", 1)
    ticket.release()
    r = call(gate, "POST", "/v1/tenants/a/predict", keys["a"], json=predict)
    assert r.status_code == 429 and r.headers["retry-after"] == "2" and "requests/s" in r.json()["error"]
    assert call(gate, "GET", "/v1/tenants/a", keys["a"]).text == "passed"  # not a predict: no quota
    assert call(gate, "POST", "/v1/tenants/b/predict", keys["admin"], json=predict).text == "passed"
    assert len(behind.paths) == 7 and replica.refused_at_gate == 5
    refused = replica.refusals.snapshot()["by_tenant"]
    assert refused["a"]["429"] == 1 and refused["b"]["403"] == 1, refused


def test_while_the_keys_are_due_a_refresh_everything_passes(replica: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The front door reads the keys before it decides (a key created a moment ago may be valid): the gate, which
    must not wait, leaves such requests to it."""
    behind = Behind()
    gate = serve_gate.Gate(behind)
    monkeypatch.setattr(replica.auth, "stale", lambda: True)
    assert call(gate, "POST", "/v1/tenants/a/predict", "not-a-key", json={"texts": ["x"]}).text == "passed"
    assert behind.paths == ["/v1/tenants/a/predict"] and replica.refused_at_gate == 0


def test_no_replica_in_the_process_means_no_gate(monkeypatch: pytest.MonkeyPatch) -> None:
    """Serve's proxy processes apply the same hook when it is set for them: with no replica there, all passes."""
    monkeypatch.setattr(serve_gate, "_group", None)
    behind = Behind()
    assert call(serve_gate.Gate(behind), "POST", "/v1/tenants/a/predict", None, json={}).text == "passed"


def test_the_replicas_get_the_hook_and_keep_their_own_environment() -> None:
    hook = {serve_gate.CALLBACK_ENV: serve_gate.CALLBACK}
    assert with_gate({"num_cpus": 1}) == {"num_cpus": 1, "runtime_env": {"env_vars": hook}}
    mine = {"num_cpus": 2, "runtime_env": {"pip": ["x"], "env_vars": {"A": "1", serve_gate.CALLBACK_ENV: ""}}}
    out = with_gate(mine)
    assert out["runtime_env"] == {"pip": ["x"], "env_vars": {"A": "1", serve_gate.CALLBACK_ENV: ""}}  # theirs wins
    assert mine["runtime_env"]["env_vars"] == {"A": "1", serve_gate.CALLBACK_ENV: ""}  # not modified
    assert json.dumps(out)  # plain data, as Serve ships it
