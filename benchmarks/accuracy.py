"""The paper's experiment on public data: CLINC150 leave-one-out, adapter vs fusion vs distill (DESIGN.md §5).

For each of the 10 domains as the new tenant, the other 9 are teachers trained on their full training data;
the new tenant gets k shots per intent (seeded). Stage 1 is trained once per (tenant, k, seed) and shared:
`adapter` is stage 1 alone, `fusion` and `distill` start from it. Results are cached per run under --workdir,
so an interrupted benchmark resumes. Writes benchmarks/results/accuracy.{json,md,png}.

    python benchmarks/accuracy.py                      # k = 5 and 10, seed 0, all 10 tenants
    python benchmarks/accuracy.py --shots 5 --tenants banking meta --seeds 0 1
    python benchmarks/accuracy.py --unlabeled 50 --shots 5 10 --seeds 0 1 2   # + the tenant's unlabelled queries:
        distillation over a transfer set and its controls, benchmarks/transfer.py, writes results/transfer.*
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from adistill.backbone import load_backbone
from adistill.config import RecipeConfig, TrainConfig, TransferConfig
from adistill.data import few_shot, read_tenant_data
from adistill.datasets import clinc150
from adistill.encoder import encode
from adistill.inference.engine import Engine
from adistill.recipes import train_tenant
from adistill.recipes.baselines import train_fusion
from adistill.recipes.evaluate import accuracy
from adistill.recipes.stage1 import train_adapter
from adistill.recipes.stage2 import distill
from adistill.store.artifact import load_artifact, save_artifact

log = logging.getLogger("benchmarks.accuracy")
METHODS = ("adapter", "fusion", "distill")


def teacher_artifacts(backbone, workdir: Path, epochs: int) -> dict[str, Path]:
    """One adapter per domain on its full training data (cached)."""
    out = {}
    cfg = RecipeConfig(method="adapter", stage1=TrainConfig(epochs=epochs, lr=1e-3, patience=3))
    for domain in clinc150.domains():
        path = workdir / "teachers" / domain
        if not (path / "adapter_config.json").exists():
            t0 = time.perf_counter()
            data = read_tenant_data(clinc150.tenant_path(domain))
            result = train_tenant(backbone, data, cfg)
            record = {"source": domain, "fingerprint": data.fingerprint(), "train_examples": len(data.train)}
            save_artifact(result.files(domain.replace("_", "-"), backbone, cfg, record), path)
            log.warning(
                "teacher %s: val %.4f (%.0fs)",
                domain,
                result.metrics["validation"]["accuracy"],
                time.perf_counter() - t0,
            )
        out[domain] = path
    return out


def start_transfer_benchmark(workdir: Path) -> tuple[Any, dict[str, Any], TrainConfig]:
    """What the benchmarks over `--unlabeled` runs share (stopping.py, teacher_signal.py): logging, the seed, the
    backbone, the 10 domains' teachers (trained into `workdir` as here when missing) and stage 1's settings of
    `--unlabeled 50` (30 epochs, patience 8), so their stage 1 repeats this benchmark's."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    torch.manual_seed(0)
    backbone = load_backbone()
    loaded = {d: load_artifact(path, backbone) for d, path in teacher_artifacts(backbone, workdir, 8).items()}
    return backbone, loaded, TrainConfig(epochs=30, lr=1e-3, patience=8)


def stderr(values: list[float]) -> float:
    """The standard error of the mean (0 for a single value)."""
    return statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0


def subsample_validation(data, per_label: int | None, seed: int):
    """Keep `per_label` in-scope validation rows per intent (seeded): model selection on fewer rows, for CPU time."""
    if per_label is None:
        return data
    from adistill.data import Split, TenantData

    inside = data.validation.in_scope()
    picked = few_shot(TenantData(data.source, inside, inside, data.test), per_label, seed).train
    return TenantData(data.source, data.train, Split(picked.texts, picked.labels), data.test, data.unlabeled)


def run_one(
    backbone, domain: str, shots: int, seed: int, teachers: list, cfg: RecipeConfig, val_per_label: int | None
) -> dict:
    data = few_shot(read_tenant_data(clinc150.tenant_path(domain)), shots, seed)
    data = subsample_validation(data, val_per_label, seed)
    cfg = cfg.replace(shots=shots, seed=seed)
    row: dict = {"tenant": domain, "shots": shots, "seed": seed}
    stage1, fit1 = train_adapter(backbone, data, cfg)
    models = {"adapter": (stage1, fit1)}
    models["fusion"] = train_fusion(backbone, data, cfg, stage1, teachers)
    models["distill"] = distill(backbone, data, cfg, stage1, teachers)
    for method, (model, fit) in models.items():
        row[method] = {
            "test_accuracy": accuracy(backbone, model, data.test, cfg.max_length),
            "val_accuracy": fit.best_val_accuracy,
            "best_epoch": fit.best_epoch,
            "epochs_run": fit.epochs_run,
            "train_seconds": round(fit.seconds, 1),
        }
    return row


def run_cache(runs_dir: Path, domain: str, shots: int, seed: int, suffix: str) -> Path:
    """Where `cached_runs` keeps one run."""
    return runs_dir / f"{domain}-k{shots}-s{seed}{suffix}.json"


def cached_runs(
    args, runs_dir: Path, suffix: str, loaded: dict, methods, run, needs=None, cached_only: bool = False
) -> list[dict]:
    """Every (shots, seed, tenant) of the arguments, run as `run(domain, shots, seed, peers, done)` with the other
    domains' adapters as peers; each run cached as JSON under `runs_dir`, so a stopped benchmark resumes where it
    stopped. A cached run for which `needs(row)` holds is run again with `done` = that row (to add methods). With
    `cached_only` nothing is trained: the runs that are cached and complete, the others left out."""
    rows = []
    for shots in args.shots:
        for seed in args.seeds:
            for domain in args.tenants or clinc150.domains():
                cache = run_cache(runs_dir, domain, shots, seed, suffix)
                done = json.loads(cache.read_text()) if cache.exists() else None
                incomplete = done is None or (needs is not None and needs(done))
                if incomplete and cached_only:
                    continue
                if incomplete:
                    t0 = time.perf_counter()
                    peers = [loaded[d].as_teacher().adapters for d in clinc150.domains() if d != domain]
                    row = run(domain, shots, seed, peers, done)
                    row["seconds"] = round(time.perf_counter() - t0, 1) + (done or {}).get("seconds", 0.0)
                    cache.parent.mkdir(parents=True, exist_ok=True)
                    cache.write_text(json.dumps(row, indent=1))
                    accs = {m: round(100 * row[m]["test_accuracy"], 2) for m in methods if m in row}
                    log.warning("%s k=%d s=%d: %s (%.0fs)", domain, shots, seed, accs, row["seconds"])
                rows.append(json.loads(cache.read_text()))
    return rows


def throughput(backbone, teacher_paths: list[Path], texts: list[str], repeats: int) -> dict[str, float]:
    """Sequences/s on the same batch: bare encoder, one adapter (adapter = distill at inference), fusion of 10."""
    engine = Engine(backbone)
    single = load_artifact(teacher_paths[0], backbone).model
    ids = backbone.tokenize(texts, 32)
    fusion_cfg = RecipeConfig(method="fusion", stage2=TrainConfig(epochs=1))
    data = few_shot(read_tenant_data(clinc150.tenant_path("banking")), 1, 0)
    teachers = [load_artifact(p, backbone).as_teacher().adapters for p in teacher_paths[:9]]
    fusion_model, _ = train_fusion(backbone, data, fusion_cfg, single, teachers)

    def timed(fn) -> float:
        fn()
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        return len(texts) * repeats / (time.perf_counter() - t0)

    with torch.no_grad():
        rates = {
            "bare": timed(lambda: encode(backbone.model, ids["input_ids"], ids["attention_mask"])),
            "adapter": timed(lambda: engine.predict(texts, [single] * len(texts))),
            "fusion": timed(lambda: engine.predict(texts, [fusion_model] * len(texts))),
        }
    rates["distill"] = rates["adapter"]  # same artifact shape and forward; measured once
    from safetensors.torch import save as st_save

    from adistill.store.artifact import added_parameters

    state = {k: v.contiguous() for k, v in fusion_model.state_dict().items()}
    rates["fusion_artifact_bytes"] = len(st_save(state))
    rates["fusion_added_parameters"] = added_parameters(fusion_model)
    return rates


def summarise(rows: list[dict], sizes: dict, speed: dict, meta: dict) -> dict:
    table = {}
    for shots in sorted({r["shots"] for r in rows}):
        sub = [r for r in rows if r["shots"] == shots]
        avg = {m: 100 * statistics.mean(r[m]["test_accuracy"] for r in sub) for m in METHODS}
        wins = sum(r["distill"]["test_accuracy"] > r["adapter"]["test_accuracy"] for r in sub)
        ties = sum(r["distill"]["test_accuracy"] == r["adapter"]["test_accuracy"] for r in sub)
        table[str(shots)] = {"runs": len(sub), "average": avg, "distill_beats_adapter": wins, "ties": ties}
    return {"meta": meta, "summary": table, "sizes": sizes, "throughput": speed, "runs": rows}


def markdown(report: dict) -> str:
    lines = ["# CLINC150 leave-one-out: adapter vs fusion vs distill", ""]
    m = report["meta"]
    lines += [f"Backbone {m['backbone']} (frozen), {m['machine']}, seeds {m['seeds']}, {m['date']}.", ""]
    lines += [
        "| shots | runs | adapter | fusion | distill | distill − adapter | distill − fusion | distill > adapter |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for shots, s in report["summary"].items():
        a = s["average"]
        lines.append(
            f"| {shots} | {s['runs']} | {a['adapter']:.2f} | {a['fusion']:.2f} | {a['distill']:.2f} | "
            f"{a['distill'] - a['adapter']:+.2f} | {a['distill'] - a['fusion']:+.2f} | "
            f"{s['distill_beats_adapter']} (ties {s['ties']}) |"
        )
    lines += [
        "",
        "Per tenant (test accuracy %, in-scope queries):",
        "",
        "| tenant | shots | seed | adapter | fusion | distill |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        lines.append(
            f"| {r['tenant']} | {r['shots']} | {r['seed']} | "
            + " | ".join(f"{100 * r[x]['test_accuracy']:.2f}" for x in METHODS)
            + " |"
        )
    sp, sz = report["throughput"], report["sizes"]
    lines += [
        "",
        "Per tenant at inference (CPU throughput on one batch of 32 test queries, ratio to bare encoder):",
        "",
        "| method | added params (% of backbone) | artifact bytes | seq/s | ratio to bare |",
        "|---|---|---|---|---|",
    ]
    lines.append(f"| bare encoder | 0 | 0 | {sp['bare']:.0f} | 1.00 |")
    for x in METHODS:
        lines.append(
            f"| {x} | {sz[x]['percent_of_backbone']:.2f}% | {sz[x]['artifact_bytes']:,} | "
            f"{sp[x]:.0f} | {sp[x] / sp['bare']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shots = list(report["summary"])
    fig, axes = plt.subplots(1, len(shots), figsize=(6 * len(shots), 4), squeeze=False)
    for ax, k in zip(axes[0], shots):
        runs = [r for r in report["runs"] if str(r["shots"]) == k]
        tenants = sorted({r["tenant"] for r in runs})
        width = 0.27
        for j, method in enumerate(METHODS):
            vals = [
                100 * statistics.mean(r[method]["test_accuracy"] for r in runs if r["tenant"] == t) for t in tenants
            ]
            ax.bar([i + (j - 1) * width for i in range(len(tenants))], vals, width, label=method)
        ax.set_xticks(range(len(tenants)), tenants, rotation=45, ha="right", fontsize=8)
        ax.set_ylim(50, 100)
        ax.set_title(f"{k} shots per intent")
        ax.set_ylabel("test accuracy (%)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shots", type=int, nargs="+", default=[5, 10])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--tenants", nargs="+", default=None)
    p.add_argument("--teacher-epochs", type=int, default=8)
    p.add_argument("--epochs", type=int, default=40, help="epochs of stage 1, fusion and stage 2")
    p.add_argument("--patience", type=int, default=10)
    p.add_argument("--val-per-label", type=int, default=None, help="validation rows per intent (default: all 20)")
    p.add_argument("--workdir", default="runs/accuracy")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--unlabeled", type=int, default=None, help="N unlabelled queries per intent (transfer.py)")
    p.add_argument("--stage2-epochs", type=int, default=None, help="stage 2 / fusion epochs (default: --epochs)")
    p.add_argument("--stage2-patience", type=int, default=None, help="stage 2 / fusion patience (default: --patience)")
    p.add_argument("--transfer-ratio", type=float, default=TransferConfig().ratio)
    p.add_argument("--transfer-max", type=int, default=TransferConfig().max_per_epoch)
    p.add_argument("--fitted-teacher", action="store_true", help="also stage 2 with distill.teacher = fitted")
    p.add_argument("--augment", default=None, help="also distil over perturbed labelled queries (with --unlabeled)")
    p.add_argument("--student-noise", type=float, default=None, help="also the *_noisy rows (with --unlabeled)")
    p.add_argument("--neighbours", type=int, default=0, help="also the *_neighbours rows (with --student-noise)")
    p.add_argument("--neighbours-control", action="store_true", help="with --neighbours: also without teachers")
    p.add_argument(
        "--recipe-defaults",
        action="store_true",
        help="fusion and stage 2 (with --unlabeled: self-training and the transfer set too) on the library's "
        "defaults (RecipeConfig(): stage2, transfer); stage 1 still follows --epochs / --patience",
    )
    p.add_argument("--resume-from", default=None, help="with --unlabeled: a report whose runs count as cached")
    p.add_argument("--cached-only", action="store_true", help="with --unlabeled: train nothing, report the runs cached")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--note", default="", help="a sentence for the report (what was run, what was not)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.machine = f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    workdir, out = Path(args.workdir), Path(args.out)
    (workdir / "runs").mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    backbone = load_backbone()
    teachers = teacher_artifacts(backbone, workdir, args.teacher_epochs)
    stage1 = TrainConfig(epochs=args.epochs, lr=1e-3, patience=args.patience)
    if args.recipe_defaults:  # the library's stage 2 (and, in transfer.py, its transfer set)
        if args.stage2_epochs or args.stage2_patience:
            p.error("--recipe-defaults takes stage 2's settings from RecipeConfig(): drop --stage2-*")
        cfg = RecipeConfig(stage1=stage1)
    else:
        cfg = RecipeConfig(
            stage1=stage1,
            stage2=TrainConfig(
                epochs=args.stage2_epochs or args.epochs, lr=5e-4, patience=args.stage2_patience or args.patience
            ),
        )
    loaded = {d: load_artifact(p, backbone) for d, p in teachers.items()}
    if args.unlabeled is not None:
        from transfer import run_transfer  # benchmarks/transfer.py

        run_transfer(args, backbone, loaded, cfg, workdir, out)
        return
    rows = cached_runs(
        args,
        workdir / "runs",
        "",
        loaded,
        METHODS,
        lambda domain, shots, seed, peers, _: run_one(backbone, domain, shots, seed, peers, cfg, args.val_per_label),
    )
    texts = read_tenant_data(clinc150.tenant_path("banking")).test.texts[:32]
    speed = throughput(backbone, list(teachers.values()), texts, repeats=10)
    one = loaded["banking"]
    adapter_bytes = one.meta["files"]["adapter.safetensors"]["bytes"]
    pct = one.meta["parameters"]["percent_of_backbone"]
    sizes = {
        "adapter": {"percent_of_backbone": pct, "artifact_bytes": adapter_bytes},
        "distill": {"percent_of_backbone": pct, "artifact_bytes": adapter_bytes},
        "fusion": {
            "percent_of_backbone": round(100 * speed.pop("fusion_added_parameters") / backbone.num_parameters, 3),
            "artifact_bytes": int(speed.pop("fusion_artifact_bytes")),
        },
    }
    meta = {
        "backbone": backbone.name,
        "machine": f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)",
        "seeds": args.seeds,
        "date": time.strftime("%Y-%m-%d"),
        "epochs": args.epochs,
        "patience": args.patience,
        "teacher_epochs": args.teacher_epochs,
        "val_per_label": args.val_per_label,
        "teacher_val_accuracy": {d: a.meta["metrics"]["validation"]["accuracy"] for d, a in loaded.items()},
    }
    report = summarise(rows, sizes, speed, meta)
    (out / "accuracy.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "accuracy.md").write_text(markdown(report))
    chart(report, out / "accuracy.png")
    print(markdown(report))


if __name__ == "__main__":
    main()
