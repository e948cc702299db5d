"""`adistill tune`: a Ray Tune search over stage-2 settings; the best config saved as a recipe YAML."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from adistill.cli.common import (
    add_storage_args,
    add_teacher_args,
    base_recipe,
    existing_registry,
    parse_resources,
    selection_from_args,
    storage_options,
)
from adistill.errors import ConfigError
from adistill.reports import text_table


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
    from adistill.distributed.common import ensure_ray
    from adistill.distributed.tune import TuneOptions, save_recipe, tune_tenants

    options = TuneOptions(
        backbone=args.backbone,
        samples=args.samples,
        max_concurrent=args.max_concurrent,
        scheduler=args.scheduler,
        search=args.search,
        storage_path=args.storage_path,
        storage_options=storage_options(args),
        name=args.name,
        resources_per_worker=resources,
        seed=args.seed,
        time_budget_s=args.time_budget_s,
        teacher_selection=selection_from_args(args),
    )
    base = base_recipe(args)
    check_tenant_data(manifest, tenant_ids, base, storage_options(args))  # before the encoder loads, before Ray
    registry = existing_registry(args)
    ensure_ray(args.address, log_to_driver=args.verbose)
    start = time.monotonic()

    def line(event: Any) -> None:
        d = event.detail
        if event.status == "epoch":
            text = f"epoch {d['training_iteration']} val {d['val_accuracy']:.4f} (epoch {d['epoch_val_accuracy']:.4f})"
        else:
            text = " ".join([event.status, *(f"{k}={v}" for k, v in d.items() if v is not None)])
        who = f"trial {event.trial_id}" if event.trial_id else "tune"
        sys.stderr.write(f"[{time.monotonic() - start:7.1f}s] {who}: {text}\n")

    outcome = tune_tenants(manifest, tenant_ids, space, registry, base, options, line)
    recipe = save_recipe(outcome, args.save_config or Path("tune_spaces") / "results" / f"{outcome.name}.yaml")
    sys.stdout.write(trials_table(outcome) + "\n")
    stage1 = ", ".join(f"{k} {v:.4f}" for k, v in outcome.stage1_val_accuracy.items())
    sys.stdout.write(f"best {outcome.best_metric:.4f} (stage 1 alone: {stage1}): {json.dumps(outcome.best_params)}\n")
    sys.stdout.write(f"best recipe: {recipe} (use with --config); experiment: {outcome.path}\n")
    if args.json:
        Path(args.json).write_text(json.dumps({**outcome.to_dict(), "recipe": str(recipe)}, indent=2) + "\n")
    return 0


def check_tenant_data(manifest: Any, tenant_ids: list[str], base: Any, options: dict[str, Any]) -> None:
    """Every tuned tenant's data reads (columns, labels, splits): checked before the encoder loads or Ray starts."""
    from adistill.data import read_tenant_data
    from adistill.store.uris import absolute_uri

    for tenant_id in tenant_ids:
        entry = manifest.tenant(tenant_id)
        seed = entry.recipe(base).seed
        read_tenant_data(absolute_uri(str(entry.data)), options, seed, entry.text_column, entry.label_column)


def trials_table(outcome: Any) -> str:
    """One line per trial of a tune outcome: id, status, validation accuracy, epochs run, its parameters."""
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
    return text_table(["TRIAL", "STATUS", "VAL_ACC", "EPOCHS", "PARAMS"], rows)


def add_parser(sub: Any) -> None:
    """`tune` on the `adistill` subparsers."""
    p = sub.add_parser("tune", help="Ray Tune search over stage-2 settings (docs/tuning.md); best config as a recipe")
    p.add_argument("manifest", help="tenants manifest YAML")
    p.add_argument("--tenant", default=None, help="the tenant to tune for")
    p.add_argument("--tenants", default=None, help="ID1,ID2,...: one shared config, mean validation accuracy")
    p.add_argument(
        "--space",
        required=True,
        help="search space: a packaged one by name (distill, smoke) or a YAML file (docs/tuning.md)",
    )
    p.add_argument("--registry", required=True, help="registry URI holding the teachers")
    p.add_argument("--config", default=None, help="base recipe YAML (the space's `fixed` and params go on top)")
    p.add_argument("--samples", type=int, default=None, help="trials (default: the space's `samples`)")
    p.add_argument("--max-concurrent", type=int, default=2, help="trials at once (default 2)")
    p.add_argument(
        "--scheduler", choices=["asha", "fifo"], default="asha", help="asha stops weak trials early (default asha)"
    )
    p.add_argument("--search", choices=["optuna", "random"], default="optuna", help="search algorithm (default optuna)")
    p.add_argument("--seed", type=int, default=0, help="search seed (default 0)")
    p.add_argument("--time-budget-s", type=float, default=None, help="stop the search after this many seconds")
    p.add_argument("--name", default=None, help="experiment name (default: derived from the inputs; reruns resume)")
    p.add_argument("--storage-path", default=None, help="experiment storage: folder or s3:// (default ~/ray_results)")
    p.add_argument("--resources-per-worker", default=None, help='JSON, e.g. \'{"CPU": 1, "GPU": 0.25}\'')
    p.add_argument("--address", default=None, help="Ray cluster to join (e.g. auto); default: a local instance")
    p.add_argument("--save-config", default=None, help="best recipe YAML (default tune_spaces/results/NAME.yaml)")
    add_teacher_args(p)
    p.add_argument("--json", default=None, help="also write best_config, best_metric and every trial here")
    add_storage_args(p)
    p.set_defaults(func=cmd_tune)
