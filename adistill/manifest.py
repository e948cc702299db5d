"""The tenants manifest (YAML): which tenants to onboard or evaluate, where their data is, how to train them.

    defaults:                 # optional, applies to every tenant that does not say otherwise
      method: distill
      shots: 10
      config: recipe.yaml     # a recipe YAML (path relative to this file) or an inline mapping
      text_column: query      # the data's column names, when they are not `text` and `label`
      label_column: category
    tenants:
      - id: banking
        data: data/banking.parquet      # relative local paths resolve against the manifest's folder
      - id: travel
        data: s3://bucket/tenants/travel/   # URIs are kept as given
        shots: 5
        method: adapter
        config: {stage1: {epochs: 5}}

Everything is checked when the manifest is loaded, before any training: the YAML, unknown keys, tenant ids,
duplicate ids, methods, shots, recipe configs, and that every local data file or folder exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from adistill.config import Config, RecipeConfig, require
from adistill.errors import ConfigError, InvalidTenantId
from adistill.tenant_id import validate_tenant_id

COLUMN_KEYS = ("text_column", "label_column")
TENANT_KEYS = ("id", "data", "shots", "method", "config", *COLUMN_KEYS)
DEFAULT_KEYS = ("shots", "method", "config", *COLUMN_KEYS)
TOP_KEYS = ("tenants", "defaults")


class ManifestError(ConfigError):
    """A tenants manifest is unreadable or invalid; the message names the file and the entry."""


@dataclass(frozen=True)
class TenantSpec(Config):
    """One manifest entry. `data` is an absolute local path or a URI exactly as written (s3://, file://...).
    `shots` and `method` are checked by the recipe's own rules (`RecipeConfig`), so both say the same.
    `text_column` / `label_column` name the data's columns (`adistill.data.read_tenant_data`)."""

    id: str
    data: str
    shots: int | None = None
    method: str | None = None
    config: RecipeConfig | None = None
    text_column: str = "text"
    label_column: str = "label"

    def check(self) -> None:
        self.recipe()  # method/shots/config must combine into a valid recipe
        for name in COLUMN_KEYS:
            require(bool(getattr(self, name).strip()), f"{name} must be a non-empty column name")
        require(self.text_column != self.label_column, f"text_column and label_column are both {self.text_column!r}")

    def recipe(self, base: RecipeConfig | None = None) -> RecipeConfig:
        """The tenant's recipe: its `config` (else `base`, else the defaults) with `method`/`shots` applied."""
        cfg = self.config or base or RecipeConfig()
        changes: dict[str, Any] = {}
        if self.method is not None:
            changes["method"] = self.method
        if self.shots is not None:
            changes["shots"] = self.shots
        return cfg.replace(**changes) if changes else cfg

    @property
    def is_local(self) -> bool:
        return _is_local(self.data)


@dataclass(frozen=True)
class Manifest:
    path: str
    tenants: tuple[TenantSpec, ...]

    @property
    def ids(self) -> list[str]:
        return [t.id for t in self.tenants]

    def tenant(self, tenant_id: str) -> TenantSpec:
        for t in self.tenants:
            if t.id == tenant_id:
                return t
        raise ManifestError(f"manifest {self.path}: no tenant {tenant_id!r} (tenants: {', '.join(self.ids)})")


def load_manifest(path: str | Path, check_data: bool = True) -> Manifest:
    """Read and validate a tenants manifest (a local YAML file). `check_data`: local data paths must exist."""
    path = Path(path)
    where = f"manifest {path}"
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ManifestError(f"{where}: cannot read it ({exc.strerror or exc})") from exc
    except yaml.YAMLError as exc:
        raise ManifestError(f"{where}: invalid YAML: {_one_line(exc)}") from exc
    if not isinstance(raw, dict):
        raise ManifestError(f"{where}: expected a mapping with a 'tenants' list, got {type(raw).__name__}")
    _no_unknown(raw, TOP_KEYS, where)
    entries = raw.get("tenants")
    if not isinstance(entries, list) or not entries:
        raise ManifestError(f"{where}: 'tenants' must be a non-empty list of {{id, data}} entries")
    folder = path.resolve().parent
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ManifestError(f"{where}: 'defaults' must be a mapping, got {type(defaults).__name__}")
    _no_unknown(defaults, DEFAULT_KEYS, f"{where}: defaults")
    default_cfg = _config(defaults.get("config"), folder, f"{where}: defaults")
    tenants = []
    for index, entry in enumerate(entries):
        tenants.append(_tenant(entry, index, defaults, default_cfg, folder, where, check_data))
    seen: dict[str, int] = {}
    for t in tenants:
        seen[t.id] = seen.get(t.id, 0) + 1
    duplicates = sorted(i for i, n in seen.items() if n > 1)
    if duplicates:
        raise ManifestError(f"{where}: duplicate tenant id(s) {duplicates}")
    return Manifest(str(path), tuple(tenants))


def _tenant(
    entry: Any,
    index: int,
    defaults: dict[str, Any],
    default_cfg: RecipeConfig | None,
    folder: Path,
    where: str,
    check_data: bool,
) -> TenantSpec:
    here = f"{where}: tenants[{index}]"
    if not isinstance(entry, dict):
        raise ManifestError(f"{here}: expected a mapping with 'id' and 'data', got {entry!r}")
    _no_unknown(entry, TENANT_KEYS, here)
    try:
        tenant_id = validate_tenant_id(entry.get("id"))
    except InvalidTenantId as exc:
        raise ManifestError(f"{here}: {exc}") from exc
    here = f"{where}: tenant {tenant_id!r}"
    data = entry.get("data")
    if not isinstance(data, str) or not data.strip():
        raise ManifestError(f"{here}: 'data' must be a path or URI, got {data!r}")
    if _is_local(data):
        local = Path(data.removeprefix("file://")).expanduser()
        resolved = local if local.is_absolute() else folder / local
        if check_data and not resolved.exists():
            raise ManifestError(f"{here}: data {data!r} not found (looked for {resolved})")
        if not (data.startswith("file://") and local.is_absolute()):
            data = str(resolved)
    shots = entry.get("shots", defaults.get("shots"))
    method = entry.get("method", defaults.get("method"))
    cfg = _config(entry["config"], folder, here) if "config" in entry else default_cfg
    columns = {k: entry[k] if k in entry else defaults[k] for k in COLUMN_KEYS if k in entry or k in defaults}
    try:
        return TenantSpec(tenant_id, data, shots, method, cfg, **columns)
    except ConfigError as exc:
        raise ManifestError(f"{here}: {exc}") from exc


def _config(value: Any, folder: Path, where: str) -> RecipeConfig | None:
    if value is None:
        return None
    try:
        if isinstance(value, str):
            path = Path(value).expanduser()
            path = path if path.is_absolute() else folder / path
            if not path.is_file():
                raise ManifestError(f"{where}: config {value!r} not found (looked for {path})")
            return RecipeConfig.from_yaml(path)
        if isinstance(value, dict):
            return RecipeConfig.from_dict(value)
    except ManifestError:
        raise
    except ConfigError as exc:
        raise ManifestError(f"{where}: config: {exc}") from exc
    raise ManifestError(f"{where}: 'config' must be a recipe YAML path or a mapping, got {value!r}")


def _no_unknown(mapping: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    unknown = sorted(str(k) for k in mapping if k not in allowed)
    if unknown:
        raise ManifestError(f"{where}: unknown key(s) {unknown}; expected some of {list(allowed)}")


def _is_local(data: str) -> bool:
    return "://" not in data or data.startswith("file://")


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())
