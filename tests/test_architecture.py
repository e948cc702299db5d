"""The layering of docs/architecture.md, checked on the source: what may import what."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

from helpers import PYTHON, ROOT

PACKAGE = ROOT / "adistill"


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any level (inside functions too)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def modules_under(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.py"))


def test_ray_is_imported_only_in_distributed() -> None:
    offenders = [
        str(p.relative_to(ROOT))
        for p in modules_under(PACKAGE)
        if "distributed" not in p.parts and any(m == "ray" or m.startswith("ray.") for m in imported_modules(p))
    ]
    assert offenders == []


def test_store_imports_nothing_from_recipes() -> None:
    offenders = {
        str(p.relative_to(ROOT)): sorted(m for m in imported_modules(p) if m.startswith("adistill.recipes"))
        for p in modules_under(PACKAGE / "store")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_nothing_but_cli_and_demo_imports_distributed() -> None:
    allowed = {"cli", "distributed", "demo.py"}
    offenders = [
        str(p.relative_to(ROOT))
        for p in modules_under(PACKAGE)
        if not allowed & set(p.relative_to(PACKAGE).parts)
        and any(m.startswith("adistill.distributed") for m in imported_modules(p))
    ]
    assert offenders == []


def test_artifact_names_and_the_cli_import_without_torch_or_ray() -> None:
    code = (
        "import sys, adistill.store.names, adistill.cli; "
        "heavy = [m for m in ('torch', 'ray') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([PYTHON, "-c", code], check=True, cwd=ROOT)


def test_no_module_is_over_450_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for p in modules_under(PACKAGE) if (n := len(p.read_text().splitlines())) > 450}
    assert long == {}
