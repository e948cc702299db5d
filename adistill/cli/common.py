"""What several commands share: storage options, the backbone, resources and recipe flags, teacher-selection flags,
the registry, progress bars."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
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

    return load_backbone(args.backbone, storage_options=storage_options(args))


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


def epoch_bar(desc: str) -> Callable[[dict[str, object]], None]:
    """A tqdm bar per training stage, driven by the recipes' progress callback."""
    from tqdm import tqdm

    bars: dict[str, Any] = {}

    def update(event: dict[str, object]) -> None:
        stage = str(event["stage"])
        if stage not in bars:
            bars[stage] = tqdm(total=int(event["epochs"]), desc=f"{desc} {stage}", unit="epoch", leave=False)  # type: ignore[call-overload]
        bar = bars[stage]
        bar.update(1)
        bar.set_postfix(loss=f"{event['loss']:.3f}", val=f"{event['val_accuracy']:.3f}")
        if event["epoch"] == event["epochs"]:
            bar.close()

    return update
