"""The `adistill` command line. The CLI owns the terminal: progress bars, tables, one-line errors."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from adistill.config import METHODS, TEACHER_STRATEGIES, RecipeConfig, TrainConfig
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


def parse_resources(value: str | None, flag: str) -> Any:
    """A JSON resources flag such as '{"CPU": 1, "GPU": 0.25}' (None when not given)."""
    try:
        return json.loads(value) if value else None
    except json.JSONDecodeError as exc:
        raise ConfigError(f'{flag} must be JSON like \'{{"CPU": 1, "GPU": 0.25}}\': {exc}') from exc


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
    from adistill.jobs import TenantJob, load_job_data, run_job

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out} exists and is not empty")
    job = TenantJob(args.tenant, args.data, recipe_from_args(args))
    backbone = load_backbone(args.backbone)
    storage_options = parse_storage_options(args.storage_option)
    data = load_job_data(job, storage_options)
    teachers: list[Any] = []
    extra = None
    if args.teachers and job.config.method in ("distill", "fusion"):
        artifacts = [load_artifact(t, backbone) for t in args.teachers]
        teachers, lineage = teachers_for(job, data, backbone, artifacts, selection_from_args(args))
        extra = {"teacher_selection": lineage}
        sys.stderr.write(f"teachers ({lineage['strategy']}): {', '.join(lineage['chosen'])}\n")
    files, result = run_job(job, backbone, teachers, storage_options, epoch_bar(job.tenant_id), extra=extra, data=data)
    save_artifact(files, out)
    summary = {"tenant_id": job.tenant_id, "method": job.config.method, "out": str(out), **result.metrics}
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0


def selection_from_args(args: argparse.Namespace) -> Any:
    from adistill.teachers import SelectionConfig

    return SelectionConfig(args.teacher_select, args.teacher_k, args.teacher_max_all, seed=args.teacher_seed)


def teachers_for(
    job: Any, data: Any, backbone: Any, artifacts: list[Any], cfg: Any
) -> tuple[list[Any], dict[str, Any]]:
    """At most `cfg.k` of the given teacher artifacts, chosen by `cfg.strategy` (adistill.teachers)."""
    from adistill.teachers import Candidate, choose

    by_id = {a.tenant_id: a for a in artifacts}
    if len(by_id) != len(artifacts):
        raise ConfigError("--teachers lists two artifacts of the same tenant; give one version per tenant")
    selection = choose(
        [Candidate(a.tenant_id, a.version, a.meta) for a in artifacts],
        cfg,
        job.tenant_id,
        backbone,
        data.train.texts,
        data.train.labels,
        lambda c: by_id[c.tenant_id].as_teacher().adapters,
        job.config.max_length,
    )
    return [by_id[c.tenant_id].as_teacher() for c in selection.chosen], selection.lineage()


def cmd_evaluate(args: argparse.Namespace) -> int:
    from adistill.artifacts import load_artifact
    from adistill.backbone import load_backbone
    from adistill.data import read_tenant_data
    from adistill.recipes.evaluate import evaluate

    if args.manifest is not None or args.registry is not None:
        if args.manifest is None or args.registry is None or args.artifact or args.data:
            raise ConfigError("evaluate takes either MANIFEST --registry URI, or --artifact DIR --data PATH")
        return cmd_evaluate_manifest(args)
    if not args.artifact or not args.data:
        raise ConfigError("evaluate needs MANIFEST --registry URI, or --artifact DIR --data PATH")
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
    from adistill.backbone import load_backbone
    from adistill.engine import Engine

    if not args.texts:
        raise ConfigError("predict needs at least one TEXT")
    if not 1 <= args.top_k <= 100:
        raise ConfigError(f"--top-k must be in [1, 100], got {args.top_k}")
    backbone = load_backbone(args.backbone)
    model = _load_for_predict(args, backbone).model
    for text, p in zip(args.texts, Engine(backbone).predict(args.texts, [model] * len(args.texts), args.top_k)):
        sys.stdout.write(json.dumps({"text": text, **p.to_dict()}) + "\n")
    return 0


def _registry(args: argparse.Namespace) -> Any:
    from adistill.registry import Registry

    return Registry(args.registry, parse_storage_options(args.storage_option))


def _load_for_predict(args: argparse.Namespace, backbone: Any) -> Any:
    """`--artifact DIR`, or `--registry URI --tenant ID [--version N]`: a verified artifact on `backbone`."""
    from adistill.artifacts import load_artifact

    if args.registry is None:
        if args.tenant is not None or args.version is not None:
            raise ConfigError("--tenant and --version go with --registry, not --artifact")
        return load_artifact(args.artifact, backbone)
    if args.tenant is None:
        raise ConfigError("--registry needs --tenant ID")
    return _registry(args).get(args.tenant, backbone, args.version)


def _accuracy(meta: dict[str, Any]) -> tuple[float | None, str]:
    """The recorded accuracy of an artifact: test split, else validation."""
    metrics = meta.get("metrics") or {}
    for split in ("test", "validation"):
        value = (metrics.get(split) or {}).get("accuracy")
        if isinstance(value, (int, float)):
            return float(value), split
    return None, ""


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


def cmd_registry_ls(args: argparse.Namespace) -> int:
    registry = _registry(args)
    rows, records, failed = [], [], 0
    for tenant_id in registry.tenants():
        try:
            meta = registry.meta(tenant_id)
        except AdistillError as exc:
            failed += 1
            rows.append([tenant_id, "?", "unreadable", "", str(exc)])
            records.append({"tenant_id": tenant_id, "error": str(exc)})
            continue
        acc, split = _accuracy(meta)
        rows.append(
            [
                tenant_id,
                str(meta["version"]),
                str(meta.get("method")),
                f"{acc:.3f} ({split})" if acc is not None else "-",
                f"{meta['backbone']['name']} ({meta['backbone']['fingerprint'][:12]})",
            ]
        )
        records.append(
            {
                "tenant_id": tenant_id,
                "version": meta["version"],
                "method": meta.get("method"),
                "accuracy": acc,
                "split": split or None,
                "backbone": meta["backbone"]["name"],
                "backbone_fingerprint": meta["backbone"]["fingerprint"],
            }
        )
    if args.json:
        sys.stdout.write(json.dumps(records, indent=2) + "\n")
    elif rows:
        sys.stdout.write(_table(["TENANT", "LATEST", "METHOD", "ACCURACY", "BACKBONE"], rows) + "\n")
    else:
        sys.stdout.write(f"no tenants in {registry.uri}\n")
    if failed:
        sys.stderr.write(f"adistill registry ls: {failed} tenant(s) unreadable\n")
    return 1 if failed else 0


def cmd_registry_show(args: argparse.Namespace) -> int:
    registry = _registry(args)
    meta = registry.meta(args.tenant, args.version)
    if args.json:
        sys.stdout.write(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return 0
    versions = registry.versions(args.tenant)
    metrics = meta.get("metrics") or {}
    scores = []
    for split in ("test", "validation"):
        m = metrics.get(split) or {}
        if "accuracy" in m:
            scores.append(f"{split} accuracy {m['accuracy']:.4f} ({int(m.get('examples', 0))} examples)")
        if "oos_recall" in m:
            scores.append(f"{split} oos recall {m['oos_recall']:.4f}")
    if metrics.get("seconds"):
        scores.append("seconds " + ", ".join(f"{k} {v}" for k, v in metrics["seconds"].items()))
    teachers = ", ".join(f"{t['tenant_id']} v{t.get('version')}" for t in meta.get("teachers") or []) or "-"
    adapter, backbone, params = meta.get("adapter") or {}, meta["backbone"], meta.get("parameters") or {}
    data, files, labels = meta.get("data") or {}, meta.get("files") or {}, list(meta.get("labels") or [])
    lines = [
        ("tenant", meta["tenant_id"]),
        ("version", f"{meta['version']} (versions: {', '.join(map(str, versions))}; latest {max(versions)})"),
        ("uri", f"{registry.uri}/tenants/{meta['tenant_id']}/v{meta['version']:06d}"),
        ("method", meta.get("method")),
        ("created_at", meta.get("created_at")),
        (
            "backbone",
            f"{backbone['name']} (fingerprint {backbone['fingerprint'][:12]}, {backbone['parameters']} params)",
        ),
        (
            "adapter",
            f"{adapter.get('kind')}, reduction factor {adapter.get('reduction_factor')}, "
            f"bottleneck {adapter.get('bottleneck')}",
        ),
        ("labels", f"{len(labels)}: {', '.join(labels[:8])}{' ...' if len(labels) > 8 else ''}"),
        (
            "parameters",
            f"{params.get('added')} added ({params.get('percent_of_backbone')}% of the backbone), "
            f"{params.get('stored')} stored",
        ),
        ("metrics", "; ".join(scores) or "-"),
        ("teachers", teachers),
        (
            "data",
            f"{data.get('source')} (fingerprint {str(data.get('fingerprint'))[:12]}, "
            f"{data.get('train_examples')} train examples, shots {data.get('shots') or '-'})",
        ),
        (
            "size",
            f"{sum(f['bytes'] for f in files.values())} bytes of weights + "
            f"{len(json.dumps(meta, indent=2, sort_keys=True)) + 1} bytes of metadata",
        ),
    ]
    lines += [("file", f"{name}  {f['bytes']} bytes  sha256 {f['sha256'][:16]}") for name, f in sorted(files.items())]
    width = max(len(k) for k, _ in lines)
    sys.stdout.write("\n".join(f"{k + ':':<{width + 1}} {v}" for k, v in lines) + "\n")
    return 0


def cmd_registry_publish(args: argparse.Namespace) -> int:
    from adistill.artifacts import parse_meta, read_dir

    files = read_dir(args.artifact)
    tenant_id = args.tenant or parse_meta(files.get("adapter_config.json", b""), args.artifact)["tenant_id"]
    registry = _registry(args)
    version = registry.publish(tenant_id, files)
    sys.stdout.write(f"published {tenant_id} version {version} to {registry.uri}\n")
    return 0


def cmd_registry_rm(args: argparse.Namespace) -> int:
    registry = _registry(args)
    try:
        versions = registry.versions(args.tenant)
    except AdistillError:  # a corrupt tenant can still be removed as a whole
        if args.version is not None:
            raise
        versions = []
    registry.delete(args.tenant, args.version)
    if args.version is None:
        sys.stdout.write(
            f"deleted tenant {args.tenant} (versions: {', '.join(map(str, versions)) or 'none'}) from {registry.uri}\n"
        )
    else:
        latest = registry.latest_version(args.tenant)
        after = f"latest is now {latest}" if latest is not None else "no versions left: tenant removed"
        sys.stdout.write(f"deleted {args.tenant} version {args.version} from {registry.uri}; {after}\n")
    return 0


def cmd_evaluate_manifest(args: argparse.Namespace) -> int:
    """Every tenant of a manifest, from the registry, on its data: accuracy, parameters %, bytes."""
    from adistill.backbone import load_backbone
    from adistill.data import read_tenant_data
    from adistill.errors import TenantNotFound
    from adistill.manifest import load_manifest
    from adistill.recipes.evaluate import evaluate

    manifest = load_manifest(args.manifest)
    registry = _registry(args)
    storage_options = parse_storage_options(args.storage_option)
    backbone = load_backbone(args.backbone, storage_options=storage_options)
    reports: list[dict[str, Any]] = []
    for spec in manifest.tenants:
        report: dict[str, Any] = {"tenant_id": spec.id, "data": spec.data}
        try:
            artifact = registry.get(spec.id, backbone)
            seed = int((artifact.meta.get("hyperparameters") or {}).get("seed", 0))
            data = read_tenant_data(spec.data, storage_options, seed=seed)
            split = data.test if len(data.test) else data.validation
            report.update(
                version=artifact.version,
                method=artifact.method,
                split="test" if len(data.test) else "validation",
                **evaluate(backbone, artifact.model, split, artifact.model.max_length),
                percent_of_backbone=artifact.meta["parameters"]["percent_of_backbone"],
                artifact_bytes=sum(f["bytes"] for f in artifact.meta["files"].values()),
                status="ok",
            )
        except AdistillError as exc:
            report.update(status="missing" if isinstance(exc, TenantNotFound) else "error", error=str(exc))
        reports.append(report)
    ok = [r for r in reports if r["status"] == "ok"]
    average = sum(r["accuracy"] for r in ok) / len(ok) if ok else None
    rows = [
        [
            r["tenant_id"],
            str(r.get("version", "-")),
            str(r.get("method", "-")),
            r.get("split", "-"),
            f"{r['accuracy']:.4f}" if r["status"] == "ok" else "-",
            f"{r['percent_of_backbone']:.3f}" if r["status"] == "ok" else "-",
            str(r.get("artifact_bytes", "-")),
            r["status"] if r["status"] == "ok" else f"{r['status']}: {r['error']}",
        ]
        for r in reports
    ]
    header = ["TENANT", "VERSION", "METHOD", "SPLIT", "ACCURACY", "PARAMS%", "BYTES", "STATUS"]
    sys.stdout.write(_table(header, rows) + "\n")
    if average is not None:
        sys.stdout.write(f"average accuracy over {len(ok)} tenant(s): {average:.4f}\n")
    if args.json:
        result = {"registry": registry.uri, "manifest": manifest.path, "average_accuracy": average, "tenants": reports}
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if len(ok) == len(reports) else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from adistill.demo import run_demo

    run_demo(Path(args.out), quick=args.quick, echo=lambda line: sys.stdout.write(line + "\n"))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from adistill.serve import ServeConfig, run_until_interrupted

    changes: dict[str, Any] = {"registry": args.registry, "storage_options": parse_storage_options(args.storage_option)}
    for name in ("backbone", "replicas", "max_batch_size", "cache_bytes", "poll_interval_s"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    config = ServeConfig.from_dict(changes)
    sys.stderr.write(f"adistill serve: http://{args.host}:{args.port} (docs at /docs); Ctrl-C to stop\n")
    try:
        run_until_interrupted(config, args.host, args.port, args.address)
    except KeyboardInterrupt:
        sys.stderr.write("adistill serve: stopped\n")
    return 0


def cmd_onboard(args: argparse.Namespace) -> int:
    """Train and publish every tenant of a manifest on Ray Train; a summary table; exit 1 if any tenant failed."""
    from adistill.manifest import load_manifest

    manifest = load_manifest(args.manifest)  # every manifest error is raised here, before Ray or any training
    resources = parse_resources(args.resources_per_tenant, "--resources-per-tenant")
    import ray

    from adistill.onboard import OnboardOptions, onboard_manifest, summary_table
    from adistill.registry import Registry

    storage_options = parse_storage_options(args.storage_option)
    options = OnboardOptions(
        backbone=args.backbone,
        max_concurrent=args.max_concurrent,
        resources_per_tenant=resources,
        storage_path=args.storage_path,
        storage_options=storage_options,
        max_failures=args.max_failures,
        teacher_selection=selection_from_args(args),
    )
    registry = Registry(args.registry, storage_options)
    recipe = RecipeConfig.from_yaml(args.config) if args.config else RecipeConfig()
    if not ray.is_initialized():
        ray.init(address=args.address, log_to_driver=args.verbose)
    start = time.monotonic()

    def line(event: Any) -> None:
        d = event.detail
        if "epoch" in d:
            text = f"{event.status} epoch {d['epoch']}/{d['epochs']} loss {d['loss']:.3f} val {d['val_accuracy']:.3f}"
        else:
            text = " ".join([event.status, *(f"{k}={v}" for k, v in d.items() if v is not None)])
        sys.stderr.write(f"[{time.monotonic() - start:7.1f}s] {event.tenant_id}: {text}\n")

    outcomes = onboard_manifest(manifest, registry, recipe, args.method, options, line)
    sys.stdout.write(summary_table(outcomes) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps([o.to_dict() for o in outcomes], indent=2) + "\n")
    return 1 if any(o.status == "failed" for o in outcomes) else 0


def cmd_tune(args: argparse.Namespace) -> int:
    """Ray Tune over stage 2 for one tenant (or one shared config for several); best config as a recipe YAML."""
    from adistill.manifest import load_manifest
    from adistill.tune_space import load_space

    space = load_space(args.space)  # space and manifest errors are raised here, before Ray or any training
    manifest = load_manifest(args.manifest)
    if (args.tenant is None) == (args.tenants is None):
        raise ConfigError("tune needs exactly one of --tenant ID or --tenants ID1,ID2,...")
    tenant_ids = [args.tenant] if args.tenant else [t.strip() for t in args.tenants.split(",") if t.strip()]
    for tenant_id in tenant_ids:
        manifest.tenant(tenant_id)
    resources = parse_resources(args.resources_per_worker, "--resources-per-worker")
    import ray

    from adistill.registry import Registry
    from adistill.search import TuneOptions, save_recipe, tune_tenants

    storage_options = parse_storage_options(args.storage_option)
    options = TuneOptions(
        backbone=args.backbone,
        samples=args.samples,
        max_concurrent=args.max_concurrent,
        scheduler=args.scheduler,
        search=args.search,
        storage_path=args.storage_path,
        storage_options=storage_options,
        name=args.name,
        resources_per_worker=resources,
        seed=args.seed,
        time_budget_s=args.time_budget_s,
        teacher_selection=selection_from_args(args),
    )
    base = RecipeConfig.from_yaml(args.config) if args.config else RecipeConfig()
    if not ray.is_initialized():
        ray.init(address=args.address, log_to_driver=args.verbose)
    start = time.monotonic()

    def line(event: Any) -> None:
        d = event.detail
        if event.status == "epoch":
            text = f"epoch {d['training_iteration']} val {d['val_accuracy']:.4f} (epoch {d['epoch_val_accuracy']:.4f})"
        else:
            text = " ".join([event.status, *(f"{k}={v}" for k, v in d.items() if v is not None)])
        who = f"trial {event.trial_id}" if event.trial_id else "tune"
        sys.stderr.write(f"[{time.monotonic() - start:7.1f}s] {who}: {text}\n")

    outcome = tune_tenants(manifest, tenant_ids, space, Registry(args.registry, storage_options), base, options, line)
    recipe = save_recipe(outcome, args.save_config or Path("tune_spaces") / "results" / f"{outcome.name}.yaml")
    rows = [
        [
            t.trial_id,
            t.status,
            "-" if t.val_accuracy is None else f"{t.val_accuracy:.4f}",
            f"{t.epochs_run}/{outcome.max_epochs}" + (" (stopped)" if t.stopped_early else ""),
            ", ".join(
                f"{k.split('.')[-1]}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.params.items()
            ),
        ]
        for t in outcome.trials
    ]
    sys.stdout.write(_table(["TRIAL", "STATUS", "VAL_ACC", "EPOCHS", "PARAMS"], rows) + "\n")
    stage1 = ", ".join(f"{k} {v:.4f}" for k, v in outcome.stage1_val_accuracy.items())
    sys.stdout.write(f"best {outcome.best_metric:.4f} (stage 1 alone: {stage1}): {json.dumps(outcome.best_params)}\n")
    sys.stdout.write(f"best recipe: {recipe} (use with --config); experiment: {outcome.path}\n")
    if args.json:
        Path(args.json).write_text(json.dumps({**outcome.to_dict(), "recipe": str(recipe)}, indent=2) + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adistill", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--backbone", default=None, help="HF folder, s3:// URI or all-MiniLM-L6-v2 (default)")
        p.add_argument("--storage-option", action="append", metavar="KEY=VALUE", help="fsspec option (repeatable)")

    def teacher_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--teacher-select", choices=TEACHER_STRATEGIES, default="similar", help="teacher selector")
        p.add_argument("--teacher-k", type=int, default=10, help="at most this many teachers per tenant (default 10)")
        p.add_argument("--teacher-max-all", type=int, default=32, help="'all' is refused above this many teachers")
        p.add_argument("--teacher-seed", type=int, default=0, help="seed of --teacher-select random (default 0)")

    p = sub.add_parser("train", help="train one tenant from its data into an artifact folder")
    p.add_argument("--data", required=True, help="file or folder (parquet/csv/jsonl), local or s3://")
    p.add_argument("--tenant", required=True, help="tenant id")
    p.add_argument("--out", required=True, help="artifact folder to create")
    p.add_argument("--method", choices=METHODS, default=None)
    p.add_argument("--teachers", nargs="*", default=[], help="artifact folders of earlier tenants (candidates)")
    teacher_args(p)
    p.add_argument("--shots", type=int, default=None, help="few-shot: training examples per label")
    p.add_argument("--epochs", type=int, default=None, help="epochs of every stage")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--config", default=None, help="recipe YAML (see docs/method.md)")
    common(p)
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
    common(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="top-k labels for each TEXT, one JSON line each")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--artifact", help="an artifact folder")
    source.add_argument("--registry", help="registry URI (with --tenant)")
    p.add_argument("--tenant", default=None, help="tenant id in --registry")
    p.add_argument("--version", type=int, default=None, help="version in --registry (default: latest)")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("texts", nargs="*", metavar="TEXT")
    common(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("registry", help="list, show or delete published tenants")
    registry_sub = p.add_subparsers(dest="registry_command", required=True)

    def registry_common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--registry", required=True, help="registry URI: folder, file://, s3://bucket/prefix")
        q.add_argument("--storage-option", action="append", metavar="KEY=VALUE", help="fsspec option (repeatable)")

    q = registry_sub.add_parser("ls", help="every tenant: latest version, method, accuracy, backbone")
    q.add_argument("--json", action="store_true", help="JSON instead of a table")
    registry_common(q)
    q.set_defaults(func=cmd_registry_ls)
    q = registry_sub.add_parser("show", help="a version's metadata: method, metrics, teachers, sizes, files")
    q.add_argument("tenant")
    q.add_argument("--version", type=int, default=None, help="default: the latest")
    q.add_argument("--json", action="store_true", help="the whole adapter_config.json")
    registry_common(q)
    q.set_defaults(func=cmd_registry_show)
    q = registry_sub.add_parser("publish", help="publish an artifact folder as the tenant's next version")
    q.add_argument("artifact", help="artifact folder (adistill train --out)")
    q.add_argument("--tenant", default=None, help="default: the tenant id recorded in the artifact")
    registry_common(q)
    q.set_defaults(func=cmd_registry_publish)
    q = registry_sub.add_parser("rm", help="delete a tenant, or one version of it")
    q.add_argument("tenant")
    q.add_argument("--version", type=int, default=None, help="only this version (the latest moves back)")
    registry_common(q)
    q.set_defaults(func=cmd_registry_rm)

    p = sub.add_parser("onboard", help="train and publish every tenant of a manifest, in parallel on Ray Train")
    p.add_argument("manifest", help="tenants manifest YAML (docs/onboarding.md)")
    p.add_argument("--registry", required=True, help="registry URI: folder, file://, s3://bucket/prefix")
    p.add_argument("--method", choices=METHODS, default=None, help="for tenants whose manifest sets no method")
    p.add_argument("--config", default=None, help="recipe YAML (a manifest config, yours or its defaults', wins)")
    p.add_argument("--max-concurrent", type=int, default=2, help="tenants training at once (default 2)")
    p.add_argument("--resources-per-tenant", default=None, help='JSON, e.g. \'{"CPU": 1, "GPU": 0.25}\'')
    p.add_argument("--address", default=None, help="Ray cluster to join (e.g. auto); default: the job's or a new one")
    p.add_argument("--storage-path", default=None, help="run checkpoints: folder or s3:// (default ~/ray_results)")
    p.add_argument("--max-failures", type=int, default=2, help="retries of a crashed worker (default 2)")
    teacher_args(p)
    p.add_argument("--json", default=None, help="also write the outcomes to this file")
    common(p)
    p.set_defaults(func=cmd_onboard)

    p = sub.add_parser("tune", help="Ray Tune search over stage-2 settings (docs/tuning.md); best config as a recipe")
    p.add_argument("manifest", help="tenants manifest YAML")
    p.add_argument("--tenant", default=None, help="the tenant to tune for")
    p.add_argument("--tenants", default=None, help="ID1,ID2,...: one shared config, mean validation accuracy")
    p.add_argument("--space", required=True, help="search space YAML (tune_spaces/)")
    p.add_argument("--registry", required=True, help="registry URI holding the teachers")
    p.add_argument("--config", default=None, help="base recipe YAML (the space's `fixed` and params go on top)")
    p.add_argument("--samples", type=int, default=None, help="trials (default: the space's `samples`)")
    p.add_argument("--max-concurrent", type=int, default=2, help="trials at once (default 2)")
    p.add_argument("--scheduler", choices=["asha", "fifo"], default="asha")
    p.add_argument("--search", choices=["optuna", "random"], default="optuna")
    p.add_argument("--seed", type=int, default=0, help="search seed (default 0)")
    p.add_argument("--time-budget-s", type=float, default=None, help="stop the search after this many seconds")
    p.add_argument("--name", default=None, help="experiment name (default: derived from the inputs; reruns resume)")
    p.add_argument("--storage-path", default=None, help="experiment storage: folder or s3:// (default ~/ray_results)")
    p.add_argument("--resources-per-worker", default=None, help='JSON, e.g. \'{"CPU": 1, "GPU": 0.25}\'')
    p.add_argument("--address", default=None, help="Ray cluster to join (e.g. auto); default: a local instance")
    p.add_argument("--save-config", default=None, help="best recipe YAML (default tune_spaces/results/NAME.yaml)")
    teacher_args(p)
    p.add_argument("--json", default=None, help="also write best_config, best_metric and every trial here")
    common(p)
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("demo", help="the main job on embedded defaults (CLINC150 + all-MiniLM-L6-v2)")
    p.add_argument("--out", default="demo-out", help="working folder (artifacts, report)")
    p.add_argument("--quick", action="store_true", help="a smaller run (fewer teachers and epochs)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("serve", help="serve every tenant of a registry over HTTP (Ray Serve) until Ctrl-C")
    p.add_argument("--registry", required=True, help="registry URI: folder, file://, s3://bucket/prefix")
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--replicas", type=int, default=None, help="encoder replicas (default 1)")
    p.add_argument("--address", default=None, help="Ray cluster to join (e.g. auto); default: a local instance")
    p.add_argument("--max-batch-size", type=int, default=None, help="rows per encoder forward (default 32)")
    p.add_argument("--cache-bytes", type=int, default=None, help="loaded tenants per replica, bytes")
    p.add_argument("--poll-interval-s", type=float, default=None, help="registry poll for new versions (5 s)")
    common(p)
    p.set_defaults(func=cmd_serve)
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
