"""`--storage-option` reaches every backbone a CLI command loads: an s3:// backbone on moto, in-process.

`adistill train` used to load its backbone without the storage options (only `evaluate MANIFEST` passed them), so
an s3:// backbone that needs an endpoint or credentials worked in one command and not the other."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers import run_cli


@pytest.fixture
def s3_backbone(s3_moto: Any, tiny_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, list[str]]:
    """The tiny encoder's folder uploaded to a fresh moto bucket: (its s3:// URI, the `--storage-option` flags)."""
    client = s3_moto.server.client()
    for file in sorted(tiny_path.rglob("*")):
        if file.is_file():
            client.put_object(
                Bucket=s3_moto.bucket, Key=f"tiny-bert/{file.relative_to(tiny_path)}", Body=file.read_bytes()
            )
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)  # only the flags can reach the bucket
    options = s3_moto.storage_options
    flags = [
        *("--storage-option", f"key={options['key']}"),
        *("--storage-option", f"secret={options['secret']}"),
        *("--storage-option", f"client_kwargs.endpoint_url={s3_moto.endpoint_url}"),
    ]
    return s3_moto.uri("tiny-bert"), flags


def fresh_backbone_cache(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """A new, empty download cache, so the next command fetches the backbone from S3 itself."""
    monkeypatch.setenv("ADISTILL_CACHE", str(folder))


def test_s3_backbone_with_storage_options_in_train_evaluate_predict(
    capsys: pytest.CaptureFixture[str],
    s3_backbone: tuple[str, list[str]],
    tenants_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    uri, flags = s3_backbone
    out_dir = tmp_path / "bank"
    fresh_backbone_cache(monkeypatch, tmp_path / "cache-train")
    code, out, err = run_cli(
        capsys,
        "train",
        "--data",
        str(tenants_dir / "bank.parquet"),
        "--tenant",
        "bank",
        "--out",
        str(out_dir),
        "--method",
        "adapter",
        "--epochs",
        "1",
        "--backbone",
        uri,
        *flags,
    )
    assert code == 0, err
    assert json.loads(out)["tenant_id"] == "bank"
    meta = json.loads((out_dir / "adapter_config.json").read_text())
    assert meta["backbone"]["name"] == uri
    assert (tmp_path / "cache-train").is_dir()  # downloaded from moto, not found elsewhere

    fresh_backbone_cache(monkeypatch, tmp_path / "cache-evaluate")
    code, out, err = run_cli(
        capsys,
        "evaluate",
        "--artifact",
        str(out_dir),
        "--data",
        str(tenants_dir / "bank.parquet"),
        "--backbone",
        uri,
        *flags,
    )
    assert code == 0, err
    assert json.loads(out)["split"] == "test"

    fresh_backbone_cache(monkeypatch, tmp_path / "cache-predict")
    code, out, err = run_cli(capsys, "predict", "--artifact", str(out_dir), "pay my bill", "--backbone", uri, *flags)
    assert code == 0, err
    assert json.loads(out)["text"] == "pay my bill"
