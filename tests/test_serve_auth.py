"""Tenant isolation end to end: real HTTP against the Serve app with auth on (API keys in the registry's key store),
a tiny encoder and a tenant with a tight quota. (The admin key from the environment is tested through
`adistill serve` in tests/test_serve_cli.py, whose Ray processes inherit the variable as a Pod's do.)

Also the HTTP items of the first-hour issue that live in the ingress: a predict body without a JSON content type,
and Swagger UI served by the service itself (/docs works offline)."""

from __future__ import annotations

import asyncio
import json
import random
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from serving_helpers import serve_app, tenant_files

from adistill.backbone import Backbone
from adistill.store.keys import KeyStore, key_id_of
from adistill.store.registry import Registry

pytestmark = pytest.mark.slow  # every test runs against a Ray Serve app

POLL_S = 0.5
TEXT = {"texts": ["please pay my bill"]}


class Service:
    def __init__(self, registry: Registry, keys: KeyStore) -> None:
        self.url = ""  # set, with the client's base URL, once the app runs
        self.registry = registry
        self.keys = keys
        self.http = httpx.Client(timeout=30)
        self.issued: list[str] = []  # every key handed out, for the log scan
        self.key_a = self.new_key(tenant="a")
        self.key_b = self.new_key(tenant="b")
        self.admin = self.new_key(admin=True)
        self.admin2 = self.new_key(admin=True)

    def new_key(self, tenant: str | None = None, admin: bool = False) -> str:
        key = self.keys.create(tenant=tenant, admin=admin, name="test")[1]
        self.issued.append(key)
        return key

    def call(self, method: str, path: str, key: str | None = None, **kwargs: Any) -> httpx.Response:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        return self.http.request(method, path, headers=headers, **kwargs)

    def predict(self, tenant: str, key: str | None, body: Any = TEXT) -> httpx.Response:
        return self.call("POST", f"/v1/tenants/{tenant}/predict", key, json=body)


@pytest.fixture(scope="module")
def service(
    ray_local: Any, tiny: Backbone, tiny_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("auth-registry")
    registry = Registry(str(root))
    for i, t in enumerate(("a", "b", "limited", "slow")):
        registry.publish(t, tenant_files(tiny, t, seed=i))
    svc = Service(registry, KeyStore.for_registry(registry.uri))  # keys exist before the app starts
    settings = {
        "registry": str(root),
        "backbone": str(tiny_path),
        "poll_interval_s": POLL_S,
        "max_batch_size": 8,
        "ray_actor_options": {"num_cpus": 0.5},
        "tenant_quotas": {"limited": {"requests_per_s": 1, "burst": 2}, "slow": {"requests_per_s": 0.01, "burst": 1}},
    }
    with serve_app(settings, "adistill-auth-test") as url:
        svc.url, svc.http.base_url = url, httpx.URL(url)
        yield svc
        svc.http.close()


def is_error(r: httpx.Response, status: int) -> bool:
    return r.status_code == status and isinstance(r.json().get("error"), str) and "Traceback" not in r.text


def test_a_tenant_key_answers_for_its_tenant_only(service: Service) -> None:
    key = service.key_a
    r = service.predict("a", key)
    assert r.status_code == 200 and r.json()["tenant_id"] == "a", r.text
    assert service.call("GET", "/v1/tenants/a", key).json()["tenant_id"] == "a"
    forbidden = [
        service.predict("b", key),
        service.predict("no-such-tenant", key),  # 403, not 404: a tenant key learns nothing about other tenants
        service.predict("Bad_Id", key),
        service.call("GET", "/v1/tenants/b", key),
        service.call("GET", "/v1/tenants", key),
        service.call("GET", "/metrics", key),
    ]
    for r in forbidden:
        assert is_error(r, 403), (r.request.url, r.status_code, r.text)
    assert service.predict("b", service.key_b).status_code == 200


def test_admin_keys_reach_every_tenant_and_the_listing(service: Service) -> None:
    for admin in (service.admin, service.admin2):
        for tenant in ("a", "b"):
            assert service.predict(tenant, admin).status_code == 200
        listed = service.call("GET", "/v1/tenants", admin).json()
        assert {"a", "b", "limited"} <= set(listed["tenants"])
        assert service.call("GET", "/metrics", admin).status_code == 200
        assert is_error(service.predict("nope", admin), 404)


def test_no_key_and_wrong_keys_get_401(service: Service) -> None:
    a = service.key_a
    wrong_secret = a[:-6] + ("x" * 6 if not a.endswith("xxxxxx") else "y" * 6)
    headers: list[dict[str, str]] = [
        {},
        {"authorization": ""},
        {"authorization": "Bearer"},
        {"authorization": f"Basic {a}"},
        {"authorization": a},
        {"authorization": f"Bearer {wrong_secret}"},
        {"authorization": f"Bearer {service.admin[:-1]}"},
    ]
    for h in headers:
        for method, path, body in (("POST", "/v1/tenants/a/predict", TEXT), ("GET", "/v1/tenants", None)):
            r = service.http.request(method, path, headers=h, json=body)
            assert is_error(r, 401), (h, path, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
            assert a not in r.text
    # a bad body without a key is still a 401: nothing is parsed before the key is checked
    r = service.http.post("/v1/tenants/a/predict", content=b"{not json")
    assert is_error(r, 401)
    assert service.http.get("/healthz").json()["status"] == "ok"  # open, for liveness probes


def test_1000_random_keys_in_a_row_all_get_401_and_the_service_stays_healthy(service: Service) -> None:
    rng = random.Random(5)

    def random_key(i: int) -> str:
        if i % 2:
            return f"adk_{rng.randbytes(6).hex()}_{secrets.token_urlsafe(32)}"  # well formed, unknown
        return secrets.token_urlsafe(rng.randint(1, 64))

    async def main() -> list[int]:
        async with httpx.AsyncClient(base_url=service.url, timeout=60, limits=httpx.Limits(max_connections=16)) as c:
            sem = asyncio.Semaphore(16)

            async def one(i: int) -> int:
                async with sem:
                    headers = {"authorization": f"Bearer {random_key(i)}"}
                    r = await c.post(f"/v1/tenants/{'ab'[i % 2]}/predict", json=TEXT, headers=headers)
                    return r.status_code

            return await asyncio.gather(*(one(i) for i in range(1000)))

    statuses = asyncio.run(main())
    assert statuses == [401] * 1000
    assert service.http.get("/healthz").json()["status"] == "ok"
    assert service.predict("a", service.key_a).status_code == 200
    refused = service.call("GET", "/metrics", service.admin).json()["http"]["refused"]
    assert refused["total"]["401"] >= 1000
    assert refused["by_tenant"]["a"]["401"] >= 500 and refused["by_tenant"]["b"]["401"] >= 500


def wait_for(check: Any, timeout: float) -> float:
    """Poll `check` until it holds; the seconds it took."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout, f"not within {timeout} s"
        time.sleep(0.05)
    return time.monotonic() - start


def test_revoked_and_new_keys_take_effect_within_the_poll_interval(service: Service) -> None:
    key = service.new_key(tenant="b")
    took_new = wait_for(lambda: service.predict("b", key).status_code == 200, 30)
    service.keys.revoke(str(key_id_of(key)))
    took_revoked = wait_for(lambda: service.predict("b", key).status_code == 401, 30)
    # within the poll interval, plus the time requests take on a loaded 2-core machine
    assert took_new < 10 * POLL_S and took_revoked < 10 * POLL_S, (took_new, took_revoked)
    assert service.predict("b", service.key_b).status_code == 200  # other keys unaffected


def test_a_tenant_over_its_rate_gets_429_while_another_tenant_keeps_succeeding(service: Service) -> None:
    async def main() -> tuple[list[httpx.Response], list[httpx.Response]]:
        auth_admin = {"authorization": f"Bearer {service.admin}"}
        auth_a = {"authorization": f"Bearer {service.key_a}"}
        async with httpx.AsyncClient(base_url=service.url, timeout=60) as c:
            limited = [c.post("/v1/tenants/limited/predict", json=TEXT, headers=auth_admin) for _ in range(10)]
            other = [c.post("/v1/tenants/a/predict", json=TEXT, headers=auth_a) for _ in range(5)]
            got = await asyncio.gather(*limited, *other)
        return list(got[:10]), list(got[10:])

    limited, other = asyncio.run(main())
    assert [r.status_code for r in other] == [200] * 5
    refused = [r for r in limited if r.status_code == 429]
    assert len(refused) >= 5 and all(r.status_code in (200, 429) for r in limited), [r.status_code for r in limited]
    for r in refused:
        assert is_error(r, 429) and "requests/s" in r.json()["error"]
        assert re.fullmatch(r"[1-9]\d*", r.headers["retry-after"]), r.headers
    assert service.predict("a", service.key_a).status_code == 200
    time.sleep(int(refused[-1].headers["retry-after"]))
    assert service.predict("limited", service.admin).status_code == 200  # the bucket refilled
    metrics = service.call("GET", "/metrics", service.admin).json()
    assert metrics["http"]["refused"]["by_tenant"]["limited"]["429"] >= len(refused)
    assert "rows_in_flight" in metrics["http"] and metrics["queue"]["max_waiting_rows"] >= 1
    # Serve froze the replica's start-up heap (Ray, FastAPI, torch, the encoder); the replica times its collections
    assert metrics["gc"]["frozen_objects"] > 10_000, metrics["gc"]
    assert set(metrics["gc"]["generations"]) == {"0", "1", "2"}


def test_a_tenant_at_its_limit_is_refused_before_its_body_is_read(service: Service) -> None:
    assert service.call("POST", "/v1/tenants/slow/predict", service.admin, content=b"{not json").status_code == 422
    assert service.predict("slow", service.admin).status_code == 200  # its one token (a 422 took none)
    for body in (b"{not json", b'{"texts": []}', json.dumps(TEXT).encode()):  # refused before parsing: 429 for all
        r = service.call("POST", "/v1/tenants/slow/predict", service.admin, content=body)
        assert is_error(r, 429) and "requests/s" in r.json()["error"] and int(r.headers["retry-after"]) >= 90, r.text
    assert service.predict("a", service.key_a).status_code == 200
    metrics = service.call("GET", "/metrics", service.admin).json()
    assert metrics["http"]["refused"]["by_tenant"]["slow"]["429"] == 3


def test_the_batch_endpoint_checks_every_rows_tenant_against_the_key(service: Service) -> None:
    def batch(key: str | None, *tenants: str) -> httpx.Response:
        return service.call(
            "POST", "/v1/predict", key, json={"rows": [{"tenant_id": t, "text": "hi"} for t in tenants]}
        )

    r = batch(service.key_a, "a", "a")
    assert r.status_code == 200 and [x["tenant_id"] for x in r.json()["results"]] == ["a", "a"], r.text
    assert is_error(batch(service.key_a, "a", "b"), 403)  # one foreign row refuses the request: nothing answered
    assert is_error(batch(None, "a"), 401)
    assert is_error(batch("adk_" + "x" * 43, "a"), 401)
    r = batch(service.admin, "a", "b", "limited", "limited", "limited", "limited")
    assert r.status_code == 200, r.text
    statuses = [x.get("status", 200) for x in r.json()["results"]]
    assert statuses[:2] == [200, 200] and set(statuses[2:]) <= {200, 429}  # a tenant over its rate: its rows only


def test_predict_accepts_json_without_a_json_content_type(service: Service) -> None:
    body = json.dumps({"texts": ["what's my balance"], "top_k": 2}).encode()
    auth = {"authorization": f"Bearer {service.key_a}"}
    for headers in ({}, {"content-type": "application/x-www-form-urlencoded"}, {"content-type": "text/plain"}):
        r = service.http.post("/v1/tenants/a/predict", content=body, headers={**auth, **headers})
        assert r.status_code == 200 and len(r.json()["predictions"][0]["labels"]) == 2, (headers, r.text)
    r = service.http.post("/v1/tenants/a/predict", content=b"texts=hello", headers=auth)
    assert is_error(r, 422)


def test_docs_are_served_by_the_service_itself(service: Service) -> None:
    page = service.http.get("/docs")
    assert page.status_code == 200 and "swagger" in page.text.lower()
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert assets and not [a for a in assets if a.startswith(("http:", "https:", "//"))], assets
    for asset in assets:
        r = service.http.get(asset)
        assert r.status_code == 200 and len(r.content) > 500, asset
    assert service.http.get("/openapi.json").json()["components"]["securitySchemes"]
    assert is_error(service.http.get("/docs/assets/../../etc/passwd"), 404)


def test_keys_never_appear_in_the_service_logs(service: Service) -> None:
    import ray

    service.predict("a", service.key_a)
    service.predict("b", service.key_a)  # a 403: the refusal is logged, never the key
    time.sleep(1.0)  # let log files flush
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    files = [p for p in logs.rglob("*") if p.is_file()]
    assert files
    secrets_ = service.issued + [k.split("_", 2)[2] for k in service.issued if key_id_of(k)]  # keys, their secrets
    leaked = [p.name for p in files for s in secrets_ if s in p.read_text(errors="replace")]
    assert leaked == []
