"""Serve configuration without starting anything: ServeConfig validation, the config files, the CLI flags."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from adistill.cli import build_parser
from adistill.distributed.serve import ServeConfig, build_app
from adistill.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["adistill.yaml", "adistill-gpu.yaml"])
def test_config_files_parse_and_build(name: str) -> None:
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((ROOT / "serve_apps" / name).read_text())
    schema = ServeDeploySchema.model_validate(raw)
    [app] = schema.applications
    assert app.import_path == "adistill.distributed.serve:build_app"
    config = ServeConfig.from_dict(app.args)
    assert config.max_ongoing_requests is None or config.max_ongoing_requests >= config.max_batch_size
    build_app(dict(app.args))  # binds the deployments; nothing starts


def test_config_defaults_and_errors() -> None:
    config = ServeConfig.from_dict({"registry": "./registry"})
    assert config.ongoing_requests >= config.max_batch_size and config.device == "auto"
    bad = [
        {},
        {"registry": "./r", "cache_size": 3},
        {"registry": "./r", "max_batch_size": 0},
        {"registry": "./r", "max_top_k": True},
        {"registry": "./r", "poll_interval_s": 0},
        {"registry": "./r", "device": "tpu"},
        {"registry": "./r", "max_batch_size": 64, "max_ongoing_requests": 8},
        {"registry": " "},
    ]
    for args in bad:
        with pytest.raises(ConfigError):
            ServeConfig.from_dict(args)


def test_serve_command_flags() -> None:
    args = build_parser().parse_args(
        ["serve", "--registry", "s3://b/p", "--replicas", "2", "--storage-option", "key=k", "--address", "auto"]
    )
    assert (args.registry, args.host, args.port, args.replicas, args.address) == (
        "s3://b/p",
        "127.0.0.1",
        8000,
        2,
        "auto",
    )
    assert (args.auth, args.keys) == ("on", None)  # auth is on unless switched off
    args = build_parser().parse_args(["serve", "--registry", "r", "--auth", "off", "--keys", "s3://k/keys"])
    assert (args.auth, args.keys) == ("off", "s3://k/keys")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--registry", "r", "--auth", "maybe"])


def test_serve_start_up_line_says_whether_auth_is_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The line `adistill serve` prints once the app is up (Ray replaced by a stand-in that is ready at once)."""
    from adistill.cli import main

    seen: list[ServeConfig] = []

    def fake_run(config: ServeConfig, host: str, port: int, address: object, ready: object) -> None:
        seen.append(config)
        ready(f"http://{host}:{port}")  # type: ignore[operator]
        raise KeyboardInterrupt

    monkeypatch.setattr("adistill.distributed.serve.run_until_interrupted", fake_run)
    (tmp_path / "tenants").mkdir()
    assert main(["serve", "--registry", str(tmp_path), "--port", "8123"]) == 0
    err = capsys.readouterr().err
    assert "http://127.0.0.1:8123" in err and "auth on" in err and "WARNING" not in err and "stopped" in err
    assert main(["serve", "--registry", str(tmp_path), "--auth", "off"]) == 0
    line = capsys.readouterr().err.splitlines()[0]
    assert "WARNING: auth off" in line and "http://127.0.0.1:8000" in line
    assert [c.auth for c in seen] == [True, False]


def test_auth_and_quota_settings() -> None:
    config = ServeConfig.from_dict({"registry": "./r"})
    assert config.auth is True and config.keys is None and config.admin_key_env == "ADISTILL_ADMIN_KEY"
    assert (config.quota.requests_per_s, config.quota.rows_in_flight) == (100.0, 64)
    config = ServeConfig.from_dict(
        {
            "registry": "./r",
            "quota": {"requests_per_s": 20, "rows_in_flight": None},
            "tenant_quotas": {"big": {"rows_in_flight": 512}, "slow": {"requests_per_s": 0.5, "burst": 1}},
        }
    )
    assert config.quota_for("other") == config.quota and config.quota.rows_in_flight is None
    assert (config.quota_for("big").requests_per_s, config.quota_for("big").rows_in_flight) == (20, 512)
    assert (config.quota_for("slow").requests_per_s, config.quota_for("slow").bucket) == (0.5, 1.0)
    assert ServeConfig.from_dict({"registry": "./r", "quota": None, "tenant_quotas": None}).quota.burst is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"auth": "on"}, "auth must be true or false"),
        ({"quota": {"requests_per_s": 0}}, r"quota.requests_per_s must be > 0 or null"),
        ({"quota": {"rows": 3}}, r"unknown key\(s\) \['rows'\] in quota"),
        ({"tenant_quotas": {"_keys": {}}}, "'_keys' is not a valid tenant id"),
        ({"tenant_quotas": {"a": {"rows": 3}}}, r"tenant_quotas.a: unknown key\(s\) \['rows'\]"),
        ({"tenant_quotas": {"a": {"burst": 0}}}, "tenant_quotas.a.burst must be >= 1, got 0"),
        ({"admin_key_env": "not a name"}, "admin_key_env must be an environment variable name"),
        ({"keys": " "}, "keys must be a URI or null"),
    ],
)
def test_bad_auth_and_quota_settings(args: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ServeConfig.from_dict({"registry": "./r", **args})


def test_front_door_routes() -> None:
    from adistill.distributed.serve_http import required_access

    assert required_access("/v1/tenants/bank/predict") == ("tenant", "bank")
    assert required_access("/v1/tenants/bank") == ("tenant", "bank")
    assert required_access("/v1/tenants") == required_access("/v1/tenants/") == ("admin", None)
    assert required_access("/metrics") == ("admin", None)
    assert required_access("/v1/anything/else") == ("admin", None)
    for open_path in ("/healthz", "/docs", "/docs/assets/swagger-ui.css", "/openapi.json", "/"):
        assert required_access(open_path) is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"max_batch_size": True}, r"^serve config: max_batch_size must be an integer, got True$"),
        ({"max_texts": 2.0}, r"^serve config: max_texts must be an integer, got 2.0$"),
        ({"batch_wait_timeout_s": False}, r"^serve config: batch_wait_timeout_s must be a number, got False$"),
        ({"bank_bytes": True}, "bank_bytes must be an integer or null, got True"),
        ({"replicas": 0}, "replicas must be >= 1, got 0"),
        ({"max_batch_size": 64, "max_ongoing_requests": 8}, r"max_ongoing_requests must be >= max_batch_size \(64\)"),
        ({"device": "cudax"}, r"device must be auto, cpu or cuda\[:N\], got 'cudax'"),
        ({"contention_budget": 0.5}, r"contention_budget must be >= 1 \(x a one-row forward\) or null, got 0.5"),
        ({"storage_options": ["key=k"]}, "storage_options must be a mapping"),
        ({"autoscaling_config": "on"}, "autoscaling_config must be a mapping or null"),
        (
            {"cache_size": 3},
            r"unknown key\(s\) \['cache_size'\] in serve config; expected some of "
            r"\['admin_key_env', 'auth', 'autoscaling_config'",
        ),
    ],
)
def test_serve_config_uses_the_shared_rules(args: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ServeConfig.from_dict({"registry": "./r", **args})


def test_serve_config_required_registry_and_defaults_for_null_options() -> None:
    with pytest.raises(ConfigError, match=r"missing required key\(s\) \['registry'\] in serve config"):
        ServeConfig.from_dict({"max_batch_size": 8})
    with pytest.raises(ConfigError, match="registry is required"):
        ServeConfig(registry="  ")
    nulls = {"storage_options": None, "ray_actor_options": None}
    assert ServeConfig.from_dict({"registry": "./r", **nulls}) == ServeConfig(registry="./r")  # YAML `key:` = default
    with pytest.raises(ConfigError, match="max_batch_size must be an integer, got None"):
        ServeConfig.from_dict({"registry": "./r", "max_batch_size": None})  # only those three read None as default
    config = ServeConfig.from_dict({"registry": "./r", "device": "cuda:1", "batch_wait_timeout_s": 0})
    assert (config.device, config.batch_wait_timeout_s) == ("cuda:1", 0)
    assert ServeConfig.from_dict(config.to_dict()) == config
