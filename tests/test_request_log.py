"""Structured request logs (adistill.inference.request_log): ids, endpoints, levels, and nothing secret in a line."""

from __future__ import annotations

import json
import logging
import re

import pytest

from adistill.inference.request_log import (
    ENDPOINTS,
    KEY_SHAPE,
    RequestRecord,
    endpoint_of,
    is_safe_request_id,
    log_request,
    new_request_id,
    request_id,
)
from adistill.store.keys import new_key

KEY = "adk_0123456789ab_" + "x" * 43  # the shape of an adistill API key (adistill.store.keys)


def lines(caplog: pytest.LogCaptureFixture) -> list[tuple[int, dict[str, object]]]:
    return [(r.levelno, json.loads(r.getMessage())) for r in caplog.records if r.name == "adistill.requests"]


def test_new_ids_are_random_hex() -> None:
    ids = {new_request_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(re.fullmatch(r"[0-9a-f]{16}", i) for i in ids)


@pytest.mark.parametrize("header", ["abc", "req-42", "0f9e8d7c-1b2a-4c3d-9e8f-0a1b2c3d4e5f", "trace:01.a_b", "x" * 64])
def test_a_safe_client_id_is_kept(header: str) -> None:
    assert request_id(header) == header


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "x" * 65,  # too long
        "-starts-with-dash",
        "has space",
        "new\nline",  # log injection
        '"quoted"',
        "ünïcode",
        KEY,  # never echo or log a key, even one sent as a request id
        KEY.upper(),
    ],
)
def test_anything_else_gets_a_new_id(header: str | None) -> None:
    got = request_id(header)
    assert got != header and re.fullmatch(r"[0-9a-f]{16}", got)
    assert header is None or not is_safe_request_id(header)


@pytest.mark.parametrize(
    ("path", "endpoint"),
    [
        ("/v1/tenants/banking/predict", "predict"),
        ("/v1/tenants/banking/predict/", "predict"),
        ("/v1/predict", "batch"),
        ("/v1/tenants/banking", "tenant"),
        ("/v1/tenants", "tenants"),
        ("/v1/tenants/", "tenants"),
        ("/healthz", "healthz"),
        ("/metrics", "metrics"),
        ("/docs", "docs"),
        ("/docs/assets/swagger-ui.css", "docs"),
        ("/openapi.json", "docs"),
        ("/", "other"),
        ("/v1/tenants/banking/explain", "other"),
        ("/v1/tenants/a/predict/more", "other"),
        ("/healthz/deep", "other"),
        ("/wp-admin/" + KEY, "other"),
    ],
)
def test_endpoint_of_maps_every_path_to_a_fixed_set(path: str, endpoint: str) -> None:
    assert endpoint_of(path) == endpoint
    assert endpoint in ENDPOINTS


def test_one_json_line_per_request_debug_and_warning_for_server_errors(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="adistill.requests")
    log_request(RequestRecord("r1", "banking", "predict", 200, 12.40712, 2))
    log_request(RequestRecord("r2", "banking", "predict", 429, 0.5, 64))
    log_request(RequestRecord("r3", None, "healthz", 503, 10001.0))
    log_request(RequestRecord("r4", "travel", "predict", 500, 3.0, 1))
    got = lines(caplog)
    assert [level for level, _ in got] == [logging.DEBUG, logging.DEBUG, logging.WARNING, logging.WARNING]
    assert got[0][1] == {
        "event": "request",
        "request_id": "r1",
        "tenant_id": "banking",
        "endpoint": "predict",
        "status": 200,
        "latency_ms": 12.407,
        "rows": 2,
    }
    assert got[2][1]["tenant_id"] == "-" and got[2][1]["rows"] == 0


def test_only_server_errors_are_logged_at_info_level(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="adistill.requests")
    for status in (200, 400, 401, 403, 404, 413, 422, 429):
        log_request(RequestRecord(new_request_id(), "banking", "predict", status, 1.0, 1))
    assert lines(caplog) == []
    log_request(RequestRecord("r5", "banking", "predict", 503, 1.0, 1))
    [(level, line)] = lines(caplog)
    assert level == logging.WARNING and line["status"] == 503


def test_the_key_shape_is_the_key_stores() -> None:
    for _ in range(20):
        _, key = new_key()
        assert KEY_SHAPE.match(key) and not is_safe_request_id(key)


def test_no_key_or_raw_text_reaches_a_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="adistill.requests")
    log_request(RequestRecord(KEY, KEY, "predict", 401, 1.0, 0))  # a key pasted as the id and as the tenant
    log_request(RequestRecord("ok", "Bad Tenant\nforged line", "whatever-endpoint", 404, 1.0, 1))
    text = caplog.text
    assert KEY not in text and "forged" not in text and "\nforged" not in text
    [(_, first), (_, second)] = lines(caplog)
    assert (first["request_id"], first["tenant_id"]) == ("_invalid", "_invalid")
    assert (second["tenant_id"], second["endpoint"]) == ("_invalid", "other")
    assert set(first) == {"event", "request_id", "tenant_id", "endpoint", "status", "latency_ms", "rows"}
