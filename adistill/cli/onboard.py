"""`adistill onboard`: train and publish every tenant of a manifest on Ray Train."""

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
    parse_resources,
    registry_from_args,
    selection_from_args,
    storage_options,
)
from adistill.config import METHODS
from adistill.reports import rounded


def cmd_onboard(args: argparse.Namespace) -> int:
    """Train and publish every tenant of a manifest on Ray Train; a summary table; exit 1 if any tenant failed."""
    from adistill.manifest import load_manifest

    manifest = load_manifest(args.manifest)  # every manifest error is raised here, before Ray or any training
    resources = parse_resources(args.resources_per_worker, "--resources-per-worker")
    from adistill.distributed.common import ensure_ray
    from adistill.distributed.onboard import OnboardOptions, onboard_manifest, summary_table

    options = OnboardOptions(
        backbone=args.backbone,
        workers=args.workers,
        resources_per_worker=resources,
        storage_path=args.storage_path,
        storage_options=storage_options(args),
        max_failures=args.max_failures,
        teacher_selection=selection_from_args(args),
    )
    registry = registry_from_args(args)
    recipe = base_recipe(args)
    ensure_ray(args.address, log_to_driver=args.verbose)
    start = time.monotonic()

    def line(event: Any) -> None:
        d = event.detail
        if "epoch" in d:
            text = f"{event.status} epoch {d['epoch']}/{d['epochs']} loss {d['loss']:.3f} val {d['val_accuracy']:.3f}"
        elif "done" in d:  # a tenant's end, with the batch's progress
            eta = "-" if d["eta_s"] is None else f"{d['eta_s']}s"
            shown = {k: v for k, v in d.items() if k in ("version", "accuracy", "error") and v is not None}
            text = " ".join([event.status, *(f"{k}={v}" for k, v in shown.items())])
            text += f"  [{d['done']}/{d['total']} tenants, {d['tenants_per_hour']:.0f}/h, ETA {eta}]"
        else:
            text = " ".join([event.status, *(f"{k}={v}" for k, v in d.items() if v is not None)])
        sys.stderr.write(f"[{time.monotonic() - start:7.1f}s] {event.tenant_id}: {text}\n")

    outcomes = onboard_manifest(manifest, registry, recipe, args.method, options, line)
    sys.stdout.write(summary_table(outcomes) + "\n")
    warn_uncalibrated(registry, [(o.tenant_id, o.version) for o in outcomes if o.status == "published"])
    if args.json:
        Path(args.json).write_text(json.dumps(rounded([o.to_dict() for o in outcomes]), indent=2) + "\n")
    return 1 if any(o.status == "failed" for o in outcomes) else 0


def warn_uncalibrated(registry: Any, published: list[tuple[str, int | None]]) -> None:
    """One line naming the just-published tenants whose out-of-scope detection is off (no threshold calibrated)."""
    off = [t for t, v in published if registry.meta(t, v).get("oos_threshold") is None]
    if off:
        sys.stderr.write(
            f"adistill onboard: warning: no out-of-scope threshold for {len(off)} tenant(s) ({', '.join(off)}): "
            "their validation data has no 'oos' rows, so their predictions never flag a query as out of scope\n"
        )


def add_parser(sub: Any) -> None:
    """`onboard` on the `adistill` subparsers."""
    p = sub.add_parser("onboard", help="train and publish every tenant of a manifest, in parallel on Ray Train")
    p.add_argument("manifest", help="tenants manifest YAML (docs/onboarding.md)")
    p.add_argument("--registry", required=True, help="registry URI: folder, file://, s3://bucket/prefix")
    p.add_argument("--method", choices=METHODS, default=None, help="for tenants whose manifest sets no method")
    p.add_argument("--config", default=None, help="recipe YAML (a manifest config, yours or its defaults', wins)")
    p.add_argument(
        "--workers",
        "--max-concurrent",
        dest="workers",
        type=int,
        default=None,
        help="workers training tenants at once, each loading the backbone once (default: as many as the cluster fits)",
    )
    p.add_argument(
        "--resources-per-worker",
        "--resources-per-tenant",
        dest="resources_per_worker",
        default=None,
        help='JSON, e.g. \'{"CPU": 1}\' or \'{"CPU": 1, "GPU": 0.25}\' (four workers on one GPU); default 1 CPU',
    )
    p.add_argument("--address", default=None, help="Ray cluster to join (e.g. auto); default: the job's or a new one")
    p.add_argument("--storage-path", default=None, help="run checkpoints: folder or s3:// (default ~/ray_results)")
    p.add_argument("--max-failures", type=int, default=2, help="worker-group restarts after a worker dies (default 2)")
    add_teacher_args(p)
    p.add_argument("--json", default=None, help="also write the outcomes to this file")
    add_storage_args(p)
    p.set_defaults(func=cmd_onboard)
