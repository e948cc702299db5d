"""Ray Tune over stage 2 on CLINC150: one leave-one-out tenant at k shots, tuned config vs the default config.

The teachers are the adapters of the other domains (artifact folders written by benchmarks/accuracy.py under
runs/accuracy/teachers/, read only), published into a scratch registry. The tenant's stage 1 is trained once;
`distill.yaml`'s space is searched with Optuna + ASHA (its `fixed` stage-2 epochs can be reduced for CPU time);
then the best trial and the recipe defaults (τ 2, α 0.5, β 1, γ 0, lr 5e-4) are compared on the test split, next
to stage 1 alone (`adapter`) and AdapterFusion from the same stage 1. Writes benchmarks/results/tune.{json,md,png}
and the tuned recipe to tune_spaces/results/clinc-<tenant>-k<shots>.yaml.

    python benchmarks/tune.py --tenant meta --shots 5 --samples 16 --epochs 8 --time-budget-s 600
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
import time
from pathlib import Path

import torch
import yaml

from adistill.backbone import load_backbone
from adistill.config import RecipeConfig, TrainConfig
from adistill.data import few_shot, read_tenant_data
from adistill.datasets import clinc150
from adistill.distributed.tune import TuneOptions, save_recipe, tune_tenants
from adistill.manifest import load_manifest
from adistill.recipes.baselines import train_fusion
from adistill.recipes.evaluate import accuracy
from adistill.recipes.stage1 import train_adapter
from adistill.recipes.stage2 import distill
from adistill.store.artifact import load_artifact, read_dir
from adistill.store.registry import Registry
from adistill.tune_space import space_from_dict

log = logging.getLogger("benchmarks.tune")
ROOT = Path(__file__).resolve().parents[1]


def publish_teachers(registry: Registry, teachers_dir: Path, exclude: str) -> list[str]:
    """Every complete teacher folder except the tuned tenant's, published once into the scratch registry."""
    out = []
    for folder in sorted(p for p in teachers_dir.iterdir() if (p / "adapter_config.json").is_file()):
        tenant_id = folder.name.replace("_", "-")
        if folder.name == exclude:
            continue
        if registry.latest_version(tenant_id) is None:
            registry.publish(tenant_id, read_dir(folder))
        out.append(tenant_id)
    return out


def chart(trials: list[dict], default: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    scored = [t for t in trials if t["val_accuracy"] is not None]
    full = [t for t in scored if not t["stopped_early"]]
    stopped = [t for t in scored if t["stopped_early"]]
    for ax, key, label in ((axes[0], "distill.temperature", "temperature τ"), (axes[1], "distill.alpha", "α")):
        for group, marker, name in ((full, "o", "ran all epochs"), (stopped, "x", "stopped by ASHA")):
            ax.scatter(
                [t["params"][key] for t in group], [100 * t["val_accuracy"] for t in group], marker=marker, label=name
            )
        ax.axhline(100 * default["val_accuracy"], color="gray", ls="--", lw=1, label="default config (val)")
        ax.set_xlabel(label)
        ax.set_ylabel("validation accuracy (%)")
        ax.legend(fontsize=8)
    axes[0].set_xscale("log")
    sc = axes[2].scatter(
        [t["params"]["distill.temperature"] for t in scored],
        [t["params"]["distill.alpha"] for t in scored],
        c=[100 * t["val_accuracy"] for t in scored],
        cmap="viridis",
        s=60,
    )
    axes[2].set_xscale("log")
    axes[2].set_xlabel("temperature τ")
    axes[2].set_ylabel("α")
    fig.colorbar(sc, ax=axes[2], label="validation accuracy (%)")
    fig.suptitle("adistill tune on CLINC150 (leave-one-out, few-shot): every trial")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(report: dict) -> str:
    m, r = report["meta"], report["results"]
    lines = [
        f"# Tuning stage 2 on CLINC150: tenant `{m['tenant']}`, {m['shots']} shots per intent",
        "",
        f"Backbone {m['backbone']} (frozen), {m['teachers']} teachers, {m['machine']}, {m['date']}.",
        f"Search: `tune_spaces/distill.yaml` with Optuna + ASHA, {m['trials_run']} trials run of {m['samples']} asked "
        f"(time budget {m['time_budget_s']} s, took {m['tune_seconds']:.0f} s), {m['stage2_epochs']} stage-2 epochs "
        f"per trial{'' if m['stage2_epochs'] == 20 else ' (reduced from the space`s 20 for CPU time)'}, "
        f"stage 1 {m['stage1_epochs']} epochs. Test accuracy: {m.get('test_queries', 450)} in-scope test queries "
        "(one query = 0.22 points); `-`: the trial was stopped by ASHA, its test accuracy was not measured.",
        "",
        "| recipe | validation accuracy | test accuracy |",
        "|---|---|---|",
    ]
    for name in ("adapter", "fusion", "distill_default", "distill_tuned"):
        if name in r:
            val = r[name].get("val_accuracy")
            lines.append(
                f"| {name} | {'-' if val is None else f'{100 * val:.2f}'} | {100 * r[name]['test_accuracy']:.2f} |"
            )
    b = report["best_config"]
    lines += [
        "",
        "Best config: " + ", ".join(f"{k} {b[k]:.4g}" if isinstance(b[k], float) else f"{k} {b[k]}" for k in sorted(b)),
        "",
        "| trial | τ | α | β | γ | lr | epochs run | val accuracy | test accuracy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in sorted(report["trials"], key=lambda t: -(t["val_accuracy"] or 0)):
        p = t["params"]
        test, val = t.get("test_accuracy"), t["val_accuracy"]
        lines.append(
            f"| {t['trial_id']} | {p.get('distill.temperature', float('nan')):.3g} | "
            f"{p.get('distill.alpha', float('nan')):.3g} | {p.get('distill.beta', float('nan')):.3g} | "
            f"{p.get('distill.gamma', float('nan')):.3g} | {p.get('stage2.lr', float('nan')):.2e} | "
            f"{t['epochs_run']}{' (stopped)' if t['stopped_early'] else ''} | "
            f"{'-' if val is None else f'{100 * val:.2f}'} | "
            f"{'-' if test is None else f'{100 * test:.2f}'} |"
        )
    transfer = report.get("transfer")
    if transfer:
        rows = transfer["tenants"]
        mean = {k: 100 * sum(r[k] for r in rows) / len(rows) for k in ("adapter", "distill_default", "distill_tuned")}
        lines += [
            "",
            f"## Does the tuned config transfer? The other {len(rows)} tenants, {m['shots']} shots, seed 0",
            "",
            "What a platform does with a tuned config: onboard other tenants with it. Each row: stage 1 once, then",
            "stage 2 with the recipe defaults and with the tuned recipe (both 20 epochs, best validation epoch kept),",
            f"teachers = the other 9 domains. `{transfer['recipe']}`; test accuracy %:",
            "",
            "| tenant | adapter | distill, defaults | distill, tuned | tuned − defaults |",
            "|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['tenant']} | {100 * r['adapter']:.2f} | {100 * r['distill_default']:.2f} | "
                f"{100 * r['distill_tuned']:.2f} | {100 * (r['distill_tuned'] - r['distill_default']):+.2f} |"
            )
        wins = sum(r["distill_tuned"] > r["distill_default"] for r in rows)
        losses = sum(r["distill_tuned"] < r["distill_default"] for r in rows)
        lines.append(
            f"| **mean** | **{mean['adapter']:.2f}** | **{mean['distill_default']:.2f}** | "
            f"**{mean['distill_tuned']:.2f}** | **{mean['distill_tuned'] - mean['distill_default']:+.2f}** "
            f"({wins} better, {losses} worse) |"
        )
    return "\n".join(lines) + "\n"


def transfer(args: argparse.Namespace, out: Path) -> None:
    """Default vs tuned recipe on other tenants (cached per tenant under --workdir/transfer), merged into tune.json."""
    report = json.loads((out / "tune.json").read_text())
    tuned = RecipeConfig.from_yaml(ROOT / report["recipe"])
    defaults = {"temperature": 2.0, "alpha": 0.5, "beta": 1.0, "gamma": 0.0}
    default = tuned.replace(  # the recipe defaults of the searched settings, everything else as tuned
        distill=dataclasses.replace(tuned.distill, **defaults), stage2=dataclasses.replace(tuned.stage2, lr=5e-4)
    )
    backbone = load_backbone()
    cache = Path(args.workdir) / "transfer"
    cache.mkdir(parents=True, exist_ok=True)
    teachers = {p.name: load_artifact(p, backbone).as_teacher().adapters for p in Path(args.teachers).iterdir()}
    rows = []
    for domain in args.transfer:
        path = cache / f"{domain}-k{args.shots}.json"
        if not path.exists():
            data = few_shot(read_tenant_data(clinc150.tenant_path(domain)), args.shots, tuned.seed)
            cfg = tuned.replace(shots=args.shots)
            stage1, _ = train_adapter(backbone, data, cfg)
            peers = [a for name, a in sorted(teachers.items()) if name != domain]
            row = {"tenant": domain, "adapter": accuracy(backbone, stage1, data.test, cfg.max_length)}
            for name, recipe in (("distill_default", default), ("distill_tuned", tuned)):
                model, _ = distill(backbone, data, recipe.replace(shots=args.shots), stage1, peers)
                row[name] = accuracy(backbone, model, data.test, cfg.max_length)
            path.write_text(json.dumps(row))
            log.warning("transfer %s: %s", domain, {k: v for k, v in row.items() if k != "tenant"})
        rows.append(json.loads(path.read_text()))
    done = [json.loads(p.read_text()) for p in sorted(cache.glob(f"*-k{args.shots}.json"))]
    report["transfer"] = {"recipe": report["recipe"], "tenants": done}
    (out / "tune.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "tune.md").write_text(markdown(report))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tenant", default="meta", help="CLINC150 domain tuned as the new tenant")
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--max-concurrent", type=int, default=2)
    p.add_argument("--epochs", type=int, default=8, help="stage-2 epochs per trial (the space says 20)")
    p.add_argument("--stage1-epochs", type=int, default=30)
    p.add_argument("--grace-period", type=int, default=2)
    p.add_argument("--time-budget-s", type=float, default=600)
    p.add_argument("--no-fusion", action="store_true", help="skip the AdapterFusion comparison")
    p.add_argument("--teachers", default="runs/accuracy/teachers", help="teacher artifact folders (read only)")
    p.add_argument("--workdir", default="/tmp/adistill-tune-bench")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--transfer", nargs="+", default=None, help="no search: default vs tuned recipe on these tenants")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    start = time.time()
    workdir, out = Path(args.workdir), Path(args.out)
    workdir.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    if args.transfer:
        transfer(args, out)
        return

    registry = Registry(str(workdir / "registry"))
    teachers = publish_teachers(registry, Path(args.teachers), args.tenant)
    tenant_id = args.tenant.replace("_", "-")
    manifest_path = workdir / "manifest.yaml"
    manifest_path.write_text(
        yaml.safe_dump({"tenants": [{"id": tenant_id, "data": clinc150.tenant_path(args.tenant), "shots": args.shots}]})
    )
    raw = yaml.safe_load((ROOT / "tune_spaces" / "distill.yaml").read_text())
    raw["fixed"]["stage2"]["epochs"] = args.epochs
    raw["fixed"]["stage2"]["patience"] = None
    raw["asha"]["grace_period"] = args.grace_period
    raw["samples"] = args.samples
    space = space_from_dict(raw, "distill")
    base = RecipeConfig(stage1=TrainConfig(epochs=args.stage1_epochs, lr=1e-3, patience=6))
    options = TuneOptions(
        samples=args.samples,
        max_concurrent=args.max_concurrent,
        storage_path=str(workdir / "runs"),
        time_budget_s=args.time_budget_s,
        name=f"clinc-{tenant_id}-k{args.shots}-e{args.epochs}-n{args.samples}",
    )
    import ray

    ray.init(num_cpus=2, log_to_driver=False, configure_logging=False)

    def line(event: object) -> None:
        log.warning("%s", event)

    outcome = tune_tenants(load_manifest(manifest_path), [tenant_id], space, registry, base, options, line)
    tune_seconds = time.time() - start
    recipe = save_recipe(outcome, ROOT / "tune_spaces" / "results" / f"clinc-{tenant_id}-k{args.shots}.yaml")
    ray.shutdown()

    # Test accuracy of the default config, stage 1 alone and AdapterFusion, from the stage 1 the trials used.
    backbone = load_backbone()
    default_cfg = space.apply(base, space.values_of(RecipeConfig())).replace(shots=args.shots)
    data = few_shot(read_tenant_data(clinc150.tenant_path(args.tenant)), args.shots, default_cfg.seed)
    stage1 = load_artifact(f"{outcome.path}/stage1/{tenant_id}", backbone).model
    adapters = [registry.get(t, backbone).as_teacher().adapters for t in teachers]
    results: dict[str, dict] = {
        "adapter": {
            "val_accuracy": outcome.stage1_val_accuracy[tenant_id],
            "test_accuracy": accuracy(backbone, stage1, data.test, default_cfg.max_length),
        }
    }
    stage1.requires_grad_(True).train()
    model, fit = distill(backbone, data, default_cfg, stage1, adapters)
    results["distill_default"] = {
        "val_accuracy": fit.best_val_accuracy,
        "test_accuracy": accuracy(backbone, model, data.test, default_cfg.max_length),
        "config": {**default_cfg.distill.__dict__, **default_cfg.stage2.__dict__},
    }
    best = max((t for t in outcome.trials if t.val_accuracy is not None), key=lambda t: t.val_accuracy or 0.0)
    if best.test_accuracy is None or best.stopped_early:  # not reported by the trial: train it again
        tuned = outcome.best_recipe.replace(shots=args.shots)
        model, fit = distill(backbone, data, tuned, stage1, adapters)
        best_test = accuracy(backbone, model, data.test, tuned.max_length)
    else:
        best_test = best.test_accuracy
    results["distill_tuned"] = {"val_accuracy": outcome.best_metric, "test_accuracy": best_test}
    if not args.no_fusion:
        model, fit = train_fusion(backbone, data, default_cfg, stage1, adapters)
        results["fusion"] = {
            "val_accuracy": fit.best_val_accuracy,
            "test_accuracy": accuracy(backbone, model, data.test, default_cfg.max_length),
        }

    report = {
        "meta": {
            "tenant": args.tenant,
            "shots": args.shots,
            "teachers": len(teachers),
            "teacher_ids": teachers,
            "backbone": backbone.name,
            "samples": args.samples,
            "trials_run": len(outcome.trials),
            "stage2_epochs": args.epochs,
            "stage1_epochs": args.stage1_epochs,
            "grace_period": args.grace_period,
            "time_budget_s": args.time_budget_s,
            "tune_seconds": round(tune_seconds, 1),
            "total_seconds": round(time.time() - start, 1),
            "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} torch thread(s), shared",
            "date": time.strftime("%Y-%m-%d"),
        },
        "best_config": outcome.best_config(),
        "recipe": str(recipe.relative_to(ROOT)),
        "best_params": outcome.best_params,
        "best_metric": outcome.best_metric,
        "results": results,
        "trials": [t.to_dict() for t in outcome.trials],
    }
    (out / "tune.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "tune.md").write_text(markdown(report))
    chart(report["trials"], results["distill_default"], out / "tune.png")
    log.warning(
        "done in %.0fs: %s", time.time() - start, {k: round(100 * v["test_accuracy"], 2) for k, v in results.items()}
    )


if __name__ == "__main__":
    main()
