"""What the earlier tenants' adapters know about a new tenant's unlabelled queries: the signal stage 2 distils.

Stage 2 passes on what its fused teacher knows beyond the student's own adapter (docs/method.md). This benchmark
measures that directly, on the runs of `accuracy.py --unlabeled N` (same data files, teachers, stage 1 and recipe;
same --workdir): the unlabelled queries are CLINC150 training queries with their labels removed, so the targets a
teacher gives them can be scored against the labels. Per run, from the run's stage-1 adapter:

    adapter      the stage-1 adapter: the targets a teacher holding only the tenant's own adapter starts from
    fusion       AdapterFusion over the 9 other domains' adapters + the tenant's own, fitted on the labelled rows
                 (the frozen teacher of distill.teacher = fitted; the joint teacher is this fusion trained with
                 the student)
    fusion_own   the same fusion fitted over the tenant's own adapter only (the fusion's training, no teachers)

On the in-scope unlabelled queries: accuracy, the probability the distillation target softmax(z / τ) puts on the true
intent, and, where the adapter and the fusion disagree, how often each is right; and the fusion's attention: the
share of its softmax weight over adapters that falls on the tenant's own adapter (mean over real tokens, layers and
sites; 0.1 would be uniform over the 10 adapters).

Writes benchmarks/results/teacher_signal.{json,md}; runs are cached under --workdir/teacher_signal.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from accuracy import cached_runs, run_cache, start_transfer_benchmark, stderr, subsample_validation
from transfer import tenant_file

from adistill.config import RecipeConfig, TrainConfig
from adistill.data import read_tenant_data
from adistill.datasets import clinc150
from adistill.encoder import encode
from adistill.fusion import FusionSet
from adistill.model import Encoded, TenantModel
from adistill.recipes.baselines import train_fusion
from adistill.recipes.evaluate import accuracy, predict_logits
from adistill.recipes.stage1 import train_adapter

MODELS = ("adapter", "fusion", "fusion_own")


class _OwnShare:
    """A route through `fusion` that sums the attention weight its last member gets on the real tokens of `real`."""

    def __init__(self, fusion: FusionSet) -> None:
        self.fusion, self.total, self.count = fusion, 0.0, 0
        self.real = torch.zeros(0, dtype=torch.bool)

    def __call__(self, layer: int, site: str, x: torch.Tensor) -> torch.Tensor:
        if site not in self.fusion.sites:
            return x
        members = [a.site(layer, site) for a in self.fusion.members()]
        out, weights = self.fusion.layers[layer][site].forward_with_weights(x, members)  # type: ignore[index]
        own = weights[..., -1][self.real]
        self.total, self.count = self.total + float(own.sum()), self.count + own.numel()
        return out


@torch.no_grad()
def own_share(backbone, model: TenantModel, texts: list[str], max_length: int, batch_size: int = 64) -> float:
    """Mean attention weight the fusion gives its last member (the tenant's own adapter) over the real tokens of
    `texts`, at every fused site of every layer."""
    assert isinstance(model.adapters, FusionSet)
    route = _OwnShare(model.adapters)
    encoded = Encoded(backbone, texts, [0] * len(texts), max_length)
    for start in range(0, len(texts), batch_size):
        batch = encoded.batch(list(range(start, min(start + batch_size, len(texts)))))
        route.real = batch.attention_mask.bool()
        encode(backbone.model, batch.input_ids, batch.attention_mask, route)
    return route.total / route.count


def scored(backbone, model: TenantModel, texts: list[str], truth: torch.Tensor, cfg: RecipeConfig) -> dict[str, Any]:
    """Predictions on `texts`, accuracy against the label ids `truth` and the mean target probability of the truth."""
    logits = predict_logits(backbone, model, texts, cfg.max_length)
    target = (logits / cfg.distill.temperature).softmax(-1)
    predicted = logits.argmax(-1)
    return {
        "predicted": predicted,
        "accuracy": float((predicted == truth).float().mean()),
        "p_true": float(target[torch.arange(len(texts)), truth].mean()),
    }


# transfer.json's stage-2 rows on the same runs: what the students reached from these signals
DISTILLED = ("distill_transfer_noisy", "transfer_no_teachers_noisy", "distill_transfer_fitted")


def run_one(backbone, domain, shots, seed, teachers, cfg: RecipeConfig, args, workdir: Path) -> dict[str, Any]:
    data = subsample_validation(
        read_tenant_data(str(tenant_file(domain, shots, seed, args.unlabeled, workdir / "transfer" / "data"))),
        args.val_per_label,
        seed,
    )
    cfg = cfg.replace(shots=shots, seed=seed)
    full = read_tenant_data(clinc150.tenant_path(domain))
    labels = dict(zip(full.train.texts, full.train.labels))
    texts = [t for t in data.unlabeled if t in labels]  # in scope: the out-of-scope rows have no intent to score
    stage1, _ = train_adapter(backbone, data, cfg)
    truth = torch.tensor([stage1.labels.index(labels[t]) for t in texts])  # every model keeps stage 1's labels
    models = {"adapter": stage1}
    t0 = time.perf_counter()
    models["fusion"], fit = train_fusion(backbone, data, cfg, stage1, teachers)
    fusion_seconds = time.perf_counter() - t0
    models["fusion_own"], fit_own = train_fusion(backbone, data, cfg, stage1, [])
    row: dict[str, Any] = {"tenant": domain, "shots": shots, "seed": seed, "in_scope_unlabeled": len(texts)}
    results = {name: scored(backbone, m, texts, truth, cfg) for name, m in models.items()}
    for name, model in models.items():
        row[name] = {
            "test_accuracy": accuracy(backbone, model, data.test, cfg.max_length),
            "unlabeled_accuracy": results[name]["accuracy"],
            "unlabeled_p_true": results[name]["p_true"],
        }
    row["fusion"] |= {"best_epoch": fit.best_epoch, "seconds": round(fusion_seconds, 1)}
    row["fusion_own"]["best_epoch"] = fit_own.best_epoch
    a, f = results["adapter"]["predicted"], results["fusion"]["predicted"]
    differ = a != f
    row["disagree"] = {
        "rows": int(differ.sum()),
        "fusion_right": int((f[differ] == truth[differ]).sum()),
        "adapter_right": int((a[differ] == truth[differ]).sum()),
    }
    row["fusion"]["own_share"] = own_share(backbone, models["fusion"], texts, cfg.max_length)
    cached = run_cache(workdir / "transfer" / "runs", domain, shots, seed, f"-n{args.unlabeled}")
    if cached.exists():  # the same stage 1 as transfer.json's run
        ref = json.loads(cached.read_text())
        assert ref["adapter"]["test_accuracy"] == row["adapter"]["test_accuracy"], "stage 1 did not repeat itself"
        row["fusion"]["transfer_json_test_accuracy"] = ref["fusion"]["test_accuracy"]
        row["transfer_json"] = {m: ref[m]["test_accuracy"] for m in DISTILLED if m in ref}
    return row


def _mean_se(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), stderr(values)


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for shots in sorted({r["shots"] for r in rows}):
        cell = [r for r in rows if r["shots"] == shots]

        def pct(name: str, key: str, cell: list[dict[str, Any]] = cell) -> list[float]:
            return [100 * r[name][key] for r in cell]

        models = {}
        for name in MODELS:
            models[name] = {key: _mean_se(pct(name, key))[0] for key in ("test_accuracy", "unlabeled_accuracy")}
            models[name]["unlabeled_p_true"] = _mean_se(pct(name, "unlabeled_p_true"))[0]
        gain = [f - a for f, a in zip(pct("fusion", "unlabeled_accuracy"), pct("adapter", "unlabeled_accuracy"))]
        own_gain = [f - a for f, a in zip(pct("fusion", "unlabeled_accuracy"), pct("fusion_own", "unlabeled_accuracy"))]
        shares = [r["fusion"]["own_share"] for r in cell]
        students = {
            m: statistics.mean(100 * r["transfer_json"][m] for r in cell)
            for m in DISTILLED
            if all(m in r.get("transfer_json", {}) for r in cell)
        }
        disagree = {k: sum(r["disagree"][k] for r in cell) for k in ("rows", "fusion_right", "adapter_right")}
        out[str(shots)] = {
            "runs": len(cell),
            "seeds": sorted({r["seed"] for r in cell}),
            "in_scope_unlabeled": statistics.mean(r["in_scope_unlabeled"] for r in cell),
            "models": models,
            "fusion_minus_adapter_unlabeled": _mean_se(gain),
            "fusion_wins_losses_unlabeled": [sum(g > 0 for g in gain), sum(g < 0 for g in gain)],
            "fusion_minus_fusion_own_unlabeled": _mean_se(own_gain),
            "disagree": disagree | {"share_of_rows": disagree["rows"] / sum(r["in_scope_unlabeled"] for r in cell)},
            "own_share": _mean_se(shares),
            "own_share_range": [min(shares), max(shares)],
            "students_test_accuracy": students,
        }
    return out


def markdown(report: dict[str, Any]) -> str:
    meta = report["meta"]
    lines = [
        "# What the teachers know about the new tenant's unlabelled queries",
        "",
        f"Backbone {meta['backbone']}, {meta['machine']}, {meta['date']}. CLINC150 leave-one-out, "
        f"{meta['unlabeled_per_intent']} unlabelled queries per intent; the models are scored on the in-scope "
        "unlabelled queries against the labels CLINC has for them (hidden from training). "
        "`benchmarks/teacher_signal.py`.",
        "",
    ]
    if meta["note"]:
        lines += [meta["note"], ""]
    for shots, cell in report["summary"].items():
        m = cell["models"]
        lines += [
            f"## {shots} shots ({cell['runs']} runs, seeds {cell['seeds']}; "
            f"{cell['in_scope_unlabeled']:.0f} in-scope unlabelled queries a run)",
            "",
            f"| model | unlabelled acc % | p(true intent) in the target at τ = {meta['temperature']}, % | test acc % |",
            "|---|---:|---:|---:|",
        ]
        for name in MODELS:
            s = m[name]
            lines.append(
                f"| {name} | {s['unlabeled_accuracy']:.2f} | {s['unlabeled_p_true']:.1f} | {s['test_accuracy']:.2f} |"
            )
        (g, g_se), (o, o_se) = cell["fusion_minus_adapter_unlabeled"], cell["fusion_minus_fusion_own_unlabeled"]
        d, (share, share_se) = cell["disagree"], cell["own_share"]
        wins, losses = cell["fusion_wins_losses_unlabeled"]
        lines += [
            "",
            f"- fusion minus adapter on the unlabelled queries: {g:+.2f} ± {g_se:.2f} points ({wins} / {losses} runs); "
            f"fusion minus fusion_own: {o:+.2f} ± {o_se:.2f}",
            f"- the adapter and the fusion disagree on {d['rows']} of the unlabelled queries "
            f"({100 * d['share_of_rows']:.1f} %): the fusion is right on {d['fusion_right']}, the adapter on "
            f"{d['adapter_right']}, neither on {d['rows'] - d['fusion_right'] - d['adapter_right']}",
            f"- the fusion's attention on the tenant's own adapter: {share:.3f} ± {share_se:.3f} of the weight "
            f"(runs from {cell['own_share_range'][0]:.3f} to {cell['own_share_range'][1]:.3f}; uniform: 0.1)",
        ]
        if cell["students_test_accuracy"]:
            reached = ", ".join(f"{m} {v:.2f}" for m, v in cell["students_test_accuracy"].items())
            lines.append(f"- the students distilled on the same runs (transfer.json, test %): {reached}")
        lines.append("")
    lines += [
        "Per run (accuracy % on the in-scope unlabelled queries; own: the fusion's attention on the own adapter):",
        "",
        "| tenant | shots | seed | adapter | fusion | fusion_own | disagree (fusion / adapter right) | own |",
        "|---|---|---|---:|---:|---:|---|---:|",
    ]
    for r in report["runs"]:
        d = r["disagree"]
        accs = " | ".join(f"{100 * r[name]['unlabeled_accuracy']:.2f}" for name in MODELS)
        lines.append(
            f"| {r['tenant']} | {r['shots']} | {r['seed']} | {accs} | {d['rows']} ({d['fusion_right']} / "
            f"{d['adapter_right']}) | {r['fusion']['own_share']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shots", type=int, nargs="+", default=[5])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--tenants", nargs="+", default=None)
    p.add_argument("--unlabeled", type=int, default=50)
    p.add_argument("--val-per-label", type=int, default=10)
    p.add_argument("--workdir", default="runs/accuracy")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--note", default="")
    args = p.parse_args()
    workdir, out = Path(args.workdir), Path(args.out)
    backbone, loaded, stage1 = start_transfer_benchmark(workdir)
    # the fusion is trained as accuracy.py --unlabeled 50's: its stage 2 settings (20 epochs, patience 3)
    cfg = RecipeConfig(stage1=stage1, stage2=TrainConfig(epochs=20, lr=5e-4, patience=3))
    rows = cached_runs(
        args,
        workdir / "teacher_signal" / "runs",
        f"-n{args.unlabeled}",
        loaded,
        MODELS,
        lambda domain, shots, seed, peers, _: run_one(backbone, domain, shots, seed, peers, cfg, args, workdir),
    )
    meta = {
        "backbone": backbone.name,
        "machine": f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)",
        "date": time.strftime("%Y-%m-%d"),
        "shots": args.shots,
        "seeds": args.seeds,
        "unlabeled_per_intent": args.unlabeled,
        "val_per_label": args.val_per_label,
        "temperature": cfg.distill.temperature,
        "stage1": cfg.stage1.to_dict(),
        "fusion": cfg.stage2.to_dict(),
        "note": args.note,
    }
    report = {"meta": meta, "summary": summarise(rows), "runs": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "teacher_signal.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "teacher_signal.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
