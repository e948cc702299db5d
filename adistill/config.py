"""Validated, frozen configuration dataclasses. Dicts (YAML, CLI, JSON) become these once, at the edge."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

import yaml

from adistill.errors import ConfigError

AdapterKind = Literal["seq_bn", "houlsby"]
Pooling = Literal["mean", "cls"]
Method = Literal["adapter", "distill", "fusion", "finetune"]
METHODS: tuple[str, ...] = get_args(Method)
TEACHER_STRATEGIES = ("all", "random", "similar", "probe")  # adistill.teachers

# Where each adapter kind puts a bottleneck inside a transformer layer.
ADAPTER_SITES: dict[str, tuple[str, ...]] = {"seq_bn": ("ffn",), "houlsby": ("attn", "ffn")}


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class AdapterConfig:
    """Bottleneck adapter shape. `seq_bn` (Pfeiffer): one after the FFN output; `houlsby`: also after attention."""

    kind: AdapterKind = "seq_bn"
    reduction_factor: int = 16

    def __post_init__(self) -> None:
        _check(
            self.kind in ADAPTER_SITES,
            f"adapter.kind must be one of {list(ADAPTER_SITES)}, got {self.kind!r}",
        )
        _check(
            isinstance(self.reduction_factor, int) and self.reduction_factor >= 1,
            f"adapter.reduction_factor must be an integer >= 1, got {self.reduction_factor!r}",
        )

    @property
    def sites(self) -> tuple[str, ...]:
        return ADAPTER_SITES[self.kind]

    def bottleneck(self, hidden_size: int) -> int:
        return max(1, hidden_size // self.reduction_factor)


@dataclass(frozen=True)
class TrainConfig:
    """One optimisation stage: AdamW, best epoch by validation accuracy, early stop after `patience` epochs."""

    epochs: int = 40
    lr: float = 1e-3
    batch_size: int = 32
    weight_decay: float = 0.0
    patience: int | None = 10

    def __post_init__(self) -> None:
        _check(isinstance(self.epochs, int) and self.epochs >= 1, f"epochs must be >= 1, got {self.epochs!r}")
        _check(0 < float(self.lr) < 1, f"lr must be in (0, 1), got {self.lr!r}")
        _check(
            isinstance(self.batch_size, int) and self.batch_size >= 1,
            f"batch_size must be >= 1, got {self.batch_size!r}",
        )
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay!r}")
        _check(
            self.patience is None or (isinstance(self.patience, int) and self.patience >= 1),
            f"patience must be null or >= 1, got {self.patience!r}",
        )


@dataclass(frozen=True)
class DistillConfig:
    """Stage-2 loss: α·CE(student) + (1-α)·τ²·KL(teacher‖student) + β·CE(teacher) + γ·Σ_l MSE(hidden)."""

    temperature: float = 2.0
    alpha: float = 0.5
    beta: float = 1.0
    gamma: float = 0.0
    detach_teacher: bool = True

    def __post_init__(self) -> None:
        _check(
            math.isfinite(self.temperature) and self.temperature > 0,
            f"distill.temperature must be > 0, got {self.temperature!r}",
        )
        _check(0.0 <= self.alpha <= 1.0, f"distill.alpha must be in [0, 1], got {self.alpha!r}")
        _check(self.beta >= 0, f"distill.beta must be >= 0, got {self.beta!r}")
        _check(self.gamma >= 0, f"distill.gamma must be >= 0, got {self.gamma!r}")


@dataclass(frozen=True)
class RecipeConfig:
    """Everything that decides how one tenant is trained (recorded in its artifact)."""

    method: Method = "distill"
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    pooling: Pooling = "mean"
    max_length: int = 32
    shots: int | None = None
    seed: int = 0
    stage1: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=40, lr=1e-3))
    stage2: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=40, lr=5e-4))
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=20, lr=5e-5, patience=5))
    distill: DistillConfig = field(default_factory=DistillConfig)

    def __post_init__(self) -> None:
        _check(self.method in METHODS, f"method must be one of {list(METHODS)}, got {self.method!r}")
        _check(self.pooling in ("mean", "cls"), f"pooling must be 'mean' or 'cls', got {self.pooling!r}")
        _check(
            isinstance(self.max_length, int) and 4 <= self.max_length <= 512,
            f"max_length must be in [4, 512], got {self.max_length!r}",
        )
        _check(
            self.shots is None or (isinstance(self.shots, int) and self.shots >= 1),
            f"shots must be null or >= 1, got {self.shots!r}",
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> RecipeConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RecipeConfig:
        return from_dict(cls, data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> RecipeConfig:
        try:
            data = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from exc
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"config {path}: expected a mapping at the top level, got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"config {path}: {exc}") from exc


T = TypeVar("T")


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from `data`, recursing into nested dataclasses; unknown keys are errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where or cls.__name__}; expected some of {sorted(fields)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        default = fields[name].default_factory
        nested = default() if default is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(nested) and not isinstance(nested, type) and isinstance(value, dict):
            kwargs[name] = from_dict(type(nested), {**dataclasses.asdict(nested), **value}, f"{where}{name}.")
        else:
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where or cls.__name__}: {exc}") from exc
