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
        ({"storage_options": ["key=k"]}, "storage_options must be a mapping"),
        ({"autoscaling_config": "on"}, "autoscaling_config must be a mapping or null"),
        (
            {"cache_size": 3},
            r"unknown key\(s\) \['cache_size'\] in serve config; expected some of \['autoscaling_config'",
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
    nulls = {"storage_options": None, "ray_actor_options": None, "ingress_ray_actor_options": None}
    assert ServeConfig.from_dict({"registry": "./r", **nulls}) == ServeConfig(registry="./r")  # YAML `key:` = default
    with pytest.raises(ConfigError, match="max_batch_size must be an integer, got None"):
        ServeConfig.from_dict({"registry": "./r", "max_batch_size": None})  # only those three read None as default
    config = ServeConfig.from_dict({"registry": "./r", "device": "cuda:1", "batch_wait_timeout_s": 0})
    assert (config.device, config.batch_wait_timeout_s) == ("cuda:1", 0)
    assert ServeConfig.from_dict(config.to_dict()) == config
