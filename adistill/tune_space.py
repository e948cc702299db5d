"""Search spaces for `adistill tune` (YAML files; `distill` and `smoke` ship in the package, `adistill/tune_spaces/`,
and are found by name), validated into frozen dataclasses. No Ray here.

    description: what this space is for            # optional
    samples: 16                                     # optional: default number of trials (--samples overrides)
    params:                                         # required: dotted recipe path -> one distribution
      distill.temperature: {loguniform: [1, 20]}    #   log-uniform float in [low, high], low > 0
      distill.alpha: {uniform: [0, 1]}              #   uniform float in [low, high]
      distill.gamma: {choice: [0.0, 0.1, 1.0]}      #   one of the listed values
      stage2.epochs: {int: [5, 20]}                 #   integer in [low, high], both ends included
    fixed:                                          # optional: a partial recipe (docs/method.md) applied first
      stage2: {epochs: 20, patience: null}
    asha: {grace_period: 2, reduction_factor: 2}    # optional: early stopping (with --scheduler asha)

Only stage-2 settings can be searched (`distill.*`, `stage2.*`, and the transfer set's `transfer.ratio`,
`transfer.max_per_epoch`, `transfer.student_noise`, `transfer.neighbours` and `transfer.neighbour_weight`): stage 1
is trained once per tenant and shared by every trial. Every range is checked against the recipe's own rules when the
file is loaded (α outside [0, 1], a negative β, lr >= 1... are refused before any training), and unknown keys or
distributions are errors naming them.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from adistill.config import Config, RecipeConfig, require
from adistill.errors import ConfigError

# What a trial may change, and the kind of value each one takes.
TUNABLE: dict[str, type] = {
    "distill.temperature": float,
    "distill.alpha": float,
    "distill.beta": float,
    "distill.gamma": float,
    "distill.detach_teacher": bool,
    "distill.teacher": str,
    "stage2.lr": float,
    "stage2.epochs": int,
    "stage2.batch_size": int,
    "stage2.weight_decay": float,
    "stage2.patience": int,
    "stage2.keep": str,
    "transfer.ratio": float,
    "transfer.max_per_epoch": int,
    "transfer.student_noise": float,
    "transfer.neighbours": int,
    "transfer.neighbour_weight": float,
    "transfer.keep": str,
}
NULLABLE = ("stage2.patience", "transfer.max_per_epoch", "transfer.keep")  # a choice may list null for these
DISTRIBUTIONS = ("loguniform", "uniform", "choice", "int")
TOP_KEYS = ("description", "samples", "params", "fixed", "asha")


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Param:
    """One searched setting: `path` (e.g. `distill.temperature`) drawn from `distribution`."""

    path: str
    distribution: str
    low: float | None = None
    high: float | None = None
    values: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        where = f"params.{self.path}"
        if self.path not in TUNABLE:
            raise ConfigError(f"{where}: not a tunable setting; expected one of {sorted(TUNABLE)}")
        kind = TUNABLE[self.path]
        if self.distribution not in DISTRIBUTIONS:
            raise ConfigError(f"{where}: unknown distribution {self.distribution!r}; expected one of {DISTRIBUTIONS}")
        if self.distribution == "choice":
            if not self.values:
                raise ConfigError(f"{where}: choice needs a non-empty list of values")
            for v in self.values:
                if kind is bool or kind is str:
                    ok = isinstance(v, kind)
                else:
                    ok = _number(v) and (kind is float or isinstance(v, int))
                if not ok and not (self.path in NULLABLE and v is None):
                    raise ConfigError(f"{where}: choice value {v!r} is not a valid {kind.__name__}")
            return
        if kind is bool:
            raise ConfigError(f"{where}: a true/false setting takes {{choice: [true, false]}}, not {self.distribution}")
        if kind is str:
            raise ConfigError(f"{where}: a named setting takes {{choice: [...]}}, not {self.distribution}")
        low, high = self.low, self.high
        if not (_number(low) and _number(high)):
            raise ConfigError(f"{where}: {self.distribution} needs [low, high] numbers, got [{low!r}, {high!r}]")
        assert low is not None and high is not None
        if not low < high:
            raise ConfigError(f"{where}: low must be below high, got [{low}, {high}]")
        if self.distribution == "loguniform" and low <= 0:
            raise ConfigError(f"{where}: loguniform needs low > 0, got {low}")
        if self.distribution == "int" and not (isinstance(low, int) and isinstance(high, int)):
            raise ConfigError(f"{where}: int needs integer bounds, got [{low!r}, {high!r}]")
        if kind is int and self.distribution != "int":
            raise ConfigError(
                f"{where}: an integer setting takes {{int: [low, high]}} or choice, not {self.distribution}"
            )
        if kind is float and self.distribution == "int":
            raise ConfigError(f"{where}: a real-valued setting takes uniform, loguniform or choice, not int")

    def candidates(self) -> tuple[Any, ...]:
        """The values that bound this parameter (its ends or its choices): each must make a valid recipe."""
        return self.values if self.distribution == "choice" else (self.low, self.high)

    def contains(self, value: Any) -> bool:
        if self.distribution == "choice":
            return any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in self.values)
        assert self.low is not None and self.high is not None
        if not _number(value):
            return False
        if self.distribution == "int" and value != int(value):
            return False
        return self.low <= value <= self.high

    def to_dict(self) -> dict[str, Any]:
        if self.distribution == "choice":
            return {"choice": list(self.values)}
        return {self.distribution: [self.low, self.high]}


@dataclass(frozen=True)
class AshaSettings(Config):
    """ASHA: a trial must reach `grace_period` epochs; at each rung only the top 1/`reduction_factor` continue."""

    grace_period: int = 1
    reduction_factor: float = 2.0

    def check(self) -> None:
        require(self.grace_period >= 1, f"grace_period must be >= 1, got {self.grace_period!r}")
        require(self.reduction_factor > 1, f"reduction_factor must be > 1, got {self.reduction_factor!r}")


@dataclass(frozen=True)
class SearchSpace(Config):
    """A validated search space: searched `params`, a partial recipe `fixed` applied under them, ASHA settings."""

    params: tuple[Param, ...]
    fixed: Mapping[str, Any] = field(default_factory=dict)
    samples: int = 16
    asha: AshaSettings = field(default_factory=AshaSettings)
    description: str = ""
    name: str = "space"

    def check(self) -> None:
        if not self.params:
            raise ConfigError("params: a search space needs at least one parameter")
        paths = [p.path for p in self.params]
        duplicated = sorted({p for p in paths if paths.count(p) > 1})
        if duplicated:
            raise ConfigError(f"params: {duplicated} listed more than once")
        require(self.samples >= 1, f"samples must be >= 1, got {self.samples!r}")
        if self.fixed.get("method", "distill") != "distill":
            raise ConfigError(f"fixed.method: tuning searches the distill method, got {self.fixed['method']!r}")
        for path in paths:
            section, key = path.split(".")
            if key in (self.fixed.get(section) or {}):
                raise ConfigError(f"fixed.{path}: also in params; a setting is either searched or fixed")
        base = self.apply(RecipeConfig())  # `fixed` alone makes a valid recipe...
        for p in self.params:  # ...and so does every end of every range
            for value in p.candidates():
                try:
                    self.apply(base, {p.path: value})
                except ConfigError as exc:
                    raise ConfigError(f"params.{p.path}: value {value!r} makes an invalid recipe: {exc}") from exc

    @property
    def paths(self) -> list[str]:
        return [p.path for p in self.params]

    def apply(self, base: RecipeConfig, values: Mapping[str, Any] | None = None) -> RecipeConfig:
        """`base` with `fixed` then `values` ({dotted path: value}) applied, as a distill recipe."""
        data = _merge(base.to_dict(), dict(self.fixed))
        for path, value in (values or {}).items():
            if path not in TUNABLE:
                raise ConfigError(f"{path!r} is not a tunable setting; expected one of {sorted(TUNABLE)}")
            section, key = path.split(".")
            data[section][key] = value
        data["method"] = "distill"
        return RecipeConfig.from_dict(data)

    def values_of(self, cfg: RecipeConfig) -> dict[str, Any]:
        """The searched settings' values in a recipe ({dotted path: value})."""
        return {p: getattr(getattr(cfg, p.split(".")[0]), p.split(".")[1]) for p in self.paths}

    def contains(self, values: Mapping[str, Any]) -> bool:
        """Every searched setting is present in `values` and inside its range."""
        return all(p.path in values and p.contains(values[p.path]) for p in self.params)

    def max_epochs(self, base: RecipeConfig) -> int:
        """The most stage-2 epochs any trial can run (ASHA's max_t)."""
        for p in self.params:
            if p.path == "stage2.epochs":
                return int(max(v for v in p.candidates() if v is not None))
        return self.apply(base).stage2.epochs

    def to_dict(self) -> dict[str, Any]:
        return {
            "description": self.description,
            "samples": self.samples,
            "params": {p.path: p.to_dict() for p in self.params},
            "fixed": copy.deepcopy(dict(self.fixed)),
            "asha": {"grace_period": self.asha.grace_period, "reduction_factor": self.asha.reduction_factor},
        }


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_param(path: str, spec: Any) -> Param:
    where = f"params.{path}"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(
            f"{where}: expected one distribution, e.g. {{loguniform: [1, 20]}}, {{uniform: [0, 1]}}, "
            f"{{choice: [0.0, 1.0]}} or {{int: [5, 20]}}; got {spec!r}"
        )
    ((distribution, args),) = spec.items()
    if distribution not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: unknown distribution {distribution!r}; expected one of {list(DISTRIBUTIONS)}")
    if not isinstance(args, list):
        raise ConfigError(f"{where}: {distribution} takes a list, got {args!r}")
    args = [_yaml_number(a) for a in args]
    if distribution == "choice":
        return Param(path, distribution, values=tuple(args))
    if len(args) != 2:
        raise ConfigError(f"{where}: {distribution} takes [low, high], got {args!r}")
    return Param(path, distribution, args[0], args[1])


def _yaml_number(value: Any) -> Any:
    """YAML 1.1 reads `1e-4` (no dot) as a string: accept it as the number it means."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def space_from_dict(data: Any, name: str = "space") -> SearchSpace:
    """Validate a parsed space file (unknown keys, distributions and ranges are ConfigErrors naming the key)."""
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping with 'params', got {type(data).__name__}")
    unknown = sorted(str(k) for k in data if k not in TOP_KEYS)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown}; expected some of {list(TOP_KEYS)}")
    params = data.get("params")
    if not isinstance(params, dict) or not params:
        raise ConfigError("'params' must be a non-empty mapping of setting -> distribution")
    unknown = sorted(str(k) for k in params if k not in TUNABLE)
    if unknown:
        raise ConfigError(f"unknown parameter(s) {unknown} in params; tunable: {sorted(TUNABLE)}")
    fixed = data.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise ConfigError(f"'fixed' must be a partial recipe mapping, got {fixed!r}")
    try:
        RecipeConfig.from_dict(fixed)
    except ConfigError as exc:
        raise ConfigError(f"fixed: {exc}") from exc
    return SearchSpace(
        params=tuple(parse_param(str(k), v) for k, v in params.items()),
        fixed=fixed,
        samples=data.get("samples", 16),
        asha=AshaSettings.from_dict(data.get("asha") or {}, "asha"),
        description=data.get("description") or "",
        name=name,
    )


def packaged_spaces() -> dict[str, Path]:
    """The search spaces shipped in the package (`adistill/tune_spaces/*.yaml`), by name: distill, smoke."""
    folder = Path(__file__).resolve().parent / "tune_spaces"
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def resolve_space(spec: str | Path) -> Path:
    """A space's file: `spec` itself when it is a file, else the packaged space of that name (`--space distill`)."""
    path = Path(spec)
    if path.is_file():
        return path
    packaged = packaged_spaces()
    if str(spec) in packaged:
        return packaged[str(spec)]
    if path.suffix in (".yaml", ".yml") or "/" in str(spec):
        return path  # a file that is not there: load_space says so
    raise ConfigError(f"search space {str(spec)!r}: no such file, nor a packaged space (packaged: {sorted(packaged)})")


def load_space(path: str | Path) -> SearchSpace:
    """Read and validate a search space: a YAML file, or the name of a packaged one (`packaged_spaces`)."""
    path = resolve_space(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"search space {path}: cannot read it ({exc.strerror or exc})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"search space {path}: invalid YAML: {' '.join(str(exc).split())}") from exc
    try:
        return space_from_dict(data, path.stem)
    except ConfigError as exc:
        raise ConfigError(f"search space {path}: {exc}") from exc
