"""Training cost of onboarding (DESIGN.md §5): stage-1 vs stage-2 step time, and tenants onboarded per hour.

1. Seconds per training step of stage 1 and of stage 2 with 1, 5 and 10 teachers, on the same batches
   (the packaged all-MiniLM-L6-v2, batch 32, max length 32), timed through the real recipes
   (`train_adapter`, `distill`): `FitResult.seconds / steps` of one epoch (its one validation pass over one
   query per label included), best of a few interleaved rounds after warm-up.
2. Tenants onboarded per hour with `onboard_manifest` on a local Ray cluster at 1, 2 and 4 concurrent tenants
   (each given 1/concurrency of the CPUs): CLINC150 domains, few-shot, `distill` with 2 teachers already in the
   registry; wall time from the first Train run to the last publish, Ray start-up excluded.

Writes benchmarks/results/onboarding.{json,md}. Never asserted anywhere; the figures depend on the machine.

    nice python benchmarks/onboarding.py                 # ~10 minutes on 2 cores
    python benchmarks/onboarding.py --skip-throughput    # step times only
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from adistill.adapters import AdapterSet
from adistill.backbone import Backbone, load_backbone
from adistill.config import RecipeConfig, TrainConfig
from adistill.data import Split, TenantData, few_shot, read_tenant_data
from adistill.datasets import clinc150
from adistill.recipes import train_tenant
from adistill.recipes.stage1 import train_adapter
from adistill.recipes.stage2 import distill
from adistill.recipes.tenant import TenantJob, data_record

RESULTS = Path(__file__).parent / "results"
log = logging.getLogger("benchmarks.onboarding")


def step_data(batch: int, steps: int) -> TenantData:
    """`batch * steps` banking queries (every step the same shape for every variant), a tiny validation split."""
    data = read_tenant_data(clinc150.tenant_path("banking"))
    pick = random.Random(0).sample(range(len(data.train)), batch * steps)
    train = Split([data.train.texts[i] for i in pick], [data.train.labels[i] for i in pick])
    first = {}
    for x, y in zip(data.validation.texts, data.validation.labels):
        first.setdefault(y, x)
    labels = sorted(set(train.labels))
    validation = Split([first[y] for y in labels if y in first], [y for y in labels if y in first])
    return TenantData("banking", train, validation, Split())


def step_times(backbone: Backbone, teacher_counts: list[int], batch: int, steps: int, rounds: int) -> dict[str, Any]:
    """Best of `rounds` interleaved measurements of every variant: on a shared machine the other load comes and
    goes, and the minimum is the estimate least disturbed by it."""
    data = step_data(batch, steps)
    cfg = RecipeConfig(
        method="distill",
        max_length=32,
        stage1=TrainConfig(epochs=1, batch_size=batch, patience=None),
        stage2=TrainConfig(epochs=1, batch_size=batch, patience=None),
    )
    stage1, _ = train_adapter(backbone, data, cfg)  # warm-up (allocations, kernels); its adapter starts stage 2
    g = torch.Generator().manual_seed(1)
    pool = [AdapterSet(backbone.num_layers, backbone.hidden_size, cfg.adapter, g) for _ in range(max(teacher_counts))]
    for a in pool:  # non-zero teachers (a fresh adapter's up-projection is zero)
        for p in a.parameters():
            torch.nn.init.normal_(p, std=0.02)
    distill(backbone, data, cfg, stage1, pool[:1])  # warm-up of the stage-2 path
    samples: dict[str, list[float]] = {"stage1": [], **{f"stage2_{n}_teachers": [] for n in teacher_counts}}
    for r in range(rounds):
        _, fit = train_adapter(backbone, data, cfg)
        samples["stage1"].append(fit.seconds / fit.steps)
        for n in teacher_counts:
            _, fit = distill(backbone, data, cfg, stage1, pool[:n])
            samples[f"stage2_{n}_teachers"].append(fit.seconds / fit.steps)
        log.info("round %d: %s", r + 1, {k: round(v[-1], 3) for k, v in samples.items()})
    base = min(samples["stage1"])
    rows: dict[str, Any] = {"stage1": {"seconds_per_step": base, "samples": samples["stage1"]}}
    for n in teacher_counts:
        best = min(samples[f"stage2_{n}_teachers"])
        rows[f"stage2_{n}_teachers"] = {
            "teachers": n,
            "seconds_per_step": best,
            "ratio_to_stage1": best / base,
            "samples": samples[f"stage2_{n}_teachers"],
        }
    return rows


def seed_registry(backbone: Backbone, root: Path, domains: list[str], cfg: RecipeConfig) -> Path:
    """A registry holding `domains` as adapter teachers (trained in-process, few-shot: this is set-up, not timed)."""
    from adistill.store.registry import Registry

    registry = Registry(str(root))
    for domain in domains:
        job = TenantJob(domain.replace("_", "-"), clinc150.tenant_path(domain), cfg.replace(method="adapter"))
        data = few_shot(read_tenant_data(job.data), cfg.shots or 5, cfg.seed)
        result = train_tenant(backbone, data, job.config)
        registry.publish(job.tenant_id, result.files(job.tenant_id, backbone, job.config, data_record(job, data)))
    return root


def throughput(
    backbone: Backbone, spec: str | None, levels: list[int], per_level: int, epochs: int, workdir: Path
) -> list[dict[str, Any]]:
    import ray
    import yaml

    from adistill.distributed.onboard import OnboardOptions, onboard_manifest
    from adistill.manifest import load_manifest
    from adistill.store.registry import Registry

    cpus = os.cpu_count() or 2
    cfg = RecipeConfig(
        method="distill",
        shots=5,
        stage1=TrainConfig(epochs=epochs, lr=1e-3, batch_size=16, patience=None),
        stage2=TrainConfig(epochs=epochs, lr=5e-4, batch_size=16, patience=None),
    )
    teachers = ["banking", "credit_cards"]
    seed = seed_registry(backbone, workdir / "seed-registry", teachers, cfg)
    candidates = [d for d in clinc150.domains() if d not in teachers]
    (workdir / "recipe.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    ray.init(num_cpus=cpus, log_to_driver=False)
    rows = []
    try:
        for level in levels:
            n = max(level, per_level)
            tenants = [{"id": d.replace("_", "-"), "data": clinc150.tenant_path(d)} for d in candidates[:n]]
            (workdir / f"m{level}.yaml").write_text(
                yaml.safe_dump({"defaults": {"config": str(workdir / "recipe.yaml")}, "tenants": tenants})
            )
            reg_dir = workdir / f"registry-{level}"
            shutil.copytree(seed, reg_dir)
            options = OnboardOptions(
                backbone=spec,
                max_concurrent=level,
                resources_per_tenant={"CPU": cpus / level},
                storage_path=str(workdir / f"runs-{level}"),
            )
            t0 = time.perf_counter()
            outcomes = onboard_manifest(
                load_manifest(workdir / f"m{level}.yaml"), Registry(str(reg_dir)), cfg, None, options
            )
            wall = time.perf_counter() - t0
            ok = [o for o in outcomes if o.status == "published"]
            train_s = [sum(Registry(str(reg_dir)).meta(o.tenant_id)["metrics"]["seconds"].values()) for o in ok]
            rows.append(
                {
                    "concurrent": level,
                    "tenants": n,
                    "published": len(ok),
                    "failed": [o.to_dict() for o in outcomes if o.status == "failed"],
                    "wall_seconds": wall,
                    "tenants_per_hour": 3600 * len(ok) / wall,
                    "mean_tenant_seconds": sum(o.seconds for o in ok) / max(1, len(ok)),
                    "mean_train_seconds": sum(train_s) / max(1, len(train_s)),
                    "cpus_per_tenant": cpus / level,
                    "teachers": len(teachers),
                }
            )
            log.info("concurrency %d: %s", level, rows[-1])
    finally:
        ray.shutdown()
    return rows


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        "# Onboarding: training cost",
        "",
        f"Machine: {env['machine']}, {env['cpus']} CPUs, torch {env['torch']}, {env['device']}; "
        f"backbone {env['backbone']}. {report['note']}",
        "",
        "## Seconds per training step (same batches, batch "
        f"{report['step']['batch']}, max length {report['step']['max_length']}; best of "
        f"{report['step']['rounds']} interleaved rounds of {report['step']['steps_per_sample']} steps)",
        "",
        "| step | teachers | s/step (best) | x stage 1 | every round, s/step |",
        "|---|---:|---:|---:|---|",
    ]
    for name, row in report["step"]["rows"].items():
        teachers = row.get("teachers", 0)
        ratio = row.get("ratio_to_stage1", 1.0)
        label = "stage 1" if name == "stage1" else "stage 2"
        rounds = ", ".join(f"{x:.2f}" for x in row.get("samples", []))
        lines.append(f"| {label} | {teachers} | {row['seconds_per_step']:.3f} | {ratio:.2f} | {rounds} |")
    lines += [
        "",
        "When the rounds of one row differ by more than the rows differ from each other, the machine's other load "
        "decided the figures: compare ratios only from a quiet machine.",
    ]
    if report.get("throughput"):
        lines += [
            "",
            "## Tenants onboarded per hour (`onboard_manifest`, local Ray, distill with "
            f"{report['throughput'][0]['teachers']} teachers, 5 shots per intent)",
            "",
            "| concurrent | CPUs each | tenants | wall s | tenants/hour | mean s per tenant | of which training |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in report["throughput"]:
            lines.append(
                f"| {r['concurrent']} | {r['cpus_per_tenant']:.2f} | {r['published']}/{r['tenants']} | "
                f"{r['wall_seconds']:.0f} | {r['tenants_per_hour']:.0f} | {r['mean_tenant_seconds']:.0f} | "
                f"{r['mean_train_seconds']:.0f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default=None, help="default: the packaged all-MiniLM-L6-v2")
    parser.add_argument("--teachers", type=int, nargs="+", default=[1, 5, 10])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4, help="steps per timed epoch")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best is reported")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--tenants-per-level", type=int, default=1, help="at least the concurrency itself")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of each stage in the throughput runs")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--note", default="", help="free text recorded with the results (e.g. machine load)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backbone = load_backbone(args.backbone, device)
    started = time.perf_counter()
    report: dict[str, Any] = {
        "environment": {
            "machine": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "device": device,
            "torch_threads": torch.get_num_threads(),
            "backbone": backbone.name,
            "backbone_parameters": backbone.num_parameters,
        },
        "note": args.note,
        "step": {
            "batch": args.batch,
            "max_length": 32,
            "steps_per_sample": args.steps,
            "rounds": args.rounds,
            "rows": step_times(backbone, args.teachers, args.batch, args.steps, args.rounds),
        },
    }
    if not args.skip_throughput:
        workdir = Path(tempfile.mkdtemp(prefix="adistill-bench-onboard-"))
        try:
            report["throughput"] = throughput(
                backbone, args.backbone, args.concurrency, args.tenants_per_level, args.epochs, workdir
            )
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    report["seconds"] = time.perf_counter() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "onboarding.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "onboarding.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
