"""Teachers that know the new tenant's intents: does distillation then give more than self-distillation?

In benchmarks/transfer.py the teachers are the other 9 CLINC150 domains, which share no intent with the new tenant,
and the noised no-teacher control gains as much as distillation over them. Here a *sibling* joins those teachers: an
earlier tenant of the new tenant's own domain (on an FAQ platform, a second bank), trained like every teacher
(adapter, `--teacher-epochs`, patience 3) on `--per-intent` other training queries per intent, drawn (seeded) from
those that are none of the new tenant's k shots, unlabelled queries or test queries; its validation rows are CLINC's.

Each run trains stage 1 exactly as transfer.py does (its accuracy is checked against transfer.json's `adapter`), then,
over the 10 teachers (9 domains + the sibling), with the default recipe:

    sibling_fusion            AdapterFusion (labelled rows only)
    sibling_distill           stage 2 on the labelled rows, no transfer set
    sibling_distill_transfer  stage 2 with the unlabelled set and the noisy student (the default recipe)

and reports them beside transfer.json's rows of the same runs (no sibling): adapter, fusion, distill,
distill_transfer_noisy (the same recipe), transfer_no_teachers_noisy (the noised no-teacher control) and
self_training. Paired differences say what the sibling adds and which part of the gain only teachers give.

    python benchmarks/related_teachers.py --workdir W --seeds 0 1 2

W is accuracy.py's --workdir (its teachers and tenant files are reused); runs are cached under W/related. Writes
benchmarks/results/related_teachers.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from accuracy import cached_runs, subsample_validation, teacher_artifacts
from transfer import _record, _stderr, tenant_file

from adistill.backbone import load_backbone
from adistill.config import RecipeConfig, TrainConfig
from adistill.data import read_tenant_data
from adistill.datasets import clinc150
from adistill.recipes.baselines import train_fusion
from adistill.recipes.evaluate import accuracy
from adistill.recipes.stage1 import train_adapter
from adistill.recipes.stage2 import distill
from adistill.recipes.transfer import TransferInputs
from adistill.store.artifact import load_artifact

log = logging.getLogger("benchmarks.related_teachers")
RUN = ("sibling_fusion", "sibling_distill", "sibling_distill_transfer")
FITTED = "sibling_distill_transfer_fitted"  # with --fitted SEEDS: distill.teacher = fitted
KEPT = ("fusion", "distill", "distill_transfer_noisy", "transfer_no_teachers_noisy", "self_training")  # transfer.json
PAIRS = (  # (method, compared with): what each difference says
    ("sibling_distill_transfer", "distill_transfer_noisy", "what the sibling adds to the default recipe"),
    ("sibling_distill_transfer", "transfer_no_teachers_noisy", "the part only teachers give (vs the noised control)"),
    ("sibling_fusion", "fusion", "what the sibling adds to AdapterFusion"),
    ("sibling_distill", "distill", "what the sibling adds to distillation on the labelled rows"),
)
TARGETS = (("adapter", 2.0), ("sibling_fusion", 1.0), ("fusion", 1.0), ("self_training", 0.5))  # issue 17, 5 shots


def sibling_file(domain: str, shots: int, seed: int, per_intent: int, taken: set[str], folder: Path) -> Path:
    """The sibling tenant's data: `per_intent` training queries per intent not in `taken`, and CLINC's validation."""
    full = read_tenant_data(clinc150.tenant_path(domain))
    rng = random.Random(f"sibling:{domain}:{seed}:{shots}")
    by_label: dict[str, list[str]] = {}
    for text, label in zip(full.train.texts, full.train.labels):
        if text not in taken:
            by_label.setdefault(label, []).append(text)
    rows = [
        {"text": t, "label": y, "split": "train"}
        for y in sorted(by_label)
        for t in rng.sample(by_label[y], min(per_intent, len(by_label[y])))
    ]
    rows += [r for r in pq.read_table(clinc150.tenant_path(domain)).to_pylist() if r["split"] == "validation"]
    path = folder / f"{domain}-k{shots}-s{seed}-p{per_intent}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def run_one(
    backbone, domain: str, shots: int, seed: int, peers: list, args, base: dict[str, Any], done: dict[str, Any] | None
) -> dict[str, Any]:
    """One run: the sibling, stage 1 and every method not already in `done` (an earlier run's row, kept)."""
    cfg = RecipeConfig(
        stage1=TrainConfig(epochs=args.epochs, lr=1e-3, patience=args.patience),
        stage2=TrainConfig(epochs=args.stage2_epochs, lr=5e-4, patience=args.stage2_patience),
        shots=shots,
        seed=seed,
    )
    workdir = Path(args.workdir)
    source = tenant_file(domain, shots, seed, args.unlabeled, workdir / "transfer" / "data")
    data = subsample_validation(read_tenant_data(str(source)), args.val_per_label, seed)
    taken = set(data.train.texts) | set(data.unlabeled) | set(data.test.texts)
    sibling_data = read_tenant_data(
        str(sibling_file(domain, shots, seed, args.per_intent, taken, workdir / "related" / "data"))
    )
    teacher_cfg = RecipeConfig(method="adapter", stage1=TrainConfig(epochs=args.teacher_epochs, lr=1e-3, patience=3))
    t0 = time.perf_counter()
    sibling, sibling_fit = train_adapter(backbone, sibling_data, teacher_cfg.replace(seed=seed))
    row: dict[str, Any] = {"tenant": domain, "shots": shots, "seed": seed, **(done or {})}
    row["sibling"] = {
        "train_examples": len(sibling_data.train),
        "val_accuracy": sibling_fit.best_val_accuracy,
        "train_seconds": round(time.perf_counter() - t0, 1),
    }
    t0 = time.perf_counter()
    stage1, fit = train_adapter(backbone, data, cfg)
    row["adapter"] = _record(backbone, stage1, fit, data, cfg, time.perf_counter() - t0)
    if row["adapter"]["test_accuracy"] != base["adapter"]["test_accuracy"]:
        raise RuntimeError(f"{domain} k={shots} s={seed}: stage 1 differs from transfer.json's; not the same run")
    teachers = [*peers, sibling.adapters]
    none = TransferInputs([], "none")
    for method, train in (
        ("sibling_fusion", lambda: train_fusion(backbone, data, cfg, stage1, teachers)),
        ("sibling_distill", lambda: distill(backbone, data, cfg, stage1, teachers, transfer=none)),
        ("sibling_distill_transfer", lambda: distill(backbone, data, cfg, stage1, teachers)),
    ):
        if method in row:
            continue
        t0 = time.perf_counter()
        model, fit = train()
        row[method] = _record(backbone, model, fit, data, cfg, time.perf_counter() - t0)
    if seed in args.fitted and FITTED not in row:  # the fusion fitted first (as sibling_fusion), then frozen
        t0 = time.perf_counter()
        fusion, _ = train_fusion(backbone, data, cfg, stage1, teachers)
        fitted = cfg.replace(distill=cfg.distill.replace(teacher="fitted"))
        model, fit = distill(backbone, data, fitted, stage1, teachers, fitted_teacher=fusion)
        row[FITTED] = _record(backbone, model, fit, data, cfg, time.perf_counter() - t0)  # seconds: both fits
        row[FITTED]["teacher_test_accuracy"] = accuracy(backbone, fusion, data.test, cfg.max_length)
    for method in KEPT:
        row[method] = base[method]
    return row


def _paired(rows: list[dict[str, Any]], a: str, b: str) -> dict[str, Any]:
    diff = [100 * (r[a]["test_accuracy"] - r[b]["test_accuracy"]) for r in rows]
    return {
        "method": a,
        "versus": b,
        "difference": statistics.mean(diff),
        "stderr": _stderr(diff),
        "wins": sum(d > 0 for d in diff),
        "losses": sum(d < 0 for d in diff),
    }


def _stats(rows: list[dict[str, Any]], methods: tuple[str, ...]) -> dict[str, Any]:
    """Per method: test accuracy % (mean, s.e.), paired gain over `adapter`, seconds and best epoch."""
    stats = {}
    for m in methods:
        acc = [100 * r[m]["test_accuracy"] for r in rows]
        gain = _paired(rows, m, "adapter")
        stats[m] = {
            "mean": statistics.mean(acc),
            "stderr": _stderr(acc),
            "gain": gain["difference"],
            "gain_stderr": gain["stderr"],
            "wins": gain["wins"],
            "losses": gain["losses"],
            "seconds": statistics.mean(r[m]["train_seconds"] for r in rows),
            "best_epoch": statistics.mean(r[m]["best_epoch"] for r in rows),
        }
    return stats


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    stats = _stats(rows, ("adapter", *KEPT, *RUN))
    targets = []
    for other, margin in TARGETS:
        diff = stats["sibling_distill_transfer"]["mean"] - stats[other]["mean"]
        targets.append({"versus": other, "margin": margin, "difference": diff, "met": diff >= margin})
    summary = {
        "runs": len(rows),
        "seeds": sorted({r["seed"] for r in rows}),
        "sibling_val_accuracy": statistics.mean(100 * r["sibling"]["val_accuracy"] for r in rows),
        "stats": stats,
        "pairs": [{**_paired(rows, a, b), "says": says} for a, b, says in PAIRS],
        "targets": targets,
    }
    some = [r for r in rows if FITTED in r]
    if some:  # --fitted ran on some runs: that row, and on the same runs the rows it compares with
        summary["fitted"] = {
            "runs": len(some),
            "seeds": sorted({r["seed"] for r in some}),
            "teacher": statistics.mean(100 * r[FITTED]["teacher_test_accuracy"] for r in some),
            "stats": _stats(some, ("adapter", "distill_transfer_noisy", "transfer_no_teachers_noisy", *RUN, FITTED)),
            "pairs": [
                {**_paired(some, FITTED, b), "says": says}
                for b, says in (
                    ("sibling_distill_transfer", "a fitted, frozen teacher vs the joint one"),
                    ("sibling_fusion", "the student vs a fusion fitted like its teacher"),
                    ("transfer_no_teachers_noisy", "the part only teachers give (vs the noised control)"),
                )
            ],
        }
    return summary


def _table(stats: dict[str, Any]) -> list[str]:
    lines = [
        "| method | test acc % (mean ± s.e.) | gain over adapter (± s.e.) | wins / losses | seconds | best epoch |",
        "|---|---|---|---|---|---|",
    ]
    for m, t in stats.items():
        lines.append(
            f"| {m} | {t['mean']:.2f} ± {t['stderr']:.2f} | {t['gain']:+.2f} ± {t['gain_stderr']:.2f} "
            f"| {t['wins']} / {t['losses']} | {t['seconds']:.1f} | {t['best_epoch']:.1f} |"
        )
    return lines


def _pairs(pairs: list[dict[str, Any]]) -> list[str]:
    return [
        f"- {p['method']} − {p['versus']}: {p['difference']:+.2f} ± {p['stderr']:.2f} ({p['wins']} / "
        f"{p['losses']}): {p['says']}"
        for p in pairs
    ]


def markdown(report: dict[str, Any]) -> str:
    meta, s = report["meta"], report["summary"]
    lines = [
        "# Teachers that know the new tenant's intents (CLINC150, a sibling tenant among the teachers)",
        "",
        f"Backbone {meta['backbone']} (frozen), {meta['machine']}, {meta['date']}. {s['runs']} runs: "
        f"{meta['tenants']} tenants x seeds {s['seeds']}, {'/'.join(map(str, meta['shots']))} shots, the unlabelled "
        f"set of transfer.json (N = {meta['unlabeled_per_intent']} per intent + the domain's out-of-scope queries). "
        f"The sibling: the same domain's intents, {meta['per_intent']} other training queries per intent (none of the "
        f"new tenant's shots, unlabelled or test queries), validation accuracy {s['sibling_val_accuracy']:.2f} % on "
        f"average; it joins the 9 other domains' teachers. Rows without `sibling_` are transfer.json's (same runs, "
        "same stage 1, the 9 teachers only).",
        "",
        f"Run: `{meta['command']}`. {meta['note']}".rstrip(),
        "",
    ]
    lines += _table(s["stats"])
    lines += ["", "Paired differences (points, mean ± s.e., wins / losses):", "", *_pairs(s["pairs"])]
    lines += ["", "Issue 17's 5-shot targets, held to sibling_distill_transfer:", ""]
    for t in s["targets"]:
        verdict = "met" if t["met"] else "**not met**"
        lines.append(f"- vs {t['versus']}: {t['difference']:+.2f} (target ≥ +{t['margin']:.1f}): {verdict}")
    if "fitted" in s:
        fitted = s["fitted"]
        lines += [
            "",
            f"## A teacher fitted first ({fitted['runs']} runs, seeds {fitted['seeds']}; `--fitted`)",
            "",
            f"`{FITTED}`: the default recipe with `distill.teacher: fitted`: the fusion over the 10 teachers is fitted "
            "on the labelled rows first (as `sibling_fusion`, fitted again: test accuracy "
            f"{fitted['teacher']:.2f} % on these runs), then frozen while the student learns from it; its seconds "
            "include both fits. The other rows are the same runs' from above.",
            "",
            *_table(fitted["stats"]),
            "",
            *_pairs(fitted["pairs"]),
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/accuracy", help="accuracy.py's --workdir")
    p.add_argument("--shots", type=int, nargs="+", default=[5])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--tenants", nargs="+", default=None)
    p.add_argument("--per-intent", type=int, default=20, help="the sibling's training queries per intent")
    p.add_argument("--transfer", default="benchmarks/results/transfer.json", help="the runs compared with")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--fitted", type=int, nargs="*", default=[], help=f"seeds that also get the row {FITTED}")
    p.add_argument("--note", default="", help="a sentence for the report")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    torch.manual_seed(0)
    base = json.loads(Path(args.transfer).read_text())
    for key in ("epochs", "patience", "stage2_epochs", "stage2_patience", "val_per_label"):
        setattr(args, key, base["meta"][key])  # the settings transfer.json's runs were made with
    args.unlabeled = base["meta"]["unlabeled_per_intent"]
    args.teacher_epochs = 8
    runs = {(r["tenant"], r["shots"], r["seed"]): r for r in base["runs"]}
    backbone = load_backbone()
    teachers = teacher_artifacts(backbone, Path(args.workdir), args.teacher_epochs)
    loaded = {d: load_artifact(path, backbone) for d, path in teachers.items()}
    rows = cached_runs(
        args,
        Path(args.workdir) / "related" / "runs",
        f"-p{args.per_intent}",
        loaded,
        ("adapter", "distill_transfer_noisy", *RUN, FITTED),
        lambda domain, shots, seed, peers, done: run_one(
            backbone, domain, shots, seed, peers, args, runs[(domain, shots, seed)], done
        ),
        lambda row: row["seed"] in args.fitted and FITTED not in row,
    )
    meta = {
        "backbone": backbone.name,
        "machine": f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)",
        "date": time.strftime("%Y-%m-%d"),
        "shots": args.shots,
        "tenants": len({r["tenant"] for r in rows}),
        "per_intent": args.per_intent,
        "unlabeled_per_intent": args.unlabeled,
        "recipe": RecipeConfig().transfer.to_dict(),
        "command": "python benchmarks/related_teachers.py "
        + f"--workdir {args.workdir} --seeds {' '.join(map(str, args.seeds))}"
        + (f" --fitted {' '.join(map(str, args.fitted))}" if args.fitted else ""),
        "note": args.note,
    }
    report = {"meta": meta, "summary": summarise(rows), "runs": rows}
    out = Path(args.out)
    (out / "related_teachers.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "related_teachers.md").write_text(markdown(report))
    log.warning("\n%s", markdown(report))


if __name__ == "__main__":
    main()
