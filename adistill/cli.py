"""The `adistill` command line. The CLI owns the terminal: progress bars, tables, one-line errors."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from adistill.config import METHODS, RecipeConfig, TrainConfig
from adistill.errors import AdistillError, ConfigError

log = logging.getLogger("adistill")


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


def recipe_from_args(args: argparse.Namespace) -> RecipeConfig:
    cfg = RecipeConfig.from_yaml(args.config) if getattr(args, "config", None) else RecipeConfig()
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


def cmd_train(args: argparse.Namespace) -> int:
    from adistill.artifacts import load_artifact, save_artifact
    from adistill.backbone import load_backbone
    from adistill.jobs import TenantJob, run_job

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out} exists and is not empty")
    job = TenantJob(args.tenant, args.data, recipe_from_args(args))
    backbone = load_backbone(args.backbone)
    teachers = [load_artifact(t, backbone).as_teacher() for t in args.teachers or []]
    files, result = run_job(
        job, backbone, teachers, parse_storage_options(args.storage_option), epoch_bar(job.tenant_id)
    )
    save_artifact(files, out)
    summary = {"tenant_id": job.tenant_id, "method": job.config.method, "out": str(out), **result.metrics}
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from adistill.artifacts import load_artifact
    from adistill.backbone import load_backbone
    from adistill.data import read_tenant_data
    from adistill.recipes.evaluate import evaluate

    backbone = load_backbone(args.backbone)
    artifact = load_artifact(args.artifact, backbone)
    data = read_tenant_data(args.data, parse_storage_options(args.storage_option))
    split = data.test if len(data.test) else data.validation
    report = {
        "tenant_id": artifact.tenant_id,
        "method": artifact.method,
        "split": "test" if len(data.test) else "validation",
        **evaluate(backbone, artifact.model, split, artifact.model.max_length),
        "percent_of_backbone": artifact.meta["parameters"]["percent_of_backbone"],
        "artifact_bytes": sum(f["bytes"] for f in artifact.meta["files"].values()),
    }
    text = json.dumps(report, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    sys.stdout.write(text + "\n")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from adistill.artifacts import load_artifact
    from adistill.backbone import load_backbone
    from adistill.engine import Engine

    if not args.texts:
        raise ConfigError("predict needs at least one TEXT")
    if not 1 <= args.top_k <= 100:
        raise ConfigError(f"--top-k must be in [1, 100], got {args.top_k}")
    backbone = load_backbone(args.backbone)
    model = load_artifact(args.artifact, backbone).model
    for text, p in zip(args.texts, Engine(backbone).predict(args.texts, [model] * len(args.texts), args.top_k)):
        sys.stdout.write(json.dumps({"text": text, **p.to_dict()}) + "\n")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from adistill.demo import run_demo

    run_demo(Path(args.out), quick=args.quick, echo=lambda line: sys.stdout.write(line + "\n"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adistill", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--backbone", default=None, help="HF folder, s3:// URI or all-MiniLM-L6-v2 (default)")
        p.add_argument("--storage-option", action="append", metavar="KEY=VALUE", help="fsspec option (repeatable)")

    p = sub.add_parser("train", help="train one tenant from its data into an artifact folder")
    p.add_argument("--data", required=True, help="file or folder (parquet/csv/jsonl), local or s3://")
    p.add_argument("--tenant", required=True, help="tenant id")
    p.add_argument("--out", required=True, help="artifact folder to create")
    p.add_argument("--method", choices=METHODS, default=None)
    p.add_argument("--teachers", nargs="*", default=[], help="artifact folders of earlier tenants")
    p.add_argument("--shots", type=int, default=None, help="few-shot: training examples per label")
    p.add_argument("--epochs", type=int, default=None, help="epochs of every stage")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--config", default=None, help="recipe YAML (see docs/method.md)")
    common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="accuracy of an artifact on data (test split, else validation)")
    p.add_argument("--artifact", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--json", default=None, help="also write the report to this file")
    common(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="top-k labels for each TEXT, one JSON line each")
    p.add_argument("--artifact", required=True)
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("texts", nargs="*", metavar="TEXT")
    common(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("demo", help="the main job on embedded defaults (CLINC150 + all-MiniLM-L6-v2)")
    p.add_argument("--out", default="demo-out", help="working folder (artifacts, report)")
    p.add_argument("--quick", action="store_true", help="a smaller run (fewer teachers and epochs)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()  # the CLI owns the terminal: no weight-loading reports
    transformers.logging.disable_progress_bar()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except (AdistillError, FileExistsError) as exc:
        sys.stderr.write(f"adistill {args.command}: error: {exc}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(f"adistill {args.command}: interrupted\n")
        return 130
