"""`adistill train` without silent misconfiguration (issue 14): teachers from a registry, distill without teachers,
column mapping, data checked before the encoder loads, out-of-scope detection that says when it is off."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import fast_config, run_cli, write_intents_csv, write_tenant

from adistill.backbone import Backbone
from adistill.store.registry import Registry

NO_BACKBONE = "/nonexistent/backbone"  # loading it fails: an error about data proves the data came first


def train(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    return run_cli(capsys, "train", "--epochs", "1", *argv)


@pytest.fixture(scope="module")
def teachers_registry(tiny: Backbone, tenants_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Registry:
    """bank and travel published as adapters (1 epoch) in a local registry."""
    from adistill.recipes.tenant import TenantJob, run_job

    registry = Registry(str(tmp_path_factory.mktemp("teachers") / "registry"))
    for name in ("bank", "travel"):
        job = TenantJob(name, str(tenants_dir / f"{name}.parquet"), fast_config("adapter", epochs=1))
        registry.publish(name, run_job(job, tiny, [])[0])
    return registry


def test_train_distills_from_a_teacher_registry(
    capsys: pytest.CaptureFixture[str], tiny_path: Path, tenants_dir: Path, tmp_path: Path, teachers_registry: Registry
) -> None:
    recipe = tmp_path / "recipe.yaml"  # the teachers' adapter shape (reduction 4)
    recipe.write_text(yaml.safe_dump(fast_config("distill", epochs=1).to_dict()))
    code, out, err = train(
        capsys, "--config", str(recipe), "--data", str(tenants_dir / "new.parquet"), "--tenant", "new",
        "--out", str(tmp_path / "new"),
        "--method", "distill", "--teacher-registry", teachers_registry.uri, "--teacher-select", "similar",
        "--teacher-k", "1", "--backbone", str(tiny_path),
    )  # fmt: skip
    assert code == 0, err
    meta = json.loads((tmp_path / "new" / "adapter_config.json").read_text())
    assert meta["method"] == "distill" and json.loads(out)["method"] == "distill"
    assert meta["teacher_selection"]["considered"] == 2 and len(meta["teachers"]) == 1
    [teacher] = meta["teachers"]
    assert teacher["tenant_id"] in ("bank", "travel") and teacher["version"] == 1
    assert teacher["sha256"] == teachers_registry.meta(teacher["tenant_id"])["files"]["adapter.safetensors"]["sha256"]
    assert f"teachers (similar): {teacher['tenant_id']}" in err


def test_a_registry_given_as_teacher_folders_is_pointed_to_the_right_flag(
    capsys: pytest.CaptureFixture[str], tenants_dir: Path, tmp_path: Path, teachers_registry: Registry
) -> None:
    code, _, err = train(
        capsys, "--data", str(tenants_dir / "new.parquet"), "--tenant", "new", "--out", str(tmp_path / "new"),
        "--method", "distill", "--teachers", teachers_registry.uri, "--backbone", NO_BACKBONE,
    )  # fmt: skip
    assert code == 1 and "is a registry, not an artifact folder: use --teacher-registry" in err
    code, _, err = train(
        capsys, "--data", str(tenants_dir / "new.parquet"), "--tenant", "new", "--out", str(tmp_path / "new"),
        "--teacher-registry", str(tmp_path / "typo"), "--backbone", NO_BACKBONE,
    )  # fmt: skip
    assert code == 1 and "does not exist" in err and len(err.splitlines()) == 1


def test_distill_without_teachers_is_an_error_or_trains_as_adapter(
    capsys: pytest.CaptureFixture[str], tiny_path: Path, tenants_dir: Path, tmp_path: Path
) -> None:
    base = ["--data", str(tenants_dir / "bank.parquet"), "--tenant", "bank"]
    for method in ("distill", "fusion"):
        code, _, err = train(capsys, *base, "--out", str(tmp_path / "x"), "--method", method, "--backbone", NO_BACKBONE)
        assert code == 1 and f"--method {method} needs teachers" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()
    # no --method: the recipe's default (distill) has nothing to distil from, so it is trained and labelled adapter
    code, out, err = train(capsys, *base, "--out", str(tmp_path / "bank"), "--backbone", str(tiny_path))
    assert code == 0, err
    assert "no teachers, so this tenant is trained with method 'adapter'" in err
    meta = json.loads((tmp_path / "bank" / "adapter_config.json").read_text())
    assert meta["method"] == "adapter" == json.loads(out)["method"] and meta["hyperparameters"]["method"] == "adapter"


def test_distill_with_an_empty_teacher_registry_is_an_error(
    capsys: pytest.CaptureFixture[str], tiny_path: Path, tenants_dir: Path, tmp_path: Path
) -> None:
    (tmp_path / "empty").mkdir()
    code, _, err = train(
        capsys, "--data", str(tenants_dir / "bank.parquet"), "--tenant", "bank", "--out", str(tmp_path / "bank"),
        "--method", "distill", "--teacher-registry", str(tmp_path / "empty"), "--backbone", str(tiny_path),
    )  # fmt: skip
    assert code == 1 and "holds no adapter on this backbone" in err


def test_the_library_labels_distill_without_teachers_as_adapter(tiny: Backbone, tenants_dir: Path) -> None:
    from adistill.recipes.tenant import TenantJob, run_job

    files, result = run_job(
        TenantJob("bank", str(tenants_dir / "bank.parquet"), fast_config("distill", epochs=1)), tiny, []
    )
    meta = json.loads(files["adapter_config.json"])
    assert result.model.method == meta["method"] == "adapter" and meta["hyperparameters"]["method"] == "distill"


def test_column_mapping_in_train_and_evaluate(
    capsys: pytest.CaptureFixture[str], tiny_path: Path, tmp_path: Path
) -> None:
    csv = write_intents_csv(tmp_path / "intents.csv", ["pay_bill", "balance", "weather"])
    bb = ["--backbone", str(tiny_path)]
    code, _, err = train(
        capsys, "--data", str(csv), "--tenant", "shop", "--out", str(tmp_path / "x"), "--method", "adapter", *bb
    )
    assert code == 1 and "missing column(s) ['text', 'label']; found ['query', 'category']" in err
    assert "--text-column/--label-column" in err
    columns = ["--text-column", "query", "--label-column", "category"]
    code, out, err = train(
        capsys,
        "--data",
        str(csv),
        *columns,
        "--tenant",
        "shop",
        "--out",
        str(tmp_path / "shop"),
        "--method",
        "adapter",
        *bb,
    )
    assert code == 0, err
    meta = json.loads((tmp_path / "shop" / "adapter_config.json").read_text())
    assert meta["labels"] == ["balance", "pay_bill", "weather"]
    assert meta["data"]["columns"] == {"text": "query", "label": "category"}
    # evaluate reads the columns the artifact recorded; flags override them
    code, out, err = run_cli(capsys, "evaluate", "--artifact", str(tmp_path / "shop"), "--data", str(csv), *bb)
    assert code == 0, err
    assert json.loads(out)["split"] == "validation"
    code, _, err = run_cli(
        capsys, "evaluate", "--artifact", str(tmp_path / "shop"), "--data", str(csv), "--text-column", "nope", *bb
    )
    assert code == 1 and "missing column(s) ['nope']" in err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("text,label\n", "no rows (a header and nothing else?)"),
        ("text,category\nhello,a\nbye,b\n", "missing column(s) ['label']"),
        ("text,label\nhello,a\nhi,a\n", "at least 2 are needed"),
    ],
    ids=["header-only", "missing-column", "one-label"],
)
def test_data_errors_come_before_the_encoder_loads(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, content: str, message: str
) -> None:
    data = tmp_path / "data.csv"
    data.write_text(content)
    code, _, err = train(
        capsys, "--data", str(data), "--tenant", "t", "--out", str(tmp_path / "o"), "--backbone", NO_BACKBONE
    )
    assert code == 1 and message in err and len(err.splitlines()) == 1, err


def test_evaluate_reads_every_tenants_data_before_the_encoder(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, teachers_registry: Registry, tenants_dir: Path
) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\n")
    manifest = tmp_path / "tenants.yaml"
    manifest.write_text(f"tenants:\n  - id: bank\n    data: {bad}\n")
    code, out, _ = run_cli(
        capsys, "evaluate", str(manifest), "--registry", teachers_registry.uri, "--backbone", NO_BACKBONE
    )
    assert code == 1 and "no rows" in out  # the tenant's data error, and no backbone was needed to find it


def test_out_of_scope_detection_off_is_warned_and_recorded(
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    tiny_path: Path,
    tmp_path: Path,
    teachers_registry: Registry,
) -> None:
    no_oos = write_tenant(tmp_path / "no-oos.parquet", ["pay_bill", "weather"], oos=False)
    with caplog.at_level(logging.WARNING, logger="adistill"):
        code, out, err = train(
            capsys, "--data", str(no_oos), "--tenant", "quiet", "--out", str(tmp_path / "quiet"), "--method", "adapter",
            "--backbone", str(tiny_path),
        )  # fmt: skip
    assert code == 0, err
    assert "no out-of-scope threshold" in caplog.text and "'oos'" in caplog.text
    meta = json.loads((tmp_path / "quiet" / "adapter_config.json").read_text())
    assert meta["oos_threshold"] is None and meta["out_of_scope"]["calibrated"] is False
    assert "no 'oos' rows" in meta["out_of_scope"]["reason"]
    assert json.loads(out)["out_of_scope_calibrated"] is False
    # beside a tenant with oos rows (calibrated), `registry show` says which is which
    registry = Registry(str(tmp_path / "registry"))
    registry.publish("bank", teachers_registry.get_files("bank"))
    assert run_cli(capsys, "registry", "publish", str(tmp_path / "quiet"), "--registry", registry.uri)[0] == 0
    shown = {}
    for tenant in ("quiet", "bank"):
        code, out, _ = run_cli(capsys, "registry", "show", tenant, "--registry", registry.uri)
        shown[tenant] = next(line for line in out.splitlines() if line.startswith("oos:"))
    assert "off: no 'oos' rows in the validation data" in shown["quiet"]
    assert "on, threshold" in shown["bank"]
    assert registry.meta("bank")["out_of_scope"] == {"calibrated": True}


def test_onboard_warns_about_tenants_without_a_threshold(capsys: pytest.CaptureFixture[str]) -> None:
    from adistill.cli.onboard import warn_uncalibrated

    class Metas:
        def meta(self, tenant: str, version: int | None) -> dict[str, Any]:
            return {"oos_threshold": None if tenant in ("a", "c") else 0.4}

    warn_uncalibrated(Metas(), [("a", 1), ("b", 1), ("c", 2)])
    err = capsys.readouterr().err
    assert err.startswith("adistill onboard: warning: no out-of-scope threshold for 2 tenant(s) (a, c)")
    warn_uncalibrated(Metas(), [("b", 1)])
    assert capsys.readouterr().err == ""


def test_onboarding_checks_every_tenants_data_before_the_backbone_loads(tmp_path: Path, tenants_dir: Path) -> None:
    """A bad tenant fails at once (its DataError, with the others planned); the backbone loads only after."""
    from adistill.distributed.onboard import OnboardOptions, onboard_manifest
    from adistill.errors import ConfigError
    from adistill.manifest import load_manifest

    (tmp_path / "bad.csv").write_text("text,label\n")
    write_intents_csv(tmp_path / "shop.csv", ["pay_bill", "weather"])
    manifest = tmp_path / "tenants.yaml"
    manifest.write_text(
        f"defaults: {{method: adapter}}\ntenants:\n  - id: bank\n    data: {tenants_dir / 'bank.parquet'}\n"
        "  - id: bad\n    data: bad.csv\n"
        "  - id: shop\n    data: shop.csv\n    text_column: query\n    label_column: category\n"
    )
    events: list[Any] = []
    with pytest.raises(ConfigError, match="not a Hugging Face model folder"):
        onboard_manifest(
            load_manifest(manifest), Registry(str(tmp_path / "reg")), options=OnboardOptions(backbone=NO_BACKBONE),
            on_event=events.append,
        )  # fmt: skip
    assert [(e.tenant_id, e.status) for e in events] == [("bad", "failed")]
    assert events[0].detail["error"].startswith("DataError: ") and "no rows" in events[0].detail["error"]


def test_run_names_keep_their_form_and_change_with_the_columns(tenants_dir: Path) -> None:
    from adistill.onboard_plan import run_name
    from adistill.recipes.tenant import TenantJob

    data = str(tenants_dir / "bank.parquet")
    plain = TenantJob("bank", data, fast_config("distill"))
    mapped = TenantJob("bank", data, fast_config("distill"), "query", "category")
    assert run_name(plain, "fp", ()) != run_name(mapped, "fp", ()) == run_name(mapped, "fp", ())
