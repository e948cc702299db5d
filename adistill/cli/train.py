"""`adistill train`, `evaluate` and `predict`: one tenant at a time, in this process."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adistill.cli.common import (
    add_data_args,
    add_precision_arg,
    add_storage_args,
    add_teacher_args,
    backbone_from_args,
    data_columns,
    epoch_bar,
    existing_registry,
    recipe_from_args,
    selection_from_args,
    storage_options,
    text_bar,
    write_json_line,
)
from adistill.config import METHODS
from adistill.errors import AdistillError, ConfigError, CorruptArtifact
from adistill.reports import rounded

if TYPE_CHECKING:
    from adistill.backbone import Backbone
    from adistill.data import TenantData
    from adistill.store.artifact import Artifact
    from adistill.store.registry import Registry


def cmd_train(args: argparse.Namespace) -> int:
    from adistill.recipes.tenant import TenantJob, load_job_data, run_job
    from adistill.store.artifact import save_artifact

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out} exists and is not empty")
    if args.teachers and args.teacher_registry:
        raise ConfigError("give teachers as --teachers DIR ... or --teacher-registry URI, not both")
    _refuse_registry_as_teachers(args.teachers)
    if args.method in ("distill", "fusion") and not (args.teachers or args.teacher_registry):
        raise ConfigError(
            f"--method {args.method} needs teachers: give --teachers DIR ... or --teacher-registry URI, "
            "or train without them with --method adapter"
        )
    registry = existing_registry_at(args, args.teacher_registry) if args.teacher_registry else None
    job = TenantJob(args.tenant, args.data, recipe_from_args(args), *data_columns(args))
    options = storage_options(args)
    data = load_job_data(job, options)  # data errors come before the encoder loads
    backbone = backbone_from_args(args)
    teachers: list[Any] = []
    extra = None
    if job.config.method in ("distill", "fusion"):
        selection = _choose(args, job, backbone, data, registry)
        if selection is not None:
            teachers = selection[0]
            extra = {"teacher_selection": selection[1]}
        elif args.method is not None or job.config.method == "fusion":
            where = f"registry {registry.uri} holds no adapter on this backbone" if registry else "none were given"
            raise ConfigError(
                f"method {job.config.method} needs teachers and {where}: give --teachers DIR ... or "
                "--teacher-registry URI, or train without them with --method adapter"
            )
        else:  # the recipe's default, distill: say what runs instead of mislabelling it
            sys.stderr.write(
                "adistill train: no teachers, so this tenant is trained with method 'adapter' (stage 1 alone); "
                "give --teachers DIR ... or --teacher-registry URI to distil\n"
            )
            job.config = job.config.replace(method="adapter")
    bars = epoch_bar(job.tenant_id)
    try:
        files, result = run_job(job, backbone, teachers, options, bars, extra=extra, data=data)
    finally:
        bars.close()
    save_artifact(files, out)
    summary = {
        "tenant_id": job.tenant_id,
        "method": result.model.method,
        "out": str(out),
        "out_of_scope_calibrated": result.model.oos_threshold is not None,
        **result.metrics,
    }
    write_json_line(summary)
    return 0


def _refuse_registry_as_teachers(folders: list[str]) -> None:
    """`--teachers` takes artifact folders; a registry given there gets the flag that takes it."""
    from adistill.store.names import CONFIG

    for folder in folders:
        path = Path(folder)
        if (path / "tenants").is_dir() and not (path / CONFIG).exists():
            raise ConfigError(f"--teachers {folder} is a registry, not an artifact folder: use --teacher-registry")


def existing_registry_at(args: argparse.Namespace, uri: str) -> Any:
    """`existing_registry` for a registry given by another flag than --registry."""
    return existing_registry(argparse.Namespace(registry=uri, storage_option=getattr(args, "storage_option", None)))


def _choose(
    args: argparse.Namespace, job: Any, backbone: Backbone, data: Any, registry: Any
) -> tuple[list[Any], dict[str, Any]] | None:
    """The teachers `choose_teachers` picks among `--teachers` folders or a `--teacher-registry`'s adapters on this
    backbone (the tenant itself excluded), with their lineage; None when there is no candidate."""
    from adistill.selection import ArtifactPool, RegistryPool, TeacherPool, choose_teachers
    from adistill.store.artifact import load_artifact

    pool: TeacherPool
    if registry is not None:
        published = registry.adapters_for(backbone.fingerprint, exclude=[job.tenant_id])
        if not published:
            return None
        pool = RegistryPool(registry, published, backbone)
    elif args.teachers:
        pool = ArtifactPool(load_artifact(t, backbone) for t in args.teachers)
    else:
        return None
    selection = choose_teachers(pool, job.tenant_id, backbone, job.config, selection_from_args(args), data)
    if not selection.chosen:
        return None
    lineage = selection.lineage()
    sys.stderr.write(f"teachers ({lineage['strategy']}): {', '.join(lineage['chosen'])}\n")
    return [pool.load(c) for c in selection.chosen], lineage


def evaluate_artifact(
    backbone: Backbone, artifact: Artifact, data: TenantData, desc: str = "evaluate"
) -> dict[str, Any]:
    """`reports.evaluation_report` of `artifact` on its tenant's `data` (`artifact_data`), with a progress bar."""
    from adistill.recipes.evaluate import evaluate
    from adistill.reports import evaluation_report

    model = artifact.model

    def score(split: Any) -> dict[str, Any]:
        total = len(split.in_scope()) + (len(split.out_of_scope()) if model.oos_threshold is not None else 0)
        bar = text_bar(f"{desc} {artifact.tenant_id}", total)
        try:
            return evaluate(backbone, model, split, model.max_length, bar.update)
        finally:
            bar.close()

    return evaluation_report(artifact.meta, data, score)


def artifact_data(
    meta: dict[str, Any], uri: str, options: dict[str, Any], columns: tuple[str, str] | None = None
) -> TenantData:
    """The data at `uri` split with the seed the artifact was trained with (so a carved validation split is the one
    it never trained on), read with `columns`, else the ones it recorded, else text/label."""
    from adistill.data import read_tenant_data

    seed = int((meta.get("hyperparameters") or {}).get("seed", 0))
    recorded = (meta.get("data") or {}).get("columns") or {}
    text, label = columns or (recorded.get("text", "text"), recorded.get("label", "label"))
    return read_tenant_data(uri, options, seed, text, label)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from adistill.store.artifact import load_artifact, parse_meta, read_dir
    from adistill.store.names import CONFIG

    if args.manifest is not None or args.registry is not None:
        if args.manifest is None or args.registry is None or args.artifact or args.data:
            raise ConfigError("evaluate takes either MANIFEST --registry URI, or --artifact DIR --data PATH")
        if args.text_column or args.label_column:
            raise ConfigError("with a manifest, column names go in it (text_column, label_column), not in flags")
        return cmd_evaluate_manifest(args)
    if not args.artifact or not args.data:
        raise ConfigError("evaluate needs MANIFEST --registry URI, or --artifact DIR --data PATH")
    files = read_dir(args.artifact)
    if CONFIG not in files:
        raise CorruptArtifact(f"{args.artifact}: missing {CONFIG}")
    meta = parse_meta(files[CONFIG], args.artifact)
    flags = (args.text_column, args.label_column)
    columns = data_columns(args, (meta.get("data") or {}).get("columns")) if any(flags) else None
    data = artifact_data(meta, args.data, storage_options(args), columns)  # before the encoder loads
    backbone = backbone_from_args(args)
    artifact = load_artifact(args.artifact, backbone)
    report = {"tenant_id": artifact.tenant_id, **evaluate_artifact(backbone, artifact, data)}
    if args.json:
        Path(args.json).write_text(json.dumps(rounded(report), indent=2) + "\n")
    write_json_line(report, indent=2)
    return 0


def cmd_evaluate_manifest(args: argparse.Namespace) -> int:
    """Every tenant of a manifest, from the registry, on its data: accuracy, parameters %, bytes. Every tenant's
    data is read first (a bad one is reported, the others go on), then the encoder loads."""
    from adistill.errors import TenantNotFound
    from adistill.manifest import load_manifest
    from adistill.reports import average_accuracy, evaluation_table

    manifest = load_manifest(args.manifest)
    registry = existing_registry(args)
    options = storage_options(args)
    reports: list[dict[str, Any]] = []
    ready: list[tuple[dict[str, Any], int, TenantData]] = []
    for spec in manifest.tenants:
        report: dict[str, Any] = {"tenant_id": spec.id, "data": spec.data}
        try:
            meta = registry.meta(spec.id)
            columns = (spec.text_column, spec.label_column)
            ready.append((report, int(meta["version"]), artifact_data(meta, spec.data, options, columns)))
        except AdistillError as exc:
            report.update(status="missing" if isinstance(exc, TenantNotFound) else "error", error=str(exc))
        reports.append(report)
    backbone = backbone_from_args(args) if ready else None
    for report, version, data in ready:
        assert backbone is not None
        try:
            artifact = registry.get(report["tenant_id"], backbone, version)
            report.update(version=artifact.version, **evaluate_artifact(backbone, artifact, data))
            report["status"] = "ok"
        except AdistillError as exc:
            report.update(status="error", error=str(exc))
    sys.stdout.write(evaluation_table(reports) + "\n")
    if args.json:
        result = {
            "registry": registry.uri,
            "manifest": manifest.path,
            "average_accuracy": average_accuracy(reports),
            "tenants": reports,
        }
        Path(args.json).write_text(json.dumps(rounded(result), indent=2) + "\n")
    return 0 if all(r["status"] == "ok" for r in reports) else 1


def cmd_predict(args: argparse.Namespace) -> int:
    from adistill.inference.engine import Engine

    texts = list(args.texts)
    if not texts and not sys.stdin.isatty():  # `... | adistill predict ...`: one text per line
        texts = [line.strip() for line in sys.stdin if line.strip()]
    if not texts:
        raise ConfigError("predict needs at least one TEXT, as arguments or one per line on stdin")
    if not 1 <= args.top_k <= 100:
        raise ConfigError(f"--top-k must be in [1, 100], got {args.top_k}")
    registry = _predict_registry(args)
    backbone = backbone_from_args(args)
    if registry is None:
        model = load_artifact_folder(args.artifact, backbone).model
    else:
        model = registry.get(args.tenant, backbone, args.version).model
    for text, p in zip(texts, Engine(backbone).predict(texts, [model] * len(texts), args.top_k)):
        sys.stdout.write(json.dumps({"text": text, **p.to_dict()}) + "\n")
    return 0


def load_artifact_folder(folder: str, backbone: Backbone) -> Artifact:
    from adistill.store.artifact import load_artifact

    return load_artifact(folder, backbone)


def _predict_registry(args: argparse.Namespace) -> Registry | None:
    """`--registry URI --tenant ID [--version N]` (checked before the encoder loads), or None for `--artifact DIR`."""
    if args.registry is None:
        if args.tenant is not None or args.version is not None:
            raise ConfigError("--tenant and --version go with --registry, not --artifact")
        return None
    if args.tenant is None:
        raise ConfigError("--registry needs --tenant ID")
    registry = existing_registry(args)
    registry.meta(args.tenant, args.version)  # an unknown tenant or version is refused before the encoder loads
    return registry


def add_parser(sub: Any) -> None:
    """`train`, `evaluate` and `predict` on the `adistill` subparsers."""
    p = sub.add_parser("train", help="train one tenant from its data into an artifact folder")
    p.add_argument("--data", required=True, help="file or folder (parquet/csv/jsonl), local or s3://")
    add_data_args(p)
    p.add_argument("--tenant", required=True, help="tenant id")
    p.add_argument("--out", required=True, help="artifact folder to create")
    p.add_argument(
        "--method",
        choices=METHODS,
        default=None,
        help="default: the recipe's (distill), or adapter when there are no teachers",
    )
    p.add_argument("--teachers", nargs="*", default=[], help="artifact folders of earlier tenants (candidates)")
    p.add_argument(
        "--teacher-registry",
        default=None,
        metavar="URI",
        help="or: a registry whose published adapters on this backbone are the candidates",
    )
    add_teacher_args(p)
    p.add_argument("--shots", type=int, default=None, help="few-shot: training examples per label")
    p.add_argument("--epochs", type=int, default=None, help="epochs of every stage")
    p.add_argument(
        "--seed", type=int, default=None, help="seed of the validation split, few-shot sample and training (default 0)"
    )
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
    add_data_args(p, ", or the artifact's")
    p.add_argument("--json", default=None, help="also write the report to this file")
    add_precision_arg(p)
    add_storage_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="top-k labels for each TEXT (or each line of stdin), one JSON line each")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--artifact", help="an artifact folder")
    source.add_argument("--registry", help="registry URI (with --tenant)")
    p.add_argument("--tenant", default=None, help="tenant id in --registry")
    p.add_argument("--version", type=int, default=None, help="version in --registry (default: latest)")
    p.add_argument("--top-k", type=int, default=3, help="labels per text, best first (1-100, default 3)")
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to label; none: one per line from stdin")
    add_precision_arg(p)
    add_storage_args(p)
    p.set_defaults(func=cmd_predict)
