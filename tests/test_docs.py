"""The documentation cites only what is in the repository, and the tuning spaces ship with the package (issue 14)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, run_cli

from adistill.config import RecipeConfig
from adistill.errors import ConfigError
from adistill.tune_space import load_space, packaged_spaces

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
GONE = ["DESIGN.md", "DESIGN §", "REFERENCE-RESULTS", "--backbone tiny-bert", "--space tune_spaces/"]
# A path in the repository, as the docs cite them: in a Markdown link, or in backticks.
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
TICKED = re.compile(r"`((?:adistill|benchmarks|docs|tests|tune_spaces|k8s|cluster|serve_apps)/[A-Za-z0-9_./-]+)`")


def cited(path: Path) -> list[str]:
    text = path.read_text()
    links = [m for m in LINK.findall(text) if "://" not in m]
    return links + TICKED.findall(text)


@pytest.mark.parametrize("doc", DOCS, ids=[p.name for p in DOCS])
def test_docs_cite_only_files_in_the_repository(doc: Path) -> None:
    text = doc.read_text()
    assert not [g for g in GONE if g in text]
    missing = []
    for target in cited(doc):
        target = target.rstrip(".,;:")
        if "<" in target or "*" in target or "{" in target:  # a pattern (results/<name>.yaml), not a file
            continue
        base = doc.parent if not target.startswith(("adistill/", "benchmarks/", "tests/", "tune_spaces/")) else ROOT
        if not ((base / target).exists() or (ROOT / target).exists()):
            missing.append(target)
    assert not missing, f"{doc.name} cites files that are not in the repository: {missing}"


def test_the_recipe_shown_in_the_method_doc_is_the_default_recipe() -> None:
    """docs/method.md's "Configuration" block lists every setting with its default: it loads, and equals them."""
    section = (ROOT / "docs" / "method.md").read_text().split("## Configuration", 1)[1]
    block = section.split("```yaml", 1)[1].split("```", 1)[0]
    assert RecipeConfig.from_dict(yaml.safe_load(block)) == RecipeConfig()
    assert yaml.safe_load(block) == RecipeConfig().to_dict()  # every setting, none left out


def test_packaged_spaces_load_by_name_and_from_the_checkout() -> None:
    assert set(packaged_spaces()) == {"distill", "smoke"}
    for name, path in packaged_spaces().items():
        assert path.parent == ROOT / "adistill" / "tune_spaces"
        assert load_space(name).to_dict() == load_space(ROOT / "tune_spaces" / f"{name}.yaml").to_dict()
    with pytest.raises(ConfigError, match=r"nor a packaged space \(packaged: \['distill', 'smoke'\]\)"):
        load_space("distil")
    with pytest.raises(ConfigError, match="cannot read it"):
        load_space("missing/space.yaml")


def test_packaged_spaces_are_package_data() -> None:
    """The wheel holds them: pyproject's package-data names every packaged space file."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["adistill"]
    package = ROOT / "adistill"
    shipped = {p for pattern in patterns for p in package.glob(pattern)}
    assert set(packaged_spaces().values()) <= shipped


def test_tune_takes_a_packaged_space_by_name(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tenants_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From a folder that is not the checkout, `--space distill` is found; the next check (the registry) fails."""
    monkeypatch.chdir(tmp_path)
    manifest = tmp_path / "tenants.yaml"
    manifest.write_text(f"tenants:\n  - id: bank\n    data: {tenants_dir / 'bank.parquet'}\n")
    code, _, err = run_cli(
        capsys, "tune", str(manifest), "--tenant", "bank", "--space", "distill", "--registry", str(tmp_path / "typo")
    )
    assert code == 1 and "registry" in err and "does not exist" in err, err
    code, _, err = run_cli(
        capsys, "tune", str(manifest), "--tenant", "bank", "--space", "distil", "--registry", str(tmp_path / "typo")
    )
    assert code == 1 and "nor a packaged space" in err
