"""Onboarding throughput (DESIGN.md §5): tenants per hour, and the share of worker time spent training.

Onboards N CLINC150-sized tenants (5 shots per intent, `distill` with 2 teachers already in the registry) in one
`onboard_manifest` call on a local Ray cluster with W workers of 1 CPU each, the whole path a user runs: manifest
to published tenants (driver backbone load, skip check, teacher selection, Train start, every tenant, publish).
Ray start-up and the registry's teachers are set up outside the timing.

- `training_seconds`: sum over tenants of the time inside `train_resumable` (both stages, calibration, evaluation
  on validation and test) and packaging the artifact, as measured by the worker;
- `training_fraction` = training_seconds / (wall_seconds x W); `overhead_seconds_per_tenant` =
  (wall_seconds x W - training_seconds) / N: what each tenant costs beyond its training.

The committed results also hold the old path (one Train run per tenant, W at a time), measured in the same run by
this script's `--compare-per-tenant 16` at commit 678b291, before that path was removed from adistill.
Writes benchmarks/results/onboarding.{json,md,png}.

    python benchmarks/onboarding.py --tenants 16 64 --workers 2
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from adistill.backbone import Backbone, load_backbone
from adistill.config import RecipeConfig, TrainConfig
from adistill.data import few_shot, read_tenant_data
from adistill.datasets import clinc150
from adistill.recipes import train_tenant
from adistill.recipes.tenant import TenantJob, data_record
from adistill.store.registry import Registry

RESULTS = Path(__file__).parent / "results"
TEACHERS = ("banking", "travel")
log = logging.getLogger("benchmarks.onboarding")


def recipe(stage1_epochs: int, stage2_epochs: int) -> RecipeConfig:
    return RecipeConfig(
        method="distill",
        shots=5,
        stage1=TrainConfig(epochs=stage1_epochs, lr=1e-3, patience=None),
        stage2=TrainConfig(epochs=stage2_epochs, lr=5e-4, patience=None),
    )


def seed_registry(backbone: Backbone, root: Path, cfg: RecipeConfig) -> Registry:
    """The teachers: CLINC domains trained in-process as 5-shot adapters (set-up, not timed)."""
    registry = Registry(str(root))
    for domain in TEACHERS:
        job = TenantJob(domain, clinc150.tenant_path(domain), cfg.replace(method="adapter"))
        data = few_shot(read_tenant_data(job.data), 5, 0)
        result = train_tenant(backbone, data, job.config)
        registry.publish(domain, result.files(domain, backbone, job.config, data_record(job, data, backbone)))
    return registry


def domain_data(domain: str, folder: Path, val_per_intent: int | None) -> str:
    """The domain's packaged file, or a copy keeping `val_per_intent` validation queries per intent (a few-shot
    tenant rarely has hundreds of validation queries; validation runs after every epoch)."""
    if val_per_intent is None:
        return clinc150.tenant_path(domain)
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows, seen = [], {}
    for row in pq.read_table(clinc150.tenant_path(domain)).to_pylist():
        if row["split"] == "validation":
            seen[row["label"]] = seen.get(row["label"], 0) + 1
            if seen[row["label"]] > val_per_intent:
                continue
        rows.append(row)
    path = folder / f"{domain}-val{val_per_intent}.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def write_manifest(folder: Path, n: int, tag: str, val_per_intent: int | None = None) -> Path:
    """`n` tenants cycling over the CLINC domains that are not teachers; ids unique per run."""
    domains = [d for d in clinc150.domains() if d not in TEACHERS]
    files = {d: domain_data(d, folder, val_per_intent) for d in domains}
    tenants = [
        {"id": f"{tag}-{i:03d}-{domains[i % len(domains)].replace('_', '-')}"[:63], "data": files[d]}
        for i, d in enumerate(domains[i % len(domains)] for i in range(n))
    ]
    path = folder / f"{tag}.yaml"
    path.write_text(yaml.safe_dump({"tenants": tenants}))
    return path


def run(registry: Registry, manifest: Path, cfg: RecipeConfig, workers: int, runs: Path) -> dict:
    from adistill.distributed.onboard import OnboardOptions, onboard_manifest
    from adistill.manifest import load_manifest

    options = OnboardOptions(workers=workers, resources_per_worker={"CPU": 1}, storage_path=str(runs))
    loaded = load_manifest(manifest)
    start = time.perf_counter()
    outcomes = onboard_manifest(loaded, registry, cfg, None, options)
    wall = time.perf_counter() - start
    ok = [o for o in outcomes if o.status == "published"]
    training = sum(o.train_seconds for o in ok)
    n = len(outcomes)
    row = {
        "path": "worker group",
        "tenants": n,
        "published": len(ok),
        "failed": [o.to_dict() for o in outcomes if o.status != "published"],
        "workers": workers,
        "wall_seconds": round(wall, 2),
        "training_seconds": round(training, 2),
        "training_fraction": round(training / (wall * workers), 4),
        "overhead_seconds_per_tenant": round((wall * workers - training) / n, 2),
        "tenants_per_hour": round(3600 * len(ok) / wall, 1),
        "mean_train_seconds": round(training / max(1, len(ok)), 2),
        "accuracy_mean": round(sum(o.accuracy or 0 for o in ok) / max(1, len(ok)), 4),
    }
    log.info("%s", row)
    return row


def markdown(report: dict[str, Any]) -> str:
    env, cfg = report["environment"], report["recipe"]
    lines = [
        "# Onboarding: tenants per hour and the share of time spent training",
        "",
        f"Machine: {env['machine']}, {env['cpus']} CPUs, torch {env['torch']}, {env['device']}; backbone "
        f"{env['backbone']}; Ray {env['ray']}. {report['note']}",
        "",
        f"Tenants: CLINC150 domains (15 intents, 5 shots each; validation and test splits evaluated), `distill` "
        f"with {len(TEACHERS)} teachers, stage 1 {cfg['stage1']['epochs']} epochs, stage 2 "
        f"{cfg['stage2']['epochs']} epochs; validation queries per intent: "
        f"{report.get('validation_per_intent') or 'all (about 27)'}; workers of 1 CPU. "
        "Wall time: `onboard_manifest` from call to return.",
        "",
        "| path | tenants | workers | wall s | training s | training fraction | overhead s / tenant | tenants/hour |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["runs"]:
        lines.append(
            f"| {r['path']} | {r['published']}/{r['tenants']} | {r['workers']} | {r['wall_seconds']:.0f} | "
            f"{r['training_seconds']:.0f} | {r['training_fraction']:.2f} | {r['overhead_seconds_per_tenant']:.1f} | "
            f"{r['tenants_per_hour']:.0f} |"
        )
    for ratio in report.get("ratios", []):
        lines += ["", f"- {ratio}"]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name, marker in (("worker group", "o"), ("per-tenant runs (old)", "s")):
        rows = sorted((r for r in report["runs"] if r["path"] == name), key=lambda r: r["tenants"])
        if rows:
            xs = [r["tenants"] for r in rows]
            left.plot(xs, [r["tenants_per_hour"] for r in rows], marker=marker, label=name)
            right.plot(xs, [r["training_fraction"] for r in rows], marker=marker, label=name)
    left.set(xlabel="tenants in the batch", ylabel="tenants per hour", title="Throughput (2 workers)")
    right.set(xlabel="tenants in the batch", ylabel="training fraction", ylim=(0, 1), title="Share of worker time")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tenants", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--stage1-epochs", type=int, default=10)
    parser.add_argument("--stage2-epochs", type=int, default=5)
    parser.add_argument("--val-per-intent", type=int, default=None, help="validation queries kept per intent")
    parser.add_argument("--json", default=str(RESULTS / "onboarding.json"))
    parser.add_argument("--note", default="", help="free text recorded with the results (e.g. machine load)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    cfg = recipe(args.stage1_epochs, args.stage2_epochs)
    backbone = load_backbone(None, "cpu")
    workdir = Path(tempfile.mkdtemp(prefix="adistill-bench-onboard-"))
    runs: list[dict[str, Any]] = []
    try:
        registry = seed_registry(backbone, workdir / "registry", cfg)
        ray.init(num_cpus=args.workers, configure_logging=False, log_to_driver=False)
        for i, n in enumerate(args.tenants):
            manifest = write_manifest(workdir, n, f"b{i}", args.val_per_intent)
            runs.append(run(registry, manifest, cfg, args.workers, workdir / f"runs-{i}"))
    finally:
        ray.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)
    ratios = []
    for old in (r for r in runs if r["path"] != "worker group"):
        new = next((r for r in runs if r["path"] == "worker group" and r["tenants"] == old["tenants"]), None)
        if new:
            speedup = new["tenants_per_hour"] / old["tenants_per_hour"]
            ratios.append(
                f"N = {old['tenants']}: the worker group onboards {speedup:.2f}x "
                f"the tenants per hour of one Train run per tenant ({new['tenants_per_hour']:.0f} vs "
                f"{old['tenants_per_hour']:.0f}); overhead per tenant {new['overhead_seconds_per_tenant']:.1f} s vs "
                f"{old['overhead_seconds_per_tenant']:.1f} s."
            )
    report = {
        "environment": {
            "machine": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "device": "cpu",
            "backbone": backbone.name,
            "ray": ray.__version__,
        },
        "note": args.note,
        "recipe": cfg.to_dict(),
        "validation_per_intent": args.val_per_intent,
        "runs": runs,
        "ratios": ratios,
    }
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    plot(report, out.with_suffix(".png"))
    print(markdown(report))


if __name__ == "__main__":
    main()
