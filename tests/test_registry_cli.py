"""`adistill registry ls|show|rm`, `predict --registry`, `evaluate MANIFEST --registry`, in-process."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers import fast_config, run_cli

from adistill.backbone import Backbone
from adistill.cli import main
from adistill.data import read_tenant_data
from adistill.recipes import train_tenant
from adistill.store.registry import Registry


@pytest.fixture(scope="module")
def trained(tiny: Backbone, tenants_dir: Path) -> dict[str, dict[str, bytes]]:
    """Two really trained tenants (1 epoch) so that evaluation has matching labels."""
    out = {}
    for name in ("bank", "travel"):
        cfg = fast_config("adapter", epochs=1)
        result = train_tenant(tiny, read_tenant_data(str(tenants_dir / f"{name}.parquet")), cfg)
        out[name] = result.files(name, tiny, cfg, {"source": name})
    return out


@pytest.fixture
def registry(tmp_path: Path, trained: dict[str, dict[str, bytes]]) -> Registry:
    reg = Registry(str(tmp_path / "registry"))
    reg.publish("bank", trained["bank"])
    reg.publish("bank", trained["bank"])
    reg.publish("travel", trained["travel"])
    return reg


def test_registry_ls_show_rm(capsys: pytest.CaptureFixture[str], registry: Registry) -> None:
    reg = ["--registry", registry.uri]
    code, out, _ = run_cli(capsys, "registry", "ls", *reg)
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["TENANT", "LATEST", "METHOD", "ACCURACY", "BACKBONE"]
    assert lines[1].split()[:3] == ["bank", "2", "adapter"] and "(test)" in lines[1]
    assert lines[2].split()[:3] == ["travel", "1", "adapter"]

    code, out, _ = run_cli(capsys, "registry", "ls", "--json", *reg)
    assert code == 0 and [r["tenant_id"] for r in json.loads(out)] == ["bank", "travel"]

    code, out, _ = run_cli(capsys, "registry", "show", "bank", *reg)
    assert code == 0
    for field in ("method:", "metrics:", "teachers:", "parameters:", "file:", "test accuracy", "adapter.safetensors"):
        assert field in out
    assert "version:    2 (versions: 1, 2; latest 2)" in out
    code, out, _ = run_cli(capsys, "registry", "show", "bank", "--version", "1", "--json", *reg)
    assert code == 0 and json.loads(out)["version"] == 1

    code, out, err = run_cli(capsys, "registry", "show", "nobody", *reg)
    assert code == 1 and err.count("\n") == 1 and "'nobody' is not published" in err
    code, out, err = run_cli(capsys, "registry", "show", "../etc", *reg)
    assert code == 1 and "invalid tenant id" in err

    code, out, _ = run_cli(capsys, "registry", "rm", "bank", "--version", "2", *reg)
    assert code == 0 and "latest is now 1" in out and registry.versions("bank") == [1]
    code, out, _ = run_cli(capsys, "registry", "rm", "travel", *reg)
    assert code == 0 and "deleted tenant travel" in out and registry.tenants() == ["bank"]
    code, _, err = run_cli(capsys, "registry", "rm", "travel", *reg)
    assert code == 1 and "travel" in err
    (Path(registry.uri) / "tenants" / "bank" / "LATEST").write_text("garbage")
    code, _, err = run_cli(capsys, "registry", "ls", *reg)
    assert code == 1 and "unreadable" in err
    code, out, _ = run_cli(capsys, "registry", "rm", "bank", *reg)
    assert code == 0 and registry.tenants() == []


def test_registry_ls_on_s3_with_storage_options(
    capsys: pytest.CaptureFixture[str], s3_moto: Any, trained: dict[str, dict[str, bytes]]
) -> None:
    Registry(s3_moto.uri(), s3_moto.storage_options).publish("bank", trained["bank"])
    options = [
        "--storage-option",
        f"key={s3_moto.storage_options['key']}",
        "--storage-option",
        f"secret={s3_moto.storage_options['secret']}",
        "--storage-option",
        f"client_kwargs.endpoint_url={s3_moto.endpoint_url}",
    ]
    code, out, _ = run_cli(capsys, "registry", "ls", "--registry", s3_moto.uri(), *options)
    assert code == 0 and out.splitlines()[1].split()[:2] == ["bank", "1"]


def test_predict_from_registry(
    capsys: pytest.CaptureFixture[str], registry: Registry, tiny_path: Path, tmp_path: Path
) -> None:
    bb = ["--backbone", str(tiny_path)]
    code, out, _ = run_cli(
        capsys, "predict", "--registry", registry.uri, "--tenant", "bank", "pay my bill", "rain today", *bb
    )
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [r["text"] for r in rows] == ["pay my bill", "rain today"]
    assert all(r["labels"][0]["label"] in ("pay_bill", "balance", "weather") for r in rows)
    # same answers as the artifact folder
    from adistill.store.artifact import save_artifact

    folder = save_artifact(registry.get_files("bank", 1), tmp_path / "bank-v1")
    code, out2, _ = run_cli(capsys, "predict", "--artifact", str(folder), "pay my bill", "rain today", *bb)
    assert code == 0 and out2 == out
    code, _, err = run_cli(capsys, "predict", "--registry", registry.uri, "hello", *bb)
    assert code == 1 and "--tenant" in err
    code, _, err = run_cli(capsys, "predict", "--registry", registry.uri, "--tenant", "nobody", "hello", *bb)
    assert code == 1 and "'nobody'" in err
    with pytest.raises(SystemExit):  # argparse: --artifact and --registry are alternatives
        main(["predict", "--artifact", str(folder), "--registry", registry.uri, "x"])


def test_evaluate_manifest_from_registry(
    capsys: pytest.CaptureFixture[str], registry: Registry, tiny_path: Path, tenants_dir: Path, tmp_path: Path
) -> None:
    manifest = tmp_path / "tenants.yaml"
    manifest.write_text(
        f"tenants:\n  - id: bank\n    data: {tenants_dir / 'bank.parquet'}\n"
        f"  - id: travel\n    data: {tenants_dir / 'travel.parquet'}\n    shots: 5\n"
    )
    report = tmp_path / "report.json"
    args = ["evaluate", str(manifest), "--registry", registry.uri, "--backbone", str(tiny_path), "--json", str(report)]
    code, out, _ = run_cli(capsys, *args)
    assert code == 0, out
    assert out.splitlines()[0].split()[:5] == ["TENANT", "VERSION", "METHOD", "SPLIT", "ACCURACY"]
    result = json.loads(report.read_text())
    rows = {r["tenant_id"]: r for r in result["tenants"]}
    assert rows["bank"]["version"] == 2 and rows["travel"]["version"] == 1
    for r in rows.values():
        assert r["status"] == "ok" and r["split"] == "test" and 0.0 <= r["accuracy"] <= 1.0
        assert r["percent_of_backbone"] > 0 and r["artifact_bytes"] > 0
    assert result["average_accuracy"] == pytest.approx((rows["bank"]["accuracy"] + rows["travel"]["accuracy"]) / 2)

    # a manifest tenant that is not published: reported, exit 1
    manifest.write_text(manifest.read_text() + f"  - id: home\n    data: {tenants_dir / 'home.parquet'}\n")
    code, out, _ = run_cli(capsys, *args)
    assert code == 1 and "missing" in out.splitlines()[3]

    # the artifact-folder form still works, and the two forms do not mix
    from adistill.store.artifact import save_artifact

    folder = save_artifact(registry.get_files("travel"), tmp_path / "travel")
    data = str(tenants_dir / "travel.parquet")
    code, out, _ = run_cli(capsys, "evaluate", "--artifact", str(folder), "--data", data, "--backbone", str(tiny_path))
    assert code == 0 and json.loads(out)["accuracy"] == pytest.approx(rows["travel"]["accuracy"])
    code, _, err = run_cli(capsys, "evaluate", str(manifest), "--registry", registry.uri, "--artifact", str(folder))
    assert code == 1 and "either" in err
    code, _, err = run_cli(capsys, "evaluate", str(manifest))
    assert code == 1 and "--registry" in err


def test_evaluate_rejects_a_bad_manifest_before_loading_anything(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    manifest = tmp_path / "bad.yaml"
    manifest.write_text("tenants:\n  - id: Bad/Id\n    data: x.parquet\n")
    code, _, err = run_cli(capsys, "evaluate", str(manifest), "--registry", str(tmp_path / "reg"))
    assert code == 1 and "invalid tenant id" in err and err.count("\n") == 1


def test_registry_publish_an_artifact_folder(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, trained: dict[str, dict[str, bytes]]
) -> None:
    from adistill.store.artifact import save_artifact

    folder = save_artifact(trained["bank"], tmp_path / "bank")
    reg = ["--registry", str(tmp_path / "registry")]
    code, out, _ = run_cli(capsys, "registry", "publish", str(folder), *reg)
    assert code == 0 and out == f"published bank version 1 to {tmp_path / 'registry'}\n"
    code, _, err = run_cli(capsys, "registry", "publish", str(folder), "--tenant", "other", *reg)
    assert code == 1 and "trained for tenant 'bank', not 'other'" in err and "--tenant only confirms" in err
    assert len(err.strip().splitlines()) == 1
    code, out, _ = run_cli(capsys, "registry", "publish", str(folder), "--tenant", "bank", *reg)
    assert code == 0 and out.startswith("published bank version 2")
    code, _, err = run_cli(capsys, "registry", "publish", str(tmp_path / "nothing"), *reg)
    assert code == 1 and "no such artifact folder" in err
    assert Registry(str(tmp_path / "registry")).versions("bank") == [1, 2]
