"""Validated, frozen configuration dataclasses. Dicts (YAML, CLI, JSON) become these once, at the edge.

Every configuration class of adistill is a frozen dataclass deriving from `Config`, so they all validate alike:

    @dataclass(frozen=True)
    class PoolOptions(Config):
        size: int = 2                            # an int, never a bool or a float
        ratio: float = 0.5                       # an int or a float, finite, never a bool
        mode: Literal["fast", "safe"] = "fast"   # one of the listed values
        limits: dict[str, float] | None = None   # null, or a mapping of strings to numbers

        def check(self) -> None:                 # range rules; types are already checked here
            at_least(self, 1, "size")
            require(0 < self.ratio < 1, f"ratio must be in (0, 1), got {self.ratio!r}")

The API:

- `PoolOptions(...)`: `__post_init__` runs `check_types(self)` (every field against its annotation), then
  `self.check()`. Both raise `ConfigError`; messages start with the field name ("size must be an integer, got
  True"), so that `from_dict` can say where a nested field sits ("pool.size ...").
- `PoolOptions.from_dict(data, where="")`: build from a mapping (YAML, JSON, CLI flags). Unknown keys and
  missing required keys are `ConfigError`s; a mapping given for a nested `Config` field overrides that field's
  default part by part; a list given for a tuple field becomes a tuple. `where` is the dotted path of this
  mapping inside a larger document ("stage1"), put in front of every message.
- `to_dict()` (plain dicts, `dataclasses.asdict`) and `replace(**changes)` (validated again).
- Class attributes a subclass may set: `label` ("serve config") prefixes every message of a top-level config;
  `none_means_default` names fields for which `from_dict` reads None (an empty YAML value) as "use the default".
- Helpers for `check()`: `require(condition, message)`, `at_least(config, minimum, *names)`; `check_types(config)`
  is the type check on its own. Put rules in `check()`: a subclass that defines `__post_init__` must call
  `super().__post_init__()`.

Annotations understood: bool, int, float, str, Any, `Literal[...]`, `X | None` (and other unions), `dict[K, V]`,
`Mapping[K, V]`, `list[X]`, `tuple[X, ...]`, nested `Config` classes and any other class (an isinstance check).
They must be importable at run time (not only under TYPE_CHECKING): they are resolved with `get_type_hints`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, Union, cast, get_args, get_origin, get_type_hints

import yaml

from adistill.errors import ConfigError

AdapterKind = Literal["seq_bn", "houlsby"]
Pooling = Literal["mean", "cls"]
Method = Literal["adapter", "distill", "fusion", "finetune"]
TeacherFit = Literal["joint", "fitted"]
Keep = Literal["best", "last", "average"]
Ties = Literal["earlier", "later"]
METHODS: tuple[str, ...] = get_args(Method)
TEACHER_STRATEGIES = ("all", "random", "similar", "probe")  # adistill.selection

# Where each adapter kind puts a bottleneck inside a transformer layer.
ADAPTER_SITES: dict[str, tuple[str, ...]] = {"seq_bn": ("ffn",), "houlsby": ("attn", "ffn")}

C = TypeVar("C", bound="Config")


class Config:
    """Base of every frozen configuration dataclass: type checks from the annotations, then `check()`.
    See the module docstring for the API."""

    label: ClassVar[str] = ""  # e.g. "serve config": prefixes every message of this (top-level) config
    none_means_default: ClassVar[tuple[str, ...]] = ()  # fields where from_dict reads None as "the default"

    def __post_init__(self) -> None:
        try:
            check_types(self)
            self.check()
        except ConfigError as exc:
            if not self.label:
                raise
            raise ConfigError(f"{self.label}: {exc}") from exc

    def check(self) -> None:
        """Range rules and rules across fields; raise `ConfigError` with a message naming the field first."""

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any], where: str = "") -> C:
        """Build from a mapping; unknown or missing keys are errors, nested mappings override nested defaults."""
        return _build(cls, data, where, None)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(cast(Any, self))

    def replace(self: C, **changes: Any) -> C:
        return cast(C, dataclasses.replace(cast(Any, self), **changes))


def from_dict(cls: type[C], data: Mapping[str, Any], where: str = "") -> C:
    """`cls.from_dict(data, where)`, for callers that hold the class in a variable."""
    return cls.from_dict(data, where)


def require(condition: bool, message: str) -> None:
    """Raise `ConfigError(message)` unless `condition`."""
    if not condition:
        raise ConfigError(message)


def at_least(config: Config, minimum: float, *names: str) -> None:
    """Each named field is None or >= `minimum`."""
    for name in names:
        value = getattr(config, name)
        require(value is None or value >= minimum, f"{name} must be >= {minimum}, got {value!r}")


def check_types(config: Config) -> None:
    """Check every field of `config` against its annotation; `ConfigError` naming the first field that fails."""
    hints = _hints(type(config))
    for f in dataclasses.fields(cast(Any, config)):
        problem = _mismatch(getattr(config, f.name), hints[f.name], f.name)
        if problem:
            raise ConfigError(problem)


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of `cls`, computed once per class."""
    if cls not in _HINTS:
        try:
            _HINTS[cls] = get_type_hints(cls)
        except NameError as exc:
            raise TypeError(f"{cls.__name__}: cannot resolve a field annotation at run time ({exc})") from exc
    return _HINTS[cls]


def _mismatch(value: Any, tp: Any, path: str) -> str | None:
    """Why `value` does not fit the annotation `tp` (a message naming `path`), or None when it fits."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any or tp is object:
        return None
    if origin is Union or origin is types.UnionType:
        if value is None:
            return None if type(None) in args else f"{path} must be {_describe(tp)}, got None"
        arms = [a for a in args if a is not type(None)]
        problems = [_mismatch(value, a, path) for a in arms]
        if None in problems:
            return None
        kind = _container(arms[0]) if len(arms) == 1 else None
        if kind is not None and isinstance(value, kind):
            return problems[0]  # the right kind of container holding a wrong item: name the item
        return f"{path} must be {_describe(tp)}, got {value!r}"
    if origin is Literal:
        ok = any(value == a and type(value) is type(a) for a in args)
        return None if ok else f"{path} must be {_describe(tp)}, got {value!r}"
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return None if math.isfinite(value) else f"{path} must be a finite number, got {value!r}"
        return f"{path} must be a number, got {value!r}{_yaml_hint(value)}"
    if tp is int and isinstance(value, bool):
        return f"{path} must be an integer, got {value!r}"
    kind = _container(tp)
    if kind is not None:
        if not isinstance(value, kind):
            return f"{path} must be {_describe(tp)}, got {value!r}"
        return _item_mismatch(value, kind, args, path)
    if isinstance(tp, type):
        return None if isinstance(value, tp) else f"{path} must be {_describe(tp)}, got {value!r}"
    return None  # an annotation this checker does not understand: not checked


def _item_mismatch(value: Any, kind: type, args: tuple[Any, ...], path: str) -> str | None:
    if kind is tuple and len(args) == 2 and args[1] is Ellipsis:
        args = (args[0],)
    elif kind is tuple and args:
        if len(value) != len(args):
            return f"{path} must have {len(args)} items, got {value!r}"
        return next(filter(None, (_mismatch(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))), None)
    if not args:
        return None
    if kind in (list, tuple):
        return next(filter(None, (_mismatch(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))), None)
    for key, item in value.items():
        problem = _mismatch(key, args[0], f"{path} key {key!r}") or _mismatch(item, args[1], f"{path}[{key!r}]")
        if problem:
            return problem
    return None


def _container(tp: Any) -> type | None:
    """The runtime class of a dict/Mapping/list/tuple annotation, else None."""
    origin = get_origin(tp) or tp
    return cast(type, origin) if origin in (dict, Mapping, list, tuple) else None


def _describe(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin is Union or origin is types.UnionType:
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return f"one of {list(args)}"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    if tp in names:
        return names[tp]
    kind = _container(tp)
    if kind is not None:
        return "a list" if kind in (list, tuple) else "a mapping"
    name = str(getattr(tp, "__name__", tp))
    return f"{'an' if name[:1] in 'AEIOUaeiou' else 'a'} {name}"


def _yaml_hint(value: Any) -> str:
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return ""
        return " (a string: YAML reads 1e-4 without a dot as text, write 1.0e-4)"
    return ""


def _build(cls: type[C], data: Mapping[str, Any], where: str, base: C | None) -> C:
    """`cls` from `data`; fields missing from `data` come from `base` when given, else from their defaults."""
    name = where or cls.label or cls.__name__
    if not isinstance(data, Mapping):
        raise ConfigError(f"{name}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cast(Any, cls)) if f.init}
    unknown = sorted(str(k) for k in data if k not in fields)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {name}; expected some of {sorted(fields)}")
    values = {k: v for k, v in data.items() if not (v is None and k in cls.none_means_default)}
    if base is None:
        missing = [n for n, f in fields.items() if n not in values and _required(f)]
        if missing:
            raise ConfigError(f"missing required key(s) {missing} in {name}")
    hints = _hints(cls)
    for key, value in values.items():
        path = f"{where}.{key}" if where else key
        nested = _nested_class(hints[key])
        if nested is not None and isinstance(value, Mapping):
            default = getattr(base, key) if base is not None else _default(fields[key])
            values[key] = _build(nested, value, path, default if isinstance(default, nested) else None)
        elif _container(hints[key]) is tuple and isinstance(value, list):
            values[key] = tuple(value)
    try:
        return cast(Any, cls)(**values) if base is None else base.replace(**values)
    except ConfigError as exc:
        if not where:
            raise
        raise _within(where, exc, fields) from exc


def _required(f: dataclasses.Field[Any]) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _default(f: dataclasses.Field[Any]) -> Any:
    return f.default if f.default_factory is dataclasses.MISSING else f.default_factory()


def _nested_class(tp: Any) -> type[Config] | None:
    """The Config class a field holds (`Sub` or `Sub | None`), else None."""
    for arm in get_args(tp) if get_origin(tp) in (Union, types.UnionType) else (tp,):
        if isinstance(arm, type) and issubclass(arm, Config):
            return arm
    return None


def _within(where: str, exc: ConfigError, fields: Mapping[str, Any]) -> ConfigError:
    """`exc` with `where` in front: "stage1.epochs must be..." when it names a field, else "where: ..."."""
    message = str(exc)
    head = re.match(r"[A-Za-z_]\w*", message)
    return ConfigError(f"{where}.{message}" if head and head.group() in fields else f"{where}: {message}")


@dataclass(frozen=True)
class AdapterConfig(Config):
    """Bottleneck adapter shape. `seq_bn` (Pfeiffer): one after the FFN output; `houlsby`: also after attention."""

    kind: AdapterKind = "seq_bn"
    reduction_factor: int = 16

    def check(self) -> None:
        at_least(self, 1, "reduction_factor")

    @property
    def sites(self) -> tuple[str, ...]:
        return ADAPTER_SITES[self.kind]

    def bottleneck(self, hidden_size: int) -> int:
        return max(1, hidden_size // self.reduction_factor)

    def __str__(self) -> str:
        """As people read it (and as JSON keys show it, e.g. /metrics' adapter banks): `seq_bn, reduction 16`."""
        return f"{self.kind}, reduction {self.reduction_factor}"


@dataclass(frozen=True)
class TrainConfig(Config):
    """One optimisation stage: AdamW, early stop after `patience` epochs without a new best validation accuracy
    (null: run every epoch). `keep`: the weights the stage returns: `best`, the best validation epoch's; `last`, the
    last epoch's; `average`, the mean of every epoch's weights (trained parameters only). `ties`: which of the epochs
    that equal the best validation accuracy is the best one (the one `best` keeps and patience counts from):
    `earlier`, the first to reach it; `later`, the latest to match it (validation sets of a few queries per label
    move in coarse steps, so ties are common)."""

    epochs: int = 40
    lr: float = 1e-3
    batch_size: int = 32
    weight_decay: float = 0.0
    patience: int | None = 10
    keep: Keep = "best"
    ties: Ties = "earlier"

    def check(self) -> None:
        at_least(self, 1, "epochs", "batch_size", "patience")
        require(0 < self.lr < 1, f"lr must be in (0, 1), got {self.lr!r}")
        at_least(self, 0, "weight_decay")


@dataclass(frozen=True)
class DistillConfig(Config):
    """Stage-2 loss: α·CE(student) + (1-α)·τ²·KL(teacher‖student) + β·CE(teacher) + γ·Σ_l MSE(hidden).

    `teacher`: `joint` trains the fusion teacher together with the student (its β·CE term on the labelled rows), as
    the paper does; `fitted` first fits the fusion alone on the labelled rows (cross-entropy, the stage-2 settings,
    early stopping on validation), then freezes it while the student learns from it, so the teacher's targets on
    transfer rows are those of a trained model from the first step (β then has no effect)."""

    temperature: float = 2.0
    alpha: float = 0.5
    beta: float = 1.0
    gamma: float = 0.0
    detach_teacher: bool = True
    teacher: TeacherFit = "joint"

    def check(self) -> None:
        require(self.temperature > 0, f"temperature must be > 0, got {self.temperature!r}")
        require(0.0 <= self.alpha <= 1.0, f"alpha must be in [0, 1], got {self.alpha!r}")
        at_least(self, 0, "beta", "gamma")


Augmentation = Literal["none", "dropout", "mask", "swap", "mixed"]


@dataclass(frozen=True)
class TransferConfig(Config):
    """Stage 2's transfer set: the tenant's unlabelled queries, which get only the teacher→student terms (KD and, with
    γ > 0, the hidden-state term). Each stage-2 batch holds `stage2.batch_size` labelled rows and `ratio` times as
    many unlabelled ones; an epoch draws at most `max_per_epoch` unlabelled rows (a fresh seeded sample each epoch).
    `augment` (opt in, used only when the tenant brought no unlabelled queries): `augment_copies` perturbed copies
    of every labelled query (token dropout, masking, word-order swaps, or a mix) serve as the transfer set.
    `student_noise` (noisy student; 0 turns it off): each word-piece of a transfer row is hidden from the student with
    this probability (its attention mask zeroed; never [CLS] or [SEP]), while the teacher sees the whole query. The
    default 0.2 was measured on CLINC150 (docs/method.md, "A noisy student"); it does nothing without a transfer set.
    `neighbours` (0 turns it off): each transfer row's distillation target is mixed, with weight `neighbour_weight`,
    with the mean target of its `neighbours` nearest transfer rows in the frozen encoder's sentence space (queries
    that read alike get alike targets; `recipes/transfer.py`, `NeighbourTargets`).
    `keep`: the weights a stage that trains over a transfer set returns (stage 2, self-training; null: `stage2.keep`).
    The default `last` keeps the weights of the epoch where validation stopped improving (the stop is still
    `stage2`'s): 150 validation queries can tell when to stop but are too coarse to pick among epochs
    (benchmarks/results/stopping.md; docs/method.md, "The weights of the stop")."""

    ratio: float = 3.0
    max_per_epoch: int | None = 1024
    augment: Augmentation = "none"
    augment_copies: int = 2
    augment_rate: float = 0.15
    student_noise: float = 0.2
    neighbours: int = 0
    neighbour_weight: float = 0.5
    keep: Keep | None = "last"

    def check(self) -> None:
        require(0 < self.ratio <= 64, f"ratio must be in (0, 64], got {self.ratio!r}")
        at_least(self, 1, "max_per_epoch", "augment_copies")
        require(0 < self.augment_rate < 1, f"augment_rate must be in (0, 1), got {self.augment_rate!r}")
        require(0 <= self.student_noise < 1, f"student_noise must be in [0, 1), got {self.student_noise!r}")
        at_least(self, 0, "neighbours")
        require(0 < self.neighbour_weight <= 1, f"neighbour_weight must be in (0, 1], got {self.neighbour_weight!r}")


@dataclass(frozen=True)
class RecipeConfig(Config):
    """Everything that decides how one tenant is trained (recorded in its artifact)."""

    method: Method = "distill"
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    pooling: Pooling = "mean"
    max_length: int = 32
    shots: int | None = None
    seed: int = 0
    stage1: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=40, lr=1e-3))
    # stage 2: at most 10 epochs, stopping 3 after the latest epoch that matches the best validation accuracy
    # (benchmarks/results/stopping.md: with a transfer set it keeps improving past the first best)
    stage2: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=10, lr=5e-4, patience=3, ties="later"))
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=20, lr=5e-5, patience=5))
    distill: DistillConfig = field(default_factory=DistillConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)

    def stage2_over(self, transfer_rows: int) -> TrainConfig:
        """The settings of a stage-2 style stage that trains over `transfer_rows` unlabelled rows: `stage2`, keeping
        `transfer.keep`'s weights when there are any."""
        if transfer_rows and self.transfer.keep is not None:
            return self.stage2.replace(keep=self.transfer.keep)
        return self.stage2

    def check(self) -> None:
        require(4 <= self.max_length <= 512, f"max_length must be in [4, 512], got {self.max_length!r}")
        require(self.shots is None or self.shots >= 1, f"shots must be null or >= 1, got {self.shots!r}")

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
