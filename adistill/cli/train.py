"""`adistill train`, `evaluate` and `predict`: one tenant at a time, in this process."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adistill.cli.common import (
    add_storage_args,
    add_teacher_args,
    backbone_from_args,
    epoch_bar,
    recipe_from_args,
    registry_from_args,
    selection_from_args,
    storage_options,
)
from adistill.config import METHODS
from adistill.errors import AdistillError, ConfigError

if TYPE_CHECKING:
    from adistill.backbone import Backbone
    from adistill.store.artifact import Artifact


def cmd_train(args: argparse.Namespace) -> int:
    from adistill.recipes.tenant import TenantJob, load_job_data, run_job
    from adistill.selection import ArtifactPool, choose_teachers
    from adistill.store.artifact import load_artifact, save_artifact

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out} exists and is not empty")
    job = TenantJob(args.tenant, args.data, recipe_from_args(args))
    backbone = backbone_from_args(args)
    options = storage_options(args)
    data = load_job_data(job, options)
    teachers: list[Any] = []
    extra = None
    if args.teachers and job.config.method in ("distill", "fusion"):
        pool = ArtifactPool(load_artifact(t, backbone) for t in args.teachers)
        selection = choose_teachers(pool, job.tenant_id, backbone, job.config, selection_from_args(args), data)
        teachers = [pool.load(c) for c in selection.chosen]
        lineage = selection.lineage()
        extra = {"teacher_selection": lineage}
        sys.stderr.write(f"teachers ({lineage['strategy']}): {', '.join(lineage['chosen'])}\n")
    files, result = run_job(job, backbone, teachers, options, epoch_bar(job.tenant_id), extra=extra, data=data)
    save_artifact(files, out)
    summary = {"tenant_id": job.tenant_id, "method": job.config.method, "out": str(out), **result.metrics}
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0


def evaluate_artifact(backbone: Backbone, artifact: Artifact, data_uri: str, options: dict[str, Any]) -> dict[str, Any]:
    """`reports.evaluation_report` of `artifact` on the data at `data_uri`, split with the seed it was trained with
    (so a carved validation split is the one it never trained on)."""
    from adistill.data import read_tenant_data
    from adistill.recipes.evaluate import evaluate
    from adistill.reports import evaluation_report

    seed = int((artifact.meta.get("hyperparameters") or {}).get("seed", 0))
    data = read_tenant_data(data_uri, options, seed=seed)
    return evaluation_report(
        artifact.meta, data, lambda split: evaluate(backbone, artifact.model, split, artifact.model.max_length)
    )


def cmd_evaluate(args: argparse.Namespace) -> int:
    from adistill.store.artifact import load_artifact

    if args.manifest is not None or args.registry is not None:
        if args.manifest is None or args.registry is None or args.artifact or args.data:
            raise ConfigError("evaluate takes either MANIFEST --registry URI, or --artifact DIR --data PATH")
        return cmd_evaluate_manifest(args)
    if not args.artifact or not args.data:
        raise ConfigError("evaluate needs MANIFEST --registry URI, or --artifact DIR --data PATH")
    backbone = backbone_from_args(args)
    artifact = load_artifact(args.artifact, backbone)
    report = {
        "tenant_id": artifact.tenant_id,
        **evaluate_artifact(backbone, artifact, args.data, storage_options(args)),
    }
    text = json.dumps(report, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    sys.stdout.write(text + "\n")
    return 0


def cmd_evaluate_manifest(args: argparse.Namespace) -> int:
    """Every tenant of a manifest, from the registry, on its data: accuracy, parameters %, bytes."""
    from adistill.errors import TenantNotFound
    from adistill.manifest import load_manifest
    from adistill.reports import average_accuracy, evaluation_table

    manifest = load_manifest(args.manifest)
    registry = registry_from_args(args)
    options = storage_options(args)
    backbone = backbone_from_args(args)
    reports: list[dict[str, Any]] = []
    for spec in manifest.tenants:
        report: dict[str, Any] = {"tenant_id": spec.id, "data": spec.data}
        try:
            artifact = registry.get(spec.id, backbone)
            report.update(version=artifact.version, **evaluate_artifact(backbone, artifact, spec.data, options))
            report["status"] = "ok"
        except AdistillError as exc:
            report.update(status="missing" if isinstance(exc, TenantNotFound) else "error", error=str(exc))
        reports.append(report)
    sys.stdout.write(evaluation_table(reports) + "\n")
    if args.json:
        result = {
            "registry": registry.uri,
            "manifest": manifest.path,
            "average_accuracy": average_accuracy(reports),
            "tenants": reports,
        }
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(r["status"] == "ok" for r in reports) else 1


def cmd_predict(args: argparse.Namespace) -> int:
    from adistill.inference.engine import Engine

    if not args.texts:
        raise ConfigError("predict needs at least one TEXT")
    if not 1 <= args.top_k <= 100:
        raise ConfigError(f"--top-k must be in [1, 100], got {args.top_k}")
    backbone = backbone_from_args(args)
    model = _load_for_predict(args, backbone).model
    for text, p in zip(args.texts, Engine(backbone).predict(args.texts, [model] * len(args.texts), args.top_k)):
        sys.stdout.write(json.dumps({"text": text, **p.to_dict()}) + "\n")
    return 0


def _load_for_predict(args: argparse.Namespace, backbone: Backbone) -> Artifact:
    """`--artifact DIR`, or `--registry URI --tenant ID [--version N]`: a verified artifact on `backbone`."""
    from adistill.store.artifact import load_artifact

    if args.registry is None:
        if args.tenant is not None or args.version is not None:
            raise ConfigError("--tenant and --version go with --registry, not --artifact")
        return load_artifact(args.artifact, backbone)
    if args.tenant is None:
        raise ConfigError("--registry needs --tenant ID")
    return registry_from_args(args).get(args.tenant, backbone, args.version)


def add_parser(sub: Any) -> None:
    """`train`, `evaluate` and `predict` on the `adistill` subparsers."""
    p = sub.add_parser("train", help="train one tenant from its data into an artifact folder")
    p.add_argument("--data", required=True, help="file or folder (parquet/csv/jsonl), local or s3://")
    p.add_argument("--tenant", required=True, help="tenant id")
    p.add_argument("--out", required=True, help="artifact folder to create")
    p.add_argument("--method", choices=METHODS, default=None)
    p.add_argument("--teachers", nargs="*", default=[], help="artifact folders of earlier tenants (candidates)")
    add_teacher_args(p)
    p.add_argument("--shots", type=int, default=None, help="few-shot: training examples per label")
    p.add_argument("--epochs", type=int, default=None, help="epochs of every stage")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--config", default=None, help="recipe YAML (see docs/method.md)")
    add_storage_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "evaluate",
        help="accuracy (test split, else validation) of every manifest tenant in a registry, or of one artifact",
    )
    p.add_argument("manifest", nargs="?", default=None, help="tenants manifest YAML (with --registry)")
    p.add_argument("--registry", default=None, help="registry URI: folder, file://, s3://bucket/prefix")
    p.add_argument("--artifact", default=None, help="an artifact folder (with --data)")
    p.add_argument("--data", default=None, help="the data to evaluate --artifact on")
    p.add_argument("--json", default=None, help="also write the report to this file")
    add_storage_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="top-k labels for each TEXT, one JSON line each")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--artifact", help="an artifact folder")
    source.add_argument("--registry", help="registry URI (with --tenant)")
    p.add_argument("--tenant", default=None, help="tenant id in --registry")
    p.add_argument("--version", type=int, default=None, help="version in --registry (default: latest)")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("texts", nargs="*", metavar="TEXT")
    add_storage_args(p)
    p.set_defaults(func=cmd_predict)
