"""What several commands share: storage options, the backbone, resources and recipe flags, teacher-selection flags,
data column flags, the registry, progress bars, JSON output."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from adistill.config import TEACHER_STRATEGIES, RecipeConfig, TrainConfig
from adistill.errors import ConfigError

if TYPE_CHECKING:
    from adistill.backbone import Backbone
    from adistill.selection import SelectionConfig
    from adistill.store.registry import Registry


def add_storage_args(p: argparse.ArgumentParser, backbone: bool = True) -> None:
    """`--backbone` (unless `backbone=False`) and the repeatable `--storage-option KEY=VALUE`."""
    if backbone:
        p.add_argument("--backbone", default=None, help="HF folder, s3:// URI or all-MiniLM-L6-v2 (default)")
    p.add_argument("--storage-option", action="append", metavar="KEY=VALUE", help="fsspec option (repeatable)")


def add_teacher_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher-select", choices=TEACHER_STRATEGIES, default="similar", help="teacher selector")
    p.add_argument("--teacher-k", type=int, default=10, help="at most this many teachers per tenant (default 10)")
    p.add_argument("--teacher-max-all", type=int, default=32, help="'all' is refused above this many teachers")
    p.add_argument("--teacher-seed", type=int, default=0, help="seed of --teacher-select random (default 0)")


def parse_storage_options(pairs: list[str] | None) -> dict[str, Any]:
    """`key=value` pairs -> fsspec storage options (`client_kwargs.endpoint_url=...` nests)."""
    options: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"--storage-option expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        parsed: Any = {"true": True, "false": False}.get(value.lower(), value)
        target = options
        *parents, leaf = key.split(".")
        for p in parents:
            target = target.setdefault(p, {})
        target[leaf] = parsed
    return options


def storage_options(args: argparse.Namespace) -> dict[str, Any]:
    """The command's `--storage-option` flags, parsed."""
    return parse_storage_options(getattr(args, "storage_option", None))


def backbone_from_args(args: argparse.Namespace) -> Backbone:
    """The command's `--backbone`, loaded with its `--storage-option`s (an s3:// backbone needs them): every
    command that loads a backbone in this process goes through here."""
    from adistill.backbone import load_backbone

    return load_backbone(
        args.backbone, storage_options=storage_options(args), precision=getattr(args, "precision", None) or "fp32"
    )


def add_precision_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--precision",
        choices=("fp32", "int8"),
        default="fp32",
        help="the frozen encoder's precision: fp32 (default) or int8 (linear layers dynamically quantized, CPU; "
        "faster, accuracy in docs/serving.md)",
    )


def registry_from_args(args: argparse.Namespace) -> Registry:
    from adistill.store.registry import Registry

    return Registry(args.registry, storage_options(args))


def parse_resources(value: str | None, flag: str) -> Any:
    """A JSON resources flag such as '{"CPU": 1, "GPU": 0.25}' (None when not given)."""
    try:
        return json.loads(value) if value else None
    except json.JSONDecodeError as exc:
        raise ConfigError(f'{flag} must be JSON like \'{{"CPU": 1, "GPU": 0.25}}\': {exc}') from exc


def base_recipe(args: argparse.Namespace) -> RecipeConfig:
    """`--config` YAML, else the default recipe."""
    return RecipeConfig.from_yaml(args.config) if getattr(args, "config", None) else RecipeConfig()


def recipe_from_args(args: argparse.Namespace) -> RecipeConfig:
    """`base_recipe` with `--method`, `--shots`, `--seed` and `--epochs` (every stage) on top."""
    cfg = base_recipe(args)
    changes: dict[str, Any] = {}
    if getattr(args, "method", None):
        changes["method"] = args.method
    if getattr(args, "shots", None) is not None:
        changes["shots"] = args.shots
    if getattr(args, "seed", None) is not None:
        changes["seed"] = args.seed
    if getattr(args, "epochs", None) is not None:
        for stage in ("stage1", "stage2", "finetune"):
            base: TrainConfig = getattr(cfg, stage)
            changes[stage] = TrainConfig(**{**base.__dict__, "epochs": args.epochs})
    return cfg.replace(**changes) if changes else cfg


def selection_from_args(args: argparse.Namespace) -> SelectionConfig:
    from adistill.selection import SelectionConfig

    return SelectionConfig(
        strategy=args.teacher_select, k=args.teacher_k, max_all=args.teacher_max_all, seed=args.teacher_seed
    )


class EpochBars:
    """A tqdm bar per training stage, driven by the recipes' progress callback (`recipes.loop.Progress`). A bar
    counts the stage's first epoch from the stage's start (the event comes at the end of the epoch) and stays on
    screen when its stage ends; `close()` ends a bar left open by early stopping."""

    def __init__(self, desc: str) -> None:
        self.desc = desc
        self.bars: dict[str, Any] = {}

    def __call__(self, event: dict[str, object]) -> None:
        from tqdm import tqdm

        if "epochs" not in event:  # e.g. {"stage": "resumed"}: no epoch to count
            return
        stage = str(event["stage"])
        if stage not in self.bars:
            self.close()  # the previous stage stopped early
            bar = tqdm(total=int(str(event["epochs"])), desc=f"{self.desc} {stage}", unit="epoch", leave=True)
            bar.start_t -= float(str(event.get("seconds", 0.0)))  # tqdm starts now; the first epoch started earlier
            self.bars[stage] = bar
        bar = self.bars[stage]
        bar.update(1)
        bar.set_postfix(loss=f"{event['loss']:.3f}", val=f"{event['val_accuracy']:.3f}")
        if event["epoch"] == event["epochs"]:
            bar.close()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def epoch_bar(desc: str) -> EpochBars:
    """`EpochBars(desc)`: what `train` passes as the recipes' progress callback."""
    return EpochBars(desc)


def text_bar(desc: str, total: int) -> Any:
    """A tqdm bar over texts scored (`adistill evaluate`); its `update` is `recipes.evaluate.BatchProgress`."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="text", leave=False)


def add_data_args(p: argparse.ArgumentParser, default_note: str = "") -> None:
    """`--text-column` and `--label-column`: the names of the data's query and label columns."""
    p.add_argument(
        "--text-column", default=None, metavar="NAME", help=f"column holding the queries (default text{default_note})"
    )
    p.add_argument(
        "--label-column", default=None, metavar="NAME", help=f"column holding the labels (default label{default_note})"
    )


def data_columns(args: argparse.Namespace, recorded: dict[str, Any] | None = None) -> tuple[str, str]:
    """(text column, label column): the flags, else `recorded` (an artifact's `data.columns`), else text/label."""
    recorded = recorded or {}
    text = getattr(args, "text_column", None) or recorded.get("text") or "text"
    label = getattr(args, "label_column", None) or recorded.get("label") or "label"
    return str(text), str(label)


def existing_registry(args: argparse.Namespace) -> Registry:
    """`registry_from_args` for commands that only read: a registry that does not exist (a typo) is an error,
    not an empty registry."""
    registry = registry_from_args(args)
    if not registry.exists():
        raise ConfigError(
            f"registry {registry.uri} does not exist (nothing there); check the URI, or create it by publishing "
            "(adistill onboard, adistill registry publish)"
        )
    return registry


def write_json_line(obj: Any, indent: int | None = None) -> None:
    """`obj` as JSON on stdout, floats rounded for people (`reports.rounded`)."""
    from adistill.reports import rounded

    sys.stdout.write(json.dumps(rounded(obj), indent=indent) + "\n")
