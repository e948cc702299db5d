"""Ray Serve end to end: real HTTP against the app on the shared local Ray, a tiny encoder, a local registry.

The app starts once for the module, with a cache bounded to 3 tenants' bytes and a small adapter bank, so every
test below also runs under eviction pressure.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from serving_helpers import serve_app, tenant_files

from adistill.backbone import Backbone, load_backbone
from adistill.inference.engine import Engine
from adistill.inference.tenant_cache import module_bytes
from adistill.store.registry import Registry, version_dir

TENANTS = [f"t{i:02d}" for i in range(20)]
WORDS = [
    *("please", "pay", "my", "bill", "what", "is", "the", "weather", "play", "a", "song", "book"),
    *("flight", "to", "paris", "hotel", "room", "now"),
]
TEXTS = [" ".join(random.Random(i).choices(WORDS, k=random.Random(i).randint(1, 12))) for i in range(12)]
POLL_S = 0.5
LIMITS = {"max_texts": 8, "max_body_bytes": 4096, "max_top_k": 5}

pytestmark = pytest.mark.slow  # every test runs against a Ray Serve app


def offline(registry: Registry, backbone: Backbone, tenant_id: str, texts: list[str]) -> list[dict[str, Any]]:
    """What `adistill predict` answers for the tenant's latest artifact: the engine on the same files."""
    model = registry.get(tenant_id, backbone).model
    return [p.to_dict() for p in Engine(backbone).predict(texts, [model] * len(texts), top_k=3)]


def same(got: dict[str, Any], expected: dict[str, Any]) -> bool:
    return got["labels"][0]["label"] == expected["labels"][0]["label"] and all(
        g["label"] == e["label"] and abs(g["score"] - e["score"]) <= 1e-4
        for g, e in zip(got["labels"], expected["labels"])
    )


class Service:
    def __init__(self, url: str, registry: Registry, root: Path, backbone: Backbone) -> None:
        self.url = url
        self.registry = registry
        self.root = root
        self.backbone = backbone
        self.expected = {t: offline(registry, backbone, t, TEXTS) for t in TENANTS}
        self.http = httpx.Client(base_url=url, timeout=30)

    def predict(self, tenant_id: str, body: Any) -> httpx.Response:
        return self.http.post(f"/v1/tenants/{tenant_id}/predict", json=body)


@pytest.fixture(scope="module")
def service(
    ray_local: Any, tiny: Backbone, tiny_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("serve-registry")
    registry = Registry(str(root))
    for i, t in enumerate(TENANTS):
        registry.publish(t, tenant_files(tiny, t, seed=i, num_labels=3 + i % 3))
    registry.publish("repub", tenant_files(tiny, "repub", seed=50))
    registry.publish("badbb", tenant_files(tiny, "badbb", seed=51))
    one_tenant = module_bytes(registry.get("t02", tiny).model)  # the biggest head (5 labels)

    settings = {
        "registry": str(root),
        "backbone": str(tiny_path),
        "cache_bytes": 3 * one_tenant,
        "bank_slots": 8,
        "poll_interval_s": POLL_S,
        "max_batch_size": 16,
        "batch_wait_timeout_s": 0.01,
        "ray_actor_options": {"num_cpus": 0.5},
        "auth": False,  # these tests are about answers; keys and quotas: tests/test_serve_auth.py
        "quota": {"requests_per_s": None, "rows_in_flight": None},
        **LIMITS,
    }
    with serve_app(settings, "adistill-test") as url:
        svc = Service(url, registry, root, tiny)
        yield svc
        svc.http.close()


def test_predictions_over_http_equal_the_offline_engine(service: Service) -> None:
    for t in ("t00", "t05", "t11", "t17"):
        r = service.predict(t, {"texts": TEXTS[:6], "top_k": 3})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["tenant_id"] == t and body["adapter_version"] == 1
        assert len(body["predictions"]) == 6
        for got, expected in zip(body["predictions"], service.expected[t]):
            assert same(got, expected), (t, got, expected)
            assert got["out_of_scope"] is False


def test_predictions_over_http_equal_the_predict_command(
    service: Service, tiny_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from adistill.cli import main
    from adistill.store.artifact import save_artifact

    for t in ("t02", "t13"):
        folder = save_artifact(service.registry.get_files(t), tmp_path / t)
        assert main(["predict", "--artifact", str(folder), "--backbone", str(tiny_path), *TEXTS[:4]]) == 0
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        served = service.predict(t, {"texts": TEXTS[:4]}).json()["predictions"]
        assert len(lines) == len(served) == 4
        for got, expected in zip(served, lines):
            assert same(got, expected), (t, got, expected)


def test_concurrent_requests_over_20_tenants_never_mix(service: Service) -> None:
    rng = random.Random(7)
    plan = [(rng.choice(TENANTS), rng.sample(range(len(TEXTS)), rng.randint(1, 3))) for _ in range(240)]

    async def main() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=service.url, timeout=60, limits=limits) as client:
            return await asyncio.gather(
                *(client.post(f"/v1/tenants/{t}/predict", json={"texts": [TEXTS[i] for i in idx]}) for t, idx in plan)
            )

    responses = asyncio.run(main())
    errors = [r.text for r in responses if r.status_code != 200]
    assert not errors, errors[:3]
    mixups = 0
    for (t, idx), r in zip(plan, responses):
        body = r.json()
        assert body["tenant_id"] == t
        for i, got in zip(idx, body["predictions"], strict=True):
            mixups += not same(got, service.expected[t][i])
    assert mixups == 0
    metrics = service.http.get("/metrics").json()
    assert metrics["batches"] > 0 and metrics["mean_batch_tenants"] > 1  # batches did mix tenants
    contention = metrics["contention"]  # the replica timed its forwards at start-up (ServeConfig.contention_budget)
    assert contention["one_row_forward_ms"] > 0 and contention["full_batch_forward_ms"] > 0
    assert 1 <= contention["tenant_batch_rows"] <= 16 and {"capped_batches", "interjected_batches"} <= set(contention)


BAD_CASES: list[tuple[str, Any, int]] = [
    ("nope", {"texts": ["pay my bill"]}, 404),
    ("Bad_Tenant", {"texts": ["pay my bill"]}, 400),
    ("-leading-dash", {"texts": ["pay my bill"]}, 400),
    ("t00", {"texts": []}, 422),
    ("t00", {"texts": ["ok", 3]}, 422),
    ("t00", {"texts": [""]}, 422),
    ("t00", {"texts": ["   "]}, 422),
    ("t00", {"texts": "pay my bill"}, 422),
    ("t00", {"text": ["pay my bill"]}, 422),
    ("t00", {"texts": ["pay my bill"], "top_k": 0}, 422),
    ("t00", {"texts": ["pay my bill"], "top_k": 6}, 422),
    ("t00", {"texts": ["pay my bill"], "top_k": "3"}, 422),
    ("t00", {"texts": ["pay my bill"] * 9}, 413),
    ("t00", {"texts": ["x" * 5000]}, 413),
]


def test_bad_input_gets_its_status_and_a_json_error(service: Service) -> None:
    for tenant_id, body, status in BAD_CASES:
        r = service.predict(tenant_id, body)
        assert r.status_code == status, (tenant_id, body, r.status_code, r.text)
        assert isinstance(r.json()["error"], str) and r.json()["error"], r.text
        assert "Traceback" not in r.text
    raw = [
        (
            service.http.post(
                "/v1/tenants/t00/predict", content=b"{not json", headers={"content-type": "application/json"}
            ),
            422,
        ),
        (service.http.get("/v1/tenants/nope"), 404),
        (service.http.get("/v1/tenants/NOPE!"), 400),
        (service.http.get("/v1/no-such-route"), 404),
    ]
    for r, status in raw:
        assert r.status_code == status and isinstance(r.json()["error"], str), r.text
    assert service.http.get("/healthz").json()["status"] == "ok"
    assert service.predict("t00", {"texts": ["pay my bill"]}).status_code == 200


def test_over_long_text_is_truncated_not_rejected(service: Service) -> None:
    text = " ".join(["please pay my bill now"] * 150)  # ~600 tokens, far over max_length 32, under 4096 bytes
    r = service.predict("t03", {"texts": [text], "top_k": 5})
    assert r.status_code == 200, r.text
    [expected] = offline(service.registry, service.backbone, "t03", [text])
    assert same(r.json()["predictions"][0], expected)


def test_tenant_listing_metadata_and_docs(service: Service) -> None:
    listed = service.http.get("/v1/tenants").json()["tenants"]
    assert set(TENANTS) <= set(listed)
    meta = service.http.get("/v1/tenants/t04").json()
    assert meta["tenant_id"] == "t04" and meta["version"] == 1 and meta["versions"] == [1]
    assert meta["labels"] == ["t4_l0", "t4_l1", "t4_l2", "t4_l3"] and meta["method"] == "adapter"
    assert service.http.get("/docs").status_code == 200
    paths = service.http.get("/openapi.json").json()["paths"]
    assert {"/v1/tenants/{tenant_id}/predict", "/v1/tenants", "/v1/tenants/{tenant_id}", "/healthz"} <= set(paths)


def wait_for(check: Any, timeout: float) -> None:
    """Poll `check` until it holds; `timeout` only guards against a hang (no test asserts a wall time)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout} s"
        time.sleep(0.05)


def test_hot_add_and_republish_without_restart(service: Service, tiny: Backbone) -> None:
    assert service.predict("hot", {"texts": ["pay my bill"]}).status_code == 404
    service.registry.publish("hot", tenant_files(tiny, "hot", seed=60))
    wait_for(lambda: service.predict("hot", {"texts": ["pay my bill"]}).status_code == 200, 30)
    [expected] = offline(service.registry, tiny, "hot", [TEXTS[0]])
    assert same(service.predict("hot", {"texts": [TEXTS[0]]}).json()["predictions"][0], expected)

    assert service.predict("repub", {"texts": [TEXTS[1]]}).json()["adapter_version"] == 1
    service.registry.publish("repub", tenant_files(tiny, "repub", seed=70, num_labels=4))
    wait_for(lambda: service.predict("repub", {"texts": [TEXTS[1]]}).json()["adapter_version"] == 2, 30)
    [expected] = offline(service.registry, tiny, "repub", [TEXTS[1]])
    assert same(service.predict("repub", {"texts": [TEXTS[1]]}).json()["predictions"][0], expected)


def test_a_bad_new_version_is_refused_and_the_old_one_keeps_answering(
    service: Service, tiny: Backbone, other_tiny_path: Path
) -> None:
    # a new version for another backbone, published while the tenant is served: refused on the next polls
    assert service.predict("badbb", {"texts": [TEXTS[2]]}).json()["adapter_version"] == 1
    other = load_backbone(str(other_tiny_path))
    assert service.registry.publish("badbb", tenant_files(other, "badbb", seed=52)) == 2
    time.sleep(3 * POLL_S)
    r = service.predict("badbb", {"texts": [TEXTS[2]]})
    assert r.status_code == 200 and r.json()["adapter_version"] == 1

    # corrupt bytes on disk in a new version (published before the tenant is first requested)
    service.registry.publish("fresh", tenant_files(tiny, "fresh", seed=53))
    assert service.registry.publish("fresh", tenant_files(tiny, "fresh", seed=54)) == 2
    weights = service.root / "tenants" / "fresh" / version_dir(2) / "adapter.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    for _ in range(3):
        r = service.predict("fresh", {"texts": [TEXTS[3]]})
        assert r.status_code == 200 and r.json()["adapter_version"] == 1, r.text
        time.sleep(POLL_S)
    expected_v1 = service.registry.get("fresh", tiny, version=1).model
    [p] = Engine(tiny).predict([TEXTS[3]], [expected_v1], top_k=3)
    assert same(r.json()["predictions"][0], p.to_dict())
    assert service.http.get("/metrics").json()["cache"]["refused_versions"] >= 2


def test_cache_of_3_tenants_cycling_10_stays_correct(service: Service) -> None:
    before = service.http.get("/metrics").json()["cache"]
    for _ in range(3):
        for t in TENANTS[:10]:
            r = service.predict(t, {"texts": [TEXTS[4], TEXTS[5]]})
            assert r.status_code == 200, r.text
            for got, i in zip(r.json()["predictions"], (4, 5)):
                assert same(got, service.expected[t][i])
    after = service.http.get("/metrics").json()["cache"]
    assert after["evictions"] - before["evictions"] >= 20
    assert after["entries"] <= 3 and after["bytes"] <= after["max_bytes"]


def test_batch_endpoint_answers_rows_of_many_tenants_in_one_request(service: Service) -> None:
    """`POST /v1/predict` (gateways): each row as the single-tenant endpoint answers it, in request order; an unknown
    or malformed tenant fails its own rows only; the single-tenant limits apply to the whole request."""
    rng = random.Random(3)
    picks = [(rng.choice(TENANTS), rng.randrange(len(TEXTS))) for _ in range(6)]
    rows = [{"tenant_id": t, "text": TEXTS[i]} for t, i in picks]
    rows.insert(3, {"tenant_id": "ghost", "text": "hello"})
    rows.insert(5, {"tenant_id": "../x", "text": "hello"})
    r = service.http.post("/v1/predict", json={"rows": rows, "top_k": 3})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == len(rows) == 8
    answered = [res for res in results if "labels" in res]
    assert len(answered) == 6
    for res, (t, i) in zip(answered, picks):
        assert res["tenant_id"] == t and res["adapter_version"] >= 1
        assert same(res, service.expected[t][i]), (t, res)
    assert results[3] == {"tenant_id": "ghost", "status": 404, "error": "tenant 'ghost' not found"}
    assert results[5]["status"] == 400 and results[5]["tenant_id"] == "_invalid"  # named in the message only
    too_many = [{"tenant_id": "t00", "text": "pay"}] * (LIMITS["max_texts"] + 1)
    bad = [
        ({"rows": too_many}, 413),
        ({"rows": []}, 422),
        ({"rows": [{"tenant_id": "t00", "text": " "}]}, 422),
        ({"rows": [{"tenant_id": "t00", "text": 3}]}, 422),
        ({"rows": [{"tenant_id": "t00"}]}, 422),
        ({"rows": [{"tenant_id": "t00", "text": "pay"}], "top_k": 99}, 422),
    ]
    for body, status in bad:
        r = service.http.post("/v1/predict", json=body)
        assert r.status_code == status, (body, r.text)
        assert isinstance(r.json()["error"], str)


def test_every_response_carries_one_request_id(service: Service) -> None:
    r = service.predict("t00", {"texts": ["pay my bill"]})
    assert r.status_code == 200 and re.fullmatch(r"[\w.:-]{1,64}", r.headers["x-request-id"]), r.headers
    r = service.http.post("/v1/tenants/t00/predict", json={"texts": ["x"]}, headers={"x-request-id": "gw-42.a"})
    assert r.headers["x-request-id"] == "gw-42.a"  # a gateway's own id comes back (and is the logged one)
    assert service.http.get("/v1/tenants/nope").headers["x-request-id"]
