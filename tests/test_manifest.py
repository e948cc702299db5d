"""Tenants manifests: everything is validated when loading, before any training."""

from __future__ import annotations

from pathlib import Path

import pytest

from adistill.config import RecipeConfig
from adistill.errors import ConfigError
from adistill.manifest import ManifestError, TenantSpec, load_manifest


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "bank.parquet").write_bytes(b"")
    (tmp_path / "data" / "travel").mkdir()
    (tmp_path / "recipe.yaml").write_text("method: adapter\nstage1: {epochs: 3}\n")
    return tmp_path


def write(folder: Path, text: str) -> Path:
    path = folder / "tenants.yaml"
    path.write_text(text)
    return path


def test_a_valid_manifest(folder: Path) -> None:
    manifest = load_manifest(
        write(
            folder,
            """
defaults:
  shots: 10
  config: recipe.yaml
tenants:
  - id: bank
    data: data/bank.parquet
  - id: travel
    data: data/travel
    method: distill
    shots: 5
    config: {stage1: {epochs: 7}}
  - id: remote-1
    data: s3://bucket/tenants/remote.parquet
  - id: abs_2
    data: file://%s
"""
            % (folder / "data" / "bank.parquet"),
        )
    )
    assert manifest.ids == ["bank", "travel", "remote-1", "abs_2"]
    bank, travel, remote, absolute = manifest.tenants
    assert bank.data == str((folder / "data" / "bank.parquet").resolve())  # relative: against the manifest
    assert remote.data == "s3://bucket/tenants/remote.parquet"  # URIs as given
    assert absolute.data == f"file://{folder / 'data' / 'bank.parquet'}"
    assert bank.recipe() == RecipeConfig.from_yaml(folder / "recipe.yaml").replace(shots=10)
    assert bank.recipe().method == "adapter" and bank.recipe().stage1.epochs == 3
    assert travel.recipe().method == "distill" and travel.recipe().shots == 5 and travel.recipe().stage1.epochs == 7
    assert manifest.tenant("travel") is travel
    with pytest.raises(ManifestError, match="no tenant 'nobody'"):
        manifest.tenant("nobody")


def test_recipe_falls_back_to_a_base_config() -> None:
    base = RecipeConfig(method="fusion", seed=3)
    assert TenantSpec("a", "/x").recipe(base) == base
    assert TenantSpec("a", "/x", shots=2).recipe(base) == base.replace(shots=2)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tenants: [\n  - id: a\n", "invalid YAML"),
        ("- id: a\n", "expected a mapping"),
        ("tenants: []\n", "non-empty list"),
        ("tenant:\n  - {id: a, data: data/bank.parquet}\n", "unknown key"),
        ("tenants:\n  - {id: bank, data: data/missing.parquet}\n", "not found"),
        ("tenants:\n  - {id: bank, data: data/bank.parquet}\n  - {id: bank, data: data/travel}\n", "duplicate"),
        ("tenants:\n  - {id: Bank, data: data/bank.parquet}\n", "invalid tenant id 'Bank'"),
        ("tenants:\n  - {id: ../x, data: data/bank.parquet}\n", "invalid tenant id"),
        ("tenants:\n  - {id: '%s', data: data/bank.parquet}\n" % ("x" * 64), "invalid tenant id"),
        ("tenants:\n  - {data: data/bank.parquet}\n", "invalid tenant id None"),
        ("tenants:\n  - {id: bank}\n", "'data' must be"),
        ("tenants:\n  - {id: bank, data: data/bank.parquet, shots: 0}\n", "shots must be null or >= 1, got 0"),
        (
            "tenants:\n  - {id: bank, data: data/bank.parquet, shots: true}\n",
            "shots must be an integer or null, got True",
        ),
        ("tenants:\n  - {id: bank, data: data/bank.parquet, method: magic}\n", "method must be one of"),
        ("tenants:\n  - {id: bank, data: data/bank.parquet, colour: red}\n", "unknown key"),
        ("tenants:\n  - {id: bank, data: data/bank.parquet, config: nope.yaml}\n", "config 'nope.yaml' not found"),
        ("tenants:\n  - {id: bank, data: data/bank.parquet, config: {stage1: {epochs: 0}}}\n", "epochs must be"),
        ("tenants:\n  - {id: bank, data: data/bank.parquet, config: {bogus: 1}}\n", "unknown key"),
        ("defaults: {method: magic}\ntenants:\n  - {id: bank, data: data/bank.parquet}\n", "method must be one of"),
        ("tenants:\n  - just-a-string\n", "expected a mapping"),
    ],
)
def test_bad_manifests_are_refused(folder: Path, text: str, message: str) -> None:
    path = write(folder, text)
    with pytest.raises(ManifestError, match=message) as info:
        load_manifest(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ConfigError)


def test_missing_manifest_file(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="cannot read"):
        load_manifest(tmp_path / "nope.yaml")


def test_data_check_can_be_skipped(folder: Path) -> None:
    path = write(folder, "tenants:\n  - {id: later, data: data/not-yet.parquet}\n")
    assert load_manifest(path, check_data=False).tenants[0].data.endswith("not-yet.parquet")


@pytest.mark.parametrize(
    ("entry", "recipe"),
    [
        ("shots: true", {"shots": True}),
        ("shots: 2.0", {"shots": 2.0}),
        ("shots: 0", {"shots": 0}),
        ("method: magic", {"method": "magic"}),
    ],
)
def test_manifest_and_recipe_refuse_shots_and_method_with_the_same_words(
    folder: Path, entry: str, recipe: dict[str, object]
) -> None:
    with pytest.raises(ConfigError) as direct:
        RecipeConfig.from_dict(recipe)
    path = write(folder, f"tenants:\n  - {{id: bank, data: data/bank.parquet, {entry}}}\n")
    with pytest.raises(ManifestError) as via_manifest:
        load_manifest(path)
    assert str(via_manifest.value) == f"manifest {path}: tenant 'bank': {direct.value}"


def test_defaults_shots_are_checked_like_a_tenants_own(folder: Path) -> None:
    path = write(folder, "defaults: {shots: true}\ntenants:\n  - {id: bank, data: data/bank.parquet}\n")
    with pytest.raises(ManifestError, match="tenant 'bank': shots must be an integer or null, got True"):
        load_manifest(path)
    with pytest.raises(ConfigError, match="shots must be an integer or null, got True"):
        TenantSpec("a", "/x", shots=True)


def test_column_names_per_tenant_and_in_defaults(folder: Path) -> None:
    path = write(
        folder,
        "defaults: {text_column: query, label_column: category}\n"
        "tenants:\n  - {id: bank, data: data/bank.parquet}\n"
        "  - {id: travel, data: data/travel, text_column: utterance}\n"
        "  - {id: plain, data: data/bank.parquet, text_column: text, label_column: label}\n",
    )
    columns = {t.id: (t.text_column, t.label_column) for t in load_manifest(path).tenants}
    assert columns == {"bank": ("query", "category"), "travel": ("utterance", "category"), "plain": ("text", "label")}


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("text_column: 3", "text_column must be a string, got 3"),
        ("label_column: ''", "label_column must be a non-empty column name"),
        ("text_column: q, label_column: q", "text_column and label_column are both 'q'"),
    ],
)
def test_bad_column_names_are_refused(folder: Path, entry: str, message: str) -> None:
    path = write(folder, f"tenants:\n  - {{id: bank, data: data/bank.parquet, {entry}}}\n")
    with pytest.raises(ManifestError, match=message):
        load_manifest(path)
