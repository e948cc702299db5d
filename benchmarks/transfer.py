"""Distillation over the tenant's unlabelled queries, with its controls: `python benchmarks/accuracy.py --unlabeled N`.

CLINC150 leave-one-out as in accuracy.py (the other 9 domains' adapters are the teachers). The new tenant gets k shots
per intent and an unlabelled set: N other training queries per intent with their labels removed (seeded, never one
of its k shots), plus its domain's share (10) of CLINC's out-of-scope training queries. Tenant data and unlabelled
rows are written to one file (`split` = `unlabeled`) and read back through `adistill.data.read_tenant_data`, as a
user's would be. Stage 1 is trained once per run and shared; then, from it:

    adapter               stage 1 alone
    fusion                AdapterFusion over the 9 teachers + its own adapter (labelled rows only)
    distill               stage 2 on the labelled rows (no transfer set)
    distill_transfer      stage 2 with the transfer set (the unlabelled rows get only the KD term)
    self_training         control (a): stage 1 retrained on its own confident pseudo-labels of the same rows
    transfer_no_teachers  control (b): stage 2 with the transfer set, the fusion holding only its own adapter
    distill_augment       (with --augment KIND) stage 2 with perturbed labelled queries as the transfer set
    *_noisy               (with --student-noise P) distill_transfer and transfer_no_teachers again with
                          transfer.student_noise = P: the student sees the unlabelled rows with word-pieces hidden
    *_neighbours          (with --neighbours K and --student-noise P) distill_transfer_noisy again with
                          transfer.neighbours = K: each unlabelled row's target mixed with its K nearest unlabelled
                          rows' (recipes/transfer.py, NeighbourTargets); --neighbours-control adds
                          transfer_no_teachers_neighbours, the same without teachers, and --fitted-teacher adds
                          distill_transfer_neighbours_fitted, the same over the fitted, frozen fusion
    *_fitted              (with --fitted-teacher) distill, distill_transfer and transfer_no_teachers again with
                          distill.teacher = fitted: the fusion teacher is fitted first, alone, then frozen (the two
                          runs over the teachers reuse the `fusion` baseline's fit, whose seconds are added to theirs)

The six methods above run the default recipe (distill.teacher = joint, the paper's: the fusion trains with the
student) except for transfer.student_noise, which is 0 in them (the rows were measured before the noisy student
became the default): `--student-noise 0.2` adds `distill_transfer_noisy`, the default recipe's row. With
`--recipe-defaults` the six methods are trained as the library trains a tenant: stage 2, the fusion, self-training
and the transfer set on `RecipeConfig()`'s settings (stage 1 still the benchmark's `--epochs` / `--patience`, so it
repeats the runs above); `--resume-from REPORT` counts an earlier report's runs as cached (the same settings), so
such a benchmark can be spread over machines whose caches are gone.

Writes benchmarks/results/transfer.{json,md,png}; runs are cached under --workdir/transfer.
"""

from __future__ import annotations

import json
import logging
import random
import statistics
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from accuracy import cached_runs, run_cache, stderr, subsample_validation

from adistill.config import RecipeConfig, TransferConfig
from adistill.data import OOS_LABEL, few_shot, read_tenant_data
from adistill.datasets import clinc150
from adistill.recipes.baselines import train_fusion
from adistill.recipes.evaluate import accuracy
from adistill.recipes.self_training import self_train
from adistill.recipes.stage1 import train_adapter
from adistill.recipes.stage2 import distill
from adistill.recipes.transfer import TransferInputs, transfer_inputs

log = logging.getLogger("benchmarks.transfer")
METHODS = ("adapter", "fusion", "distill", "distill_transfer", "self_training", "transfer_no_teachers")
FITTED = ("distill_fitted", "distill_transfer_fitted", "transfer_no_teachers_fitted")  # with --fitted-teacher
NOISY = ("distill_transfer_noisy", "transfer_no_teachers_noisy")  # with --student-noise
# with --neighbours K (the second also needs --neighbours-control, the third --fitted-teacher)
NEIGHBOURS = ("distill_transfer_neighbours", "transfer_no_teachers_neighbours", "distill_transfer_neighbours_fitted")
OPTIONAL = (*FITTED, "distill_augment", *NOISY, *NEIGHBOURS)
STAGE2 = ("distill", "distill_transfer", "transfer_no_teachers")  # stage-2 runs, for the time-saved estimate
OLD_PATIENCE, OLD_EPOCHS = 10, 40  # stage 2's defaults before issue 17
TARGETS = {  # shots -> (method compared against, margin in points)
    "5": (("adapter", 2.0), ("fusion", 1.0), ("self_training", 0.5)),
    "10": (("adapter", 1.0),),
}
# the rows held to the targets (the second: the default recipe; the last two: with neighbour targets)
JUDGED = (
    "distill_transfer",
    "distill_transfer_noisy",
    "distill_transfer_neighbours",
    "distill_transfer_neighbours_fitted",
)


def tenant_file(domain: str, shots: int, seed: int, per_intent: int, folder: Path) -> Path:
    """The new tenant's file: its k shots per intent, CLINC's validation and test rows, and its unlabelled set as rows
    with `split` = `unlabeled`."""
    full = read_tenant_data(clinc150.tenant_path(domain))
    picked = set(few_shot(full, shots, seed).train.texts)
    rng = random.Random(f"unlabeled:{domain}:{seed}:{shots}")
    by_label: dict[str, list[str]] = {}
    for text, label in zip(full.train.texts, full.train.labels):
        if text not in picked:
            by_label.setdefault(label, []).append(text)
    unlabeled = [t for y in sorted(by_label) for t in rng.sample(by_label[y], min(per_intent, len(by_label[y])))]
    unlabeled += clinc150.oos_train(domain)
    rng.shuffle(unlabeled)
    rows = [r for r in pq.read_table(clinc150.tenant_path(domain)).to_pylist() if r["split"] != "train"]
    rows += [
        {"text": t, "label": y, "split": "train"} for t, y in zip(full.train.texts, full.train.labels) if t in picked
    ]
    rows += [{"text": t, "label": "", "split": "unlabeled"} for t in unlabeled]
    path = folder / f"{domain}-k{shots}-s{seed}-n{per_intent}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _record(backbone, model, fit, data, cfg: RecipeConfig, seconds: float) -> dict[str, Any]:
    return {
        "test_accuracy": accuracy(backbone, model, data.test, cfg.max_length),
        "val_accuracy": fit.best_val_accuracy,
        "best_epoch": fit.best_epoch,
        "epochs_run": fit.epochs_run,
        "train_seconds": round(seconds, 1),
        "val_history": [round(h["val_accuracy"], 4) for h in fit.history],
    }


def run_one(
    backbone,
    domain: str,
    shots: int,
    seed: int,
    teachers: list,
    cfg: RecipeConfig,
    val_per_label: int | None,
    per_intent: int,
    folder: Path,
    augment: str | None,
    fitted: bool = False,
    done: dict[str, Any] | None = None,
    student_noise: float | None = None,
    neighbours: int = 0,
    neighbours_control: bool = False,
) -> dict[str, Any]:
    """One tenant, shots and seed: every method (those in `done`, an earlier run's row, are kept, not run again)."""
    source = tenant_file(domain, shots, seed, per_intent, folder)
    data = subsample_validation(read_tenant_data(str(source)), val_per_label, seed)
    assert sorted(data.train.texts) == sorted(
        few_shot(read_tenant_data(clinc150.tenant_path(domain)), shots, seed).train.texts
    )
    cfg = cfg.replace(shots=shots, seed=seed)
    row: dict[str, Any] = {"tenant": domain, "shots": shots, "seed": seed, "unlabeled_examples": len(data.unlabeled)}
    row["unlabeled_out_of_scope"] = len(clinc150.oos_train(domain))
    none = TransferInputs([], "none")

    def timed(method: str, train) -> None:
        t0 = time.perf_counter()
        model, fit, *pseudo = train()
        row[method] = _record(backbone, model, fit, data, cfg, time.perf_counter() - t0)
        if pseudo:
            row[method]["pseudo_labelled"] = pseudo[0]

    t0 = time.perf_counter()
    stage1, fit1 = train_adapter(backbone, data, cfg)
    row["adapter"] = _record(backbone, stage1, fit1, data, cfg, time.perf_counter() - t0)
    t0 = time.perf_counter()
    fusion, fusion_fit = train_fusion(backbone, data, cfg, stage1, teachers)
    row["fusion"] = _record(backbone, fusion, fusion_fit, data, cfg, time.perf_counter() - t0)
    if done:  # stage 1 and the fusion are retrained; every earlier row but stage 1's (the same accuracy) is kept
        assert done["adapter"]["test_accuracy"] == row["adapter"]["test_accuracy"], "stage 1 did not repeat itself"
        # the fusion's too: a re-run fusion can differ in its last bits (it serves as the fitted teacher of new rows)
        row.update({k: v for k, v in done.items() if k != "adapter"})
    todo = lambda method: method not in row  # noqa: E731
    if todo("distill"):
        timed("distill", lambda: distill(backbone, data, cfg, stage1, teachers, transfer=none))
    if todo("distill_transfer"):
        timed("distill_transfer", lambda: distill(backbone, data, cfg, stage1, teachers))
    if todo("self_training"):
        timed("self_training", lambda: self_train(backbone, data, cfg, stage1))
    if todo("transfer_no_teachers"):
        timed("transfer_no_teachers", lambda: distill(backbone, data, cfg, stage1, []))
    if fitted:  # distill.teacher = fitted: the runs over the teachers reuse the fusion above as their frozen teacher
        fcfg = cfg.replace(distill=cfg.distill.replace(teacher="fitted"))
        for method, transfer in (("distill_fitted", none), ("distill_transfer_fitted", None)):
            if todo(method):
                timed(method, lambda t=transfer: distill(backbone, data, fcfg, stage1, teachers, None, t, fusion))
                row[method]["train_seconds"] = round(row[method]["train_seconds"] + row["fusion"]["train_seconds"], 1)
        if todo("transfer_no_teachers_fitted"):  # its own fusion (one member), fitted inside `distill`
            timed("transfer_no_teachers_fitted", lambda: distill(backbone, data, fcfg, stage1, []))
    if augment and todo("distill_augment"):
        aug_cfg = cfg.replace(transfer=cfg.transfer.replace(augment=augment))
        plain = type(data)(data.source, data.train, data.validation, data.test)  # its labelled rows only
        inputs = transfer_inputs(backbone, plain, aug_cfg)
        timed("distill_augment", lambda: distill(backbone, plain, aug_cfg, stage1, teachers, transfer=inputs))
        row["distill_augment"]["augmented_examples"] = len(inputs.texts)
    if student_noise:
        ncfg = cfg.replace(transfer=cfg.transfer.replace(student_noise=student_noise))
        for method, peers in zip(NOISY, (teachers, [])):
            if todo(method):
                timed(method, lambda p=peers: distill(backbone, data, ncfg, stage1, p))
    if neighbours:
        assert student_noise, "--neighbours adds to the default recipe's rows: pass --student-noise too"
        kcfg = cfg.replace(transfer=cfg.transfer.replace(student_noise=student_noise, neighbours=neighbours))
        for method, peers in zip(NEIGHBOURS, (teachers, [])):
            if todo(method) and (peers or neighbours_control):
                timed(method, lambda p=peers: distill(backbone, data, kcfg, stage1, p))
        if fitted and todo(NEIGHBOURS[2]):  # over the fusion above, fitted and frozen (its seconds added)
            fkcfg = kcfg.replace(distill=kcfg.distill.replace(teacher="fitted"))
            timed(NEIGHBOURS[2], lambda: distill(backbone, data, fkcfg, stage1, teachers, None, None, fusion))
            row[NEIGHBOURS[2]]["train_seconds"] = round(
                row[NEIGHBOURS[2]]["train_seconds"] + row["fusion"]["train_seconds"], 1
            )
    return row


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per shots: per-method mean test accuracy (%) at the top level, and per method its s.e., paired gain over
    `adapter` (mean ± s.e., wins/losses), seconds, epochs; the targets; the stage-2 time saved by early stopping."""
    out: dict[str, Any] = {}
    for shots in sorted({r["shots"] for r in rows}):
        sub = [r for r in rows if r["shots"] == shots]
        methods = [m for m in (*METHODS, *OPTIONAL) if all(m in r for r in sub)]
        cell: dict[str, Any] = {"runs": len(sub), "seeds": sorted({r["seed"] for r in sub})}
        stats = {}
        for m in methods:
            acc = [100 * r[m]["test_accuracy"] for r in sub]
            gain = [100 * (r[m]["test_accuracy"] - r["adapter"]["test_accuracy"]) for r in sub]
            cell[m] = statistics.mean(acc)
            stats[m] = {
                "mean": statistics.mean(acc),
                "stderr": stderr(acc),
                "gain_over_adapter": statistics.mean(gain),
                "gain_stderr": stderr(gain),
                "wins": sum(g > 0 for g in gain),
                "losses": sum(g < 0 for g in gain),
                "seconds": statistics.mean(r[m]["train_seconds"] for r in sub),
                "best_epoch": statistics.mean(r[m]["best_epoch"] for r in sub),
                "epochs_run": statistics.mean(r[m]["epochs_run"] for r in sub),
            }
        cell["stats"] = stats
        cell["targets"] = [
            {
                "method": method,
                "versus": other,
                "margin": margin,
                "difference": cell[method] - cell[other],
                "met": cell[method] - cell[other] >= margin,
            }
            for method in JUDGED
            for other, margin in TARGETS.get(str(shots), ())
            if other in cell and method in cell
        ]
        cell["time_saved"] = _time_saved(sub)
        cell["partial"] = _partial(sub, methods)
        out[str(shots)] = cell
    return out


def _partial(rows: list[dict[str, Any]], methods: list[str]) -> dict[str, Any]:
    """Optional methods run on some of the runs only (e.g. --fitted-teacher on one seed): their mean test accuracy
    (%) and, on the same runs, every method's."""
    out = {}
    for m in OPTIONAL:
        some = [r for r in rows if m in r]
        if m in methods or not some:
            continue
        out[m] = {
            "runs": len(some),
            "mean": statistics.mean(100 * r[m]["test_accuracy"] for r in some),
            "seconds": statistics.mean(r[m]["train_seconds"] for r in some),
            "same_runs": {x: statistics.mean(100 * r[x]["test_accuracy"] for r in some) for x in methods},
        }
    return out


def _time_saved(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Stage-2 seconds as run vs a lower bound for the old defaults (patience 10, 40 epochs): the old loop follows the
    same epochs up to where this one stopped and runs at least until its best epoch + 10."""
    out = {}
    for m in STAGE2:
        ran = old = 0.0
        for r in rows:
            x = r[m]
            per_epoch = x["train_seconds"] / x["epochs_run"]
            ran += x["train_seconds"]
            old += per_epoch * min(OLD_EPOCHS, max(x["epochs_run"], x["best_epoch"] + OLD_PATIENCE))
        out[m] = {"seconds": ran / len(rows), "old_defaults_at_least": old / len(rows)}
    return out


def markdown(report: dict[str, Any]) -> str:
    m = report["meta"]
    lines = [
        "# Distillation over the tenant's unlabelled queries (CLINC150 leave-one-out)",
        "",
        f"Backbone {m['backbone']} (frozen), {m['machine']}, {m['date']}. Runs: {m['tenants']} tenants x seeds "
        f"{m['seeds']} x shots {m['shots']}; unlabelled set N = {m['unlabeled_per_intent']} other training queries "
        "per intent (labels removed) + the domain's 10 CLINC out-of-scope training queries. Stage 1 at most "
        f"{m['epochs']} epochs (patience {m['patience']}); fusion, stage 2 and self-training at most "
        f"{m['stage2_epochs']} epochs, patience {m['stage2_patience']}; transfer ratio {m['transfer']['ratio']}, at "
        f"most {m['transfer']['max_per_epoch']} unlabelled rows per epoch (rows `*_fitted`: distill.teacher = "
        f"fitted, the others the default `joint`); validation {m['val_per_label']} per "
        "intent. Test accuracy % on the in-scope test queries.",
        "",
    ]
    if m.get("note"):
        lines += [m["note"], ""]
    if m.get("recipe_defaults"):
        lines += [
            f"**The library's default recipe** (`--recipe-defaults`): fusion, stage 2 and self-training as "
            f"`RecipeConfig()` trains them: at most {m['stage2_epochs']} epochs, stopping {m['stage2_patience']} "
            f"after the {m['stage2_ties']} best validation epoch; over a transfer set the weights of the epoch "
            f"where it stops (`transfer.keep: {m['transfer']['keep']}`), else the best epoch's; the student sees "
            f"the unlabelled rows with word-pieces hidden (`transfer.student_noise: {m['transfer']['student_noise']}`)."
            " Stage 1 is the benchmark's, as in transfer.md.",
            "",
        ]
    default = RecipeConfig()
    # (runs before `stage2_ties` was recorded kept the first best epoch)
    ran = {
        "stage2.epochs": m["stage2_epochs"],
        "stage2.patience": m["stage2_patience"],
        "stage2.ties": m.get("stage2_ties", "earlier"),
    }
    ran.update({f"transfer.{k}": v for k, v in m["transfer"].items()})
    now = {f"stage2.{k}": getattr(default.stage2, k) for k in ("epochs", "patience", "ties")}
    now.update({f"transfer.{k}": v for k, v in default.transfer.to_dict().items()})
    changed = [f"`{k}: {v}` (these runs: {ran.get(k, 'unset')})" for k, v in now.items() if ran.get(k) != v]
    if changed:
        lines += [
            "**Not the library's current default recipe**: it now has " + ", ".join(changed) + ". The six methods "
            "as the default recipe trains them, on the same runs (data, teachers and stage 1), are in stopping.md, "
            '"The six methods as the library\'s default recipe trains them" (`benchmarks/stopping.py`).',
            "",
        ]
    for shots, cell in report["summary"].items():
        stats = cell["stats"]
        lines += [
            f"## {shots} shots ({cell['runs']} runs, seeds {cell['seeds']})",
            "",
            "| method | test acc % (mean ± s.e.) | gain over adapter (± s.e.) | wins / losses vs adapter | seconds | "
            "best epoch | epochs run |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, s in stats.items():
            lines.append(
                f"| {name} | {s['mean']:.2f} ± {s['stderr']:.2f} | {s['gain_over_adapter']:+.2f} ± "
                f"{s['gain_stderr']:.2f} | {s['wins']} / {s['losses']} | {s['seconds']:.1f} | {s['best_epoch']:.1f} | "
                f"{s['epochs_run']:.1f} |"
            )
        lines += ["", "Targets (the method minus the other one, points):", ""]
        for t in cell["targets"]:
            verdict = "met" if t["met"] else "**not met**"
            lines.append(
                f"- {t['method']} vs {t['versus']}: {t['difference']:+.2f} (target ≥ +{t['margin']:.1f}): {verdict}"
            )
        for name, x in cell.get("partial", {}).items():
            others = ", ".join(f"{k} {v:.2f}" for k, v in x["same_runs"].items())
            lines.append(f"- {name}, on the {x['runs']} runs that have it: {x['mean']:.2f} ({x['seconds']:.1f} s); "
                         f"the same runs: {others}")  # fmt: skip
        lines += ["", "Stage-2 seconds per run as run, and a lower bound under the old defaults (patience 10):", ""]
        for name, t in cell["time_saved"].items():
            lines.append(
                f"- {name}: {t['seconds']:.1f} s (old defaults: at least {t['old_defaults_at_least']:.1f} s, "
                f"saved ≥ {t['old_defaults_at_least'] - t['seconds']:.1f} s)"
            )
        lines.append("")
    methods = [x for x in (*METHODS, *OPTIONAL) if all(x in r for r in report["runs"])]
    lines += [
        "Per run (test accuracy %):",
        "",
        "| tenant | shots | seed | " + " | ".join(methods) + " | pseudo-labelled |",
        "|---|---|---|" + "---|" * len(methods) + "---|",
    ]
    for r in report["runs"]:
        accs = " | ".join(f"{100 * r[x]['test_accuracy']:.2f}" for x in methods)
        lines.append(
            f"| {r['tenant']} | {r['shots']} | {r['seed']} | {accs} | "
            f"{r['self_training']['pseudo_labelled']} of {r['unlabeled_examples']} |"
        )
    return "\n".join(lines) + "\n"


def chart(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = report["summary"]
    fig, axes = plt.subplots(1, len(cells), figsize=(6.5 * len(cells), 4), squeeze=False)
    for ax, (shots, cell) in zip(axes[0], cells.items()):
        names = list(cell["stats"])
        gains = [cell["stats"][n]["gain_over_adapter"] for n in names]
        errs = [cell["stats"][n]["gain_stderr"] for n in names]
        ax.bar(range(len(names)), gains, yerr=errs, capsize=3, color=["C0" if g >= 0 else "C3" for g in gains])
        ax.axhline(0, color="gray", lw=1)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("test accuracy gain over adapter (points)")
        ax.set_title(f"{shots} shots, {cell['runs']} runs (bars: ±1 s.e.)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run_settings(args: Any, cfg: RecipeConfig) -> dict[str, Any]:
    """What the runs are trained with, beyond data and seeds (a report's meta holds them): two reports' rows can be
    pooled only when these agree."""
    return {
        "unlabeled_per_intent": args.unlabeled,
        "epochs": args.epochs,
        "patience": args.patience,
        "stage2_epochs": cfg.stage2.epochs,
        "stage2_patience": cfg.stage2.patience,
        "stage2_ties": cfg.stage2.ties,
        "transfer": cfg.transfer.to_dict(),
        "distill": cfg.distill.to_dict(),
    }


def resume(report: Path, settings: dict[str, Any], runs_dir: Path, suffix: str) -> None:
    """Count an earlier report's runs as cached (a benchmark spread over machines whose caches are gone), once its
    settings are checked against these (`run_settings`); runs already in the cache are kept."""
    earlier = json.loads(report.read_text())
    theirs = {k: earlier["meta"].get(k) for k in settings}
    if theirs != settings:
        raise SystemExit(f"{report}: its runs were trained with other settings: {theirs}")
    runs_dir.mkdir(parents=True, exist_ok=True)
    for row in earlier["runs"]:
        cache = run_cache(runs_dir, row["tenant"], row["shots"], row["seed"], suffix)
        if not cache.exists():
            cache.write_text(json.dumps(row, indent=1))


def run_transfer(args: Any, backbone, loaded: dict, cfg: RecipeConfig, workdir: Path, out: Path) -> None:
    """The `--unlabeled N` mode of benchmarks/accuracy.py (its arguments, teachers and recipe)."""
    if args.recipe_defaults:  # the six methods as the library trains them: RecipeConfig()'s transfer set
        if (args.transfer_ratio, args.transfer_max) != (cfg.transfer.ratio, cfg.transfer.max_per_epoch):
            raise SystemExit("--recipe-defaults takes the transfer set's settings from RecipeConfig()")
        if args.student_noise is not None or args.neighbours or args.augment or args.fitted_teacher:
            raise SystemExit("--recipe-defaults runs the six methods only")
    else:
        # student_noise 0: the six methods' rows keep the meaning they were measured with; the recipe's default
        # noise is what --student-noise P adds as the *_noisy rows
        transfer = TransferConfig(ratio=args.transfer_ratio, max_per_epoch=args.transfer_max, student_noise=0.0)
        cfg = cfg.replace(transfer=transfer)
    data_dir = workdir / "transfer" / "data"
    runs_dir = workdir / "transfer" / ("runs-defaults" if args.recipe_defaults else "runs")
    suffix = f"-n{args.unlabeled}"
    if args.resume_from:
        resume(Path(args.resume_from), run_settings(args, cfg), runs_dir, suffix)

    def run(domain: str, shots: int, seed: int, peers: list, done: dict[str, Any] | None) -> dict[str, Any]:
        return run_one(
            backbone,
            domain,
            shots,
            seed,
            peers,
            cfg,
            args.val_per_label,
            args.unlabeled,
            data_dir,
            args.augment,
            args.fitted_teacher,
            done,
            args.student_noise,
            args.neighbours,
            args.neighbours_control,
        )

    wanted = [*METHODS, *(FITTED if args.fitted_teacher else ()), *(("distill_augment",) if args.augment else ())]
    wanted += NOISY if args.student_noise else ()
    if args.neighbours:
        wanted += [m for m, on in zip(NEIGHBOURS, (True, args.neighbours_control, args.fitted_teacher)) if on]
    needs = lambda row: any(m not in row for m in wanted)  # noqa: E731
    rows = cached_runs(args, runs_dir, suffix, loaded, METHODS, run, needs, args.cached_only)
    meta = {
        "backbone": backbone.name,
        "machine": args.machine,
        "date": time.strftime("%Y-%m-%d"),
        "shots": sorted({r["shots"] for r in rows}),  # those reported (with --cached-only, those cached)
        "seeds": sorted({r["seed"] for r in rows}),
        "tenants": len({r["tenant"] for r in rows}),
        **run_settings(args, cfg),
        "stage2_keep": cfg.stage2.keep,
        "recipe_defaults": args.recipe_defaults,
        "val_per_label": args.val_per_label,
        "teacher_val_accuracy": {d: a.meta["metrics"]["validation"]["accuracy"] for d, a in loaded.items()},
        "out_of_scope_label": OOS_LABEL,
        "note": args.note,
    }
    report = {"meta": meta, "summary": summarise(rows), "runs": rows}
    (out / "transfer.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "transfer.md").write_text(markdown(report))
    chart(report, out / "transfer.png")
    print(markdown(report))
