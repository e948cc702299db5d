"""Serve configuration without starting anything: ServeConfig validation, the config files, the CLI flags."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from adistill.cli import build_parser
from adistill.errors import ConfigError
from adistill.serve import ServeConfig, build_app

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["adistill.yaml", "adistill-gpu.yaml"])
def test_config_files_parse_and_build(name: str) -> None:
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((ROOT / "serve_apps" / name).read_text())
    schema = ServeDeploySchema.model_validate(raw)
    [app] = schema.applications
    assert app.import_path == "adistill.serve:build_app"
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
