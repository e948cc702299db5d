"""Which teachers, and how many: distill accuracy per teacher selector and k on CLINC150 (issue: teacher selection).

Leave-one-out as in benchmarks/accuracy.py: each of the 10 domains is the new tenant at 5 shots per intent, the
other 9 domains' adapters (runs/accuracy/teachers/, written by benchmarks/accuracy.py, read only) are the
published candidates. Every candidate carries the data embedding an artifact records at publish time (the mean
bare-encoder embedding of its training queries); selection runs through `adistill.selection.choose_teachers`, exactly as
`onboard`, `train` and `tune` call it. Stage 1 is trained once per (tenant, seed) and shared; stage 2 runs once per
distinct teacher set (selectors that pick the same set share the run). Selectors: `random` (seeded by the run's
seed), `similar`, `probe`, at k = 1, 3, 5, and all 9 (every selector's k = 9); plus `dissimilar` (the k *least*
similar, k = 1, 3), a deliberately bad teacher set. Results are cached per (tenant, seed) under --workdir, so an
interrupted run resumes; `--report` writes the report from whatever is cached.
Writes benchmarks/results/teacher_selection.{json,md,png}.

    python benchmarks/teacher_accuracy.py                  # 10 tenants, seeds 0 1 2
    python benchmarks/teacher_accuracy.py --seeds 0 --tenants banking meta
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
from pathlib import Path

import torch
from accuracy import subsample_validation  # benchmarks/accuracy.py: the same validation subset for the same seed

from adistill.backbone import load_backbone
from adistill.config import RecipeConfig, TrainConfig
from adistill.data import TenantData, few_shot, read_tenant_data
from adistill.datasets import clinc150
from adistill.recipes.evaluate import accuracy
from adistill.recipes.stage1 import train_adapter
from adistill.recipes.stage2 import distill
from adistill.selection import (
    ArtifactPool,
    Candidate,
    SelectionConfig,
    choose_teachers,
    data_embedding,
    rank_by_similarity,
)
from adistill.store.artifact import Artifact, load_artifact

log = logging.getLogger("benchmarks.teacher_accuracy")
SELECTORS = ("random", "similar", "probe")
KS = (1, 3, 5)
BAD_KS = (1, 3)


def candidates(backbone, teachers_dir: Path) -> tuple[list[Candidate], ArtifactPool]:
    """Every cached teacher as a published candidate with the metadata onboarding records (data embedding)."""
    out, artifacts = [], []
    for domain in clinc150.domains():
        path = teachers_dir / domain
        if not (path / "adapter_config.json").is_file():
            raise SystemExit(f"teacher {path} missing: run benchmarks/accuracy.py first (it trains and caches them)")
        artifact = load_artifact(path, backbone)
        texts = read_tenant_data(clinc150.tenant_path(domain)).train.texts
        record = {**artifact.meta.get("data", {}), "embedding": data_embedding(backbone, texts)}
        meta = {**artifact.meta, "data": record}
        out.append(Candidate(domain, 1, meta))
        artifacts.append(Artifact({**meta, "version": 1}, artifact.model))
    return out, ArtifactPool(artifacts)


def teacher_sets(
    pool: list[Candidate], loaded: ArtifactPool, backbone, domain: str, data: TenantData, seed: int
) -> dict:
    """{(selector, k): (teacher ids, scores, seconds)} for this new tenant."""
    sets = {}
    texts = data.train.texts
    for strategy in SELECTORS:
        for k in KS:
            t0 = time.perf_counter()
            sel = choose_teachers(
                loaded,
                domain,
                backbone,
                RecipeConfig(),
                SelectionConfig(strategy=strategy, k=k, seed=seed),  # type: ignore[arg-type]
                data,
            )
            sets[(strategy, k)] = ([c.tenant_id for c in sel.chosen], sel.scores, time.perf_counter() - t0)
    others = [c for c in pool if c.tenant_id != domain]
    sets[("all", len(others))] = ([c.tenant_id for c in others], {}, 0.0)
    ranked = rank_by_similarity(others, torch.tensor(data_embedding(backbone, texts)))
    for k in BAD_KS:
        worst = ranked[::-1][:k]
        sets[("dissimilar", k)] = ([c.tenant_id for c, _ in worst], {c.tenant_id: s for c, s in worst}, 0.0)
    sets[("none", 0)] = ([], {}, 0.0)  # control: stage 2 with no other tenant (the fusion holds only its own adapter)
    return sets


def tenant_data(domain: str, shots: int, seed: int, val_per_label: int) -> TenantData:
    data = few_shot(read_tenant_data(clinc150.tenant_path(domain)), shots, seed)
    return subsample_validation(data, val_per_label, seed)


def stage2_run(backbone, data: TenantData, cfg: RecipeConfig, stage1, teachers: list) -> dict:
    t0 = time.perf_counter()
    model, fit = distill(backbone, data, cfg, stage1, teachers)
    return {
        "test_accuracy": accuracy(backbone, model, data.test, cfg.max_length),
        "val_accuracy": fit.best_val_accuracy,
        "best_epoch": fit.best_epoch,
        "epochs_run": fit.epochs_run,
        "train_seconds": round(time.perf_counter() - t0, 1),
    }


def add_control(backbone, row: dict, cfg: RecipeConfig, val_per_label: int) -> None:
    """Back-fill the no-teacher control into a cached run (stage 1 is retrained: same seed, same model)."""
    data = tenant_data(row["tenant"], row["shots"], row["seed"], val_per_label)
    cfg = cfg.replace(shots=row["shots"], seed=row["seed"])
    stage1, _ = train_adapter(backbone, data, cfg)
    same = accuracy(backbone, stage1, data.test, cfg.max_length)
    if abs(same - row["adapter"]["test_accuracy"]) > 1e-6:  # recorded, not hidden: the control then starts elsewhere
        log.warning("%s s%d: stage 1 did not reproduce (%.4f vs cached)", row["tenant"], row["seed"], same)
        row["control_stage1_test_accuracy"] = same
    result = stage2_run(backbone, data, cfg, stage1, [])
    row["selections"].append(
        {"selector": "none", "k": 0, "teachers": [], "scores": {}, "select_seconds": 0.0, **result}
    )


def run_one(backbone, pool, loaded, domain: str, shots: int, seed: int, cfg: RecipeConfig, val_per_label: int) -> dict:
    data = tenant_data(domain, shots, seed, val_per_label)
    cfg = cfg.replace(shots=shots, seed=seed)
    t0 = time.perf_counter()
    stage1, fit1 = train_adapter(backbone, data, cfg)
    row: dict = {
        "tenant": domain,
        "shots": shots,
        "seed": seed,
        "adapter": {
            "test_accuracy": accuracy(backbone, stage1, data.test, cfg.max_length),
            "val_accuracy": fit1.best_val_accuracy,
            "train_seconds": round(time.perf_counter() - t0, 1),
        },
        "selections": [],
    }
    by_set: dict[tuple[str, ...], dict] = {}
    for (strategy, k), (ids, scores, seconds) in teacher_sets(pool, loaded, backbone, domain, data, seed).items():
        key = tuple(sorted(ids))
        if key not in by_set:  # the same teachers in the same order: one stage-2 run serves every selector
            by_set[key] = stage2_run(backbone, data, cfg, stage1, [loaded.by_id[t].as_teacher().adapters for t in key])
        row["selections"].append(
            {
                "selector": strategy,
                "k": k,
                "teachers": list(key),
                "scores": {t: round(s, 4) for t, s in scores.items()},
                "select_seconds": round(seconds, 4),
                **by_set[key],
            }
        )
    row["stage2_runs"] = len(by_set)
    return row


def summarise(rows: list[dict]) -> dict:
    """Mean test accuracy per (selector, k) over every (tenant, seed), its spread over seeds, and vs adapter."""
    seeds = sorted({r["seed"] for r in rows})
    adapter = 100 * statistics.mean(r["adapter"]["test_accuracy"] for r in rows)
    cells: dict[str, dict[str, dict]] = {}
    for sel in sorted({(s["selector"], s["k"]) for r in rows for s in r["selections"]}):
        pairs = [(r, s) for r in rows for s in r["selections"] if (s["selector"], s["k"]) == sel]
        acc = [100 * s["test_accuracy"] for _, s in pairs]
        gain = [100 * (s["test_accuracy"] - r["adapter"]["test_accuracy"]) for r, s in pairs]
        per_seed = [
            statistics.mean(100 * s["test_accuracy"] for r, s in pairs if r["seed"] == x)
            for x in seeds
            if any(r["seed"] == x for r, _ in pairs)
        ]
        cells.setdefault(sel[0], {})[str(sel[1])] = {
            "runs": len(pairs),
            "test_accuracy": statistics.mean(acc),
            "gain_over_adapter": statistics.mean(gain),
            "gain_stderr": statistics.stdev(gain) / len(gain) ** 0.5 if len(gain) > 1 else 0.0,
            "wins": sum(g > 0 for g in gain),
            "losses": sum(g < 0 for g in gain),
            "seed_std": statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0,
            "select_ms": 1000 * statistics.mean(s["select_seconds"] for _, s in pairs),
            "stage2_seconds": statistics.mean(s["train_seconds"] for _, s in pairs),
        }
    overlap = {}
    for k in KS:
        same = [
            {tuple(s["teachers"]) for s in r["selections"] if s["k"] == k and s["selector"] in ("similar", "probe")}
            for r in rows
        ]
        overlap[str(k)] = sum(len(x) == 1 for x in same)
    return {"adapter": adapter, "cells": cells, "similar_equals_probe": overlap, "seeds": seeds}


def markdown(report: dict) -> str:
    m, s = report["meta"], report["summary"]
    lines = [
        "# Teacher selection on CLINC150: distill accuracy per selector and k",
        "",
        f"Leave-one-out over {m['tenants']} tenants x seeds {s['seeds']} ({m['runs']} runs), {m['shots']} shots per "
        f"intent, 9 published candidates, backbone {m['backbone']} (frozen), {m['machine']}, {m['date']}. "
        f"Stage 1 and stage 2: at most {m['epochs']} epochs, patience {m['patience']} (stage 1) and "
        f"{m['stage2_patience']} (stage 2), validation {m['val_per_label']} per intent; test accuracy % on the "
        "in-scope test queries, mean over runs.",
        "",
        f"`adapter` (stage 1 alone, no teachers): **{s['adapter']:.2f}**",
        "",
        "| selector | k = 1 | k = 3 | k = 5 | all 9 |",
        "|---|---|---|---|---|",
    ]
    allk = next(iter(s["cells"].get("all", {}).values()), None)
    for selector in (*SELECTORS, "dissimilar"):
        row = s["cells"].get(selector, {})
        cols = []
        for k in KS:
            c = row.get(str(k))
            cols.append("-" if c is None else f"{c['test_accuracy']:.2f} ({c['gain_over_adapter']:+.2f})")
        cols.append("-" if allk is None or selector == "dissimilar" else f"{allk['test_accuracy']:.2f}")
        lines.append(f"| {selector} | " + " | ".join(cols) + " |")
    control = s["cells"].get("none", {}).get("0")
    if control is not None:
        lines.append(
            f"| none (control: k = 0, the fusion holds only the tenant's own adapter) | "
            f"{control['test_accuracy']:.2f} ({control['gain_over_adapter']:+.2f}) | | | |"
        )
    lines += [
        "",
        "In brackets: mean gain over `adapter` in points (paired, per run). Per cell: the mean gain ± its standard",
        "error over runs, runs where distill beats / loses to `adapter`, the standard deviation of the per-seed means,",
        "stage-2 seconds and selection time:",
        "",
        "| selector | k | runs | mean gain ± s.e. | wins / losses | seed std | stage-2 s | selection ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for selector in ("none", *SELECTORS, "all", "dissimilar"):
        for k, c in sorted(s["cells"].get(selector, {}).items(), key=lambda kc: int(kc[0])):
            lines.append(
                f"| {selector} | {k} | {c['runs']} | {c['gain_over_adapter']:+.2f} ± {c['gain_stderr']:.2f} | "
                f"{c['wins']} / {c['losses']} | "
                f"{c['seed_std']:.2f} | {c['stage2_seconds']:.1f} | {c['select_ms']:.1f} |"
            )
    lines += [
        "",
        "Runs where `similar` and `probe` chose the very same teachers: "
        + ", ".join(f"k={k}: {n}/{m['runs']}" for k, n in s["similar_equals_probe"].items()),
        "",
        "Teachers chosen by `similar` at k = 3 (seed 0):",
        "",
        "| tenant | teachers (cosine similarity of data embeddings) |",
        "|---|---|",
    ]
    for r in report["runs"]:
        if r["seed"] != s["seeds"][0]:
            continue
        pick = next(x for x in r["selections"] if x["selector"] == "similar" and x["k"] == 3)
        lines.append(f"| {r['tenant']} | " + ", ".join(f"{t} {v:.3f}" for t, v in pick["scores"].items()) + " |")
    return "\n".join(lines) + "\n"


def chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = report["summary"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    allk = next(iter(s["cells"].get("all", {}).items()), None)
    for selector, marker in (("random", "o"), ("similar", "s"), ("probe", "^"), ("dissimilar", "v")):
        cells = s["cells"].get(selector, {})
        ks = sorted(int(k) for k in cells)
        ys = [cells[str(k)]["test_accuracy"] for k in ks]
        es = [cells[str(k)]["gain_stderr"] for k in ks]
        if allk is not None and selector != "dissimilar":
            ks, ys, es = ks + [int(allk[0])], ys + [allk[1]["test_accuracy"]], es + [allk[1]["gain_stderr"]]
        shift = {"random": -0.12, "similar": 0.0, "probe": 0.12, "dissimilar": 0.06}[selector]
        ax.errorbar(
            [k + shift for k in ks],
            ys,
            yerr=es,
            marker=marker,
            capsize=3,
            label=selector,
            ls=":" if selector == "dissimilar" else "-",
        )
    ax.axhline(s["adapter"], color="gray", ls="--", lw=1, label="adapter (stage 1 only)")
    control = s["cells"].get("none", {}).get("0")
    if control is not None:
        ax.axhline(control["test_accuracy"], color="black", ls="-.", lw=1, label="stage 2, no teacher (k = 0)")
    ax.set_xticks([1, 3, 5, 9], ["1", "3", "5", "9 (all)"])
    ax.set_xlabel("teachers k")
    ax.set_ylabel("test accuracy (%), mean over runs")
    ax.set_title(
        f"distill on CLINC150, {report['meta']['shots']} shots, {report['meta']['runs']} runs "
        "(bars: ±1 s.e. of the gain over adapter)",
        fontsize=10,
    )
    low, high = ax.get_ylim()
    ax.set_ylim(low, high + 0.35 * (high - low))
    ax.legend(fontsize=8, loc="upper left", ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--tenants", nargs="+", default=None)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--patience", type=int, default=8, help="stage-1 patience")
    p.add_argument("--stage2-patience", type=int, default=4, help="stage 2 peaks at epoch 1-3 (accuracy.md)")
    p.add_argument("--val-per-label", type=int, default=10)
    p.add_argument("--teachers", default="runs/accuracy/teachers", help="teacher artifact folders (read only)")
    p.add_argument("--workdir", default="runs/teacher_accuracy")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--report", action="store_true", help="only write the report from the cached runs")
    p.add_argument("--controls-only", action="store_true", help="only add the k = 0 control to cached runs")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    workdir, out = Path(args.workdir) / "runs", Path(args.out)
    workdir.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    backbone = load_backbone()
    cfg = RecipeConfig(
        stage1=TrainConfig(epochs=args.epochs, lr=1e-3, patience=args.patience),
        stage2=TrainConfig(epochs=args.epochs, lr=5e-4, patience=args.stage2_patience),
    )
    tenants = args.tenants or clinc150.domains()
    if not args.report:
        pool, loaded = candidates(backbone, Path(args.teachers))
    rows = []
    for seed in args.seeds:  # seed-major: an interrupted run still covers every tenant at the first seeds
        for domain in tenants:
            cache = workdir / f"{domain}-k{args.shots}-s{seed}.json"
            if not cache.exists() and not (args.report or args.controls_only):
                t0 = time.perf_counter()
                row = run_one(backbone, pool, loaded, domain, args.shots, seed, cfg, args.val_per_label)
                row["seconds"] = round(time.perf_counter() - t0, 1)
                cache.write_text(json.dumps(row, indent=1))
                log.warning(
                    "%s s=%d: adapter %.2f, %d stage-2 runs (%.0fs)",
                    domain,
                    seed,
                    100 * row["adapter"]["test_accuracy"],
                    row["stage2_runs"],
                    row["seconds"],
                )
            if not cache.exists():
                continue
            row = json.loads(cache.read_text())
            if not args.report and not any(x["selector"] == "none" for x in row["selections"]):
                add_control(backbone, row, cfg, args.val_per_label)  # runs cached before the control existed
                cache.write_text(json.dumps(row, indent=1))
                log.warning("%s s=%d: no-teacher control added", domain, seed)
            rows.append(row)
    report = {
        "meta": {
            "backbone": backbone.name,
            "shots": args.shots,
            "tenants": len({r["tenant"] for r in rows}),
            "runs": len(rows),
            "epochs": args.epochs,
            "patience": args.patience,
            "stage2_patience": args.stage2_patience,
            "val_per_label": args.val_per_label,
            "machine": f"{platform.machine()} CPU, 1 torch thread, shared with other work",
            "date": time.strftime("%Y-%m-%d"),
        },
        "summary": summarise(rows),
        "runs": rows,
    }
    (out / "teacher_selection.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "teacher_selection.md").write_text(markdown(report))
    chart(report, out / "teacher_selection.png")
    log.warning("written %s", out / "teacher_selection.md")


if __name__ == "__main__":
    main()
