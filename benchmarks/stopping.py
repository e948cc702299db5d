"""Stage 2's stopping rule, measured on one trajectory per run: `python benchmarks/stopping.py --seeds 0 1 2`.

The default recipe keeps stage 2's best epoch by validation accuracy (patience 3). With 5 shots and 10 validation
queries per intent (150 rows, 0.67 points each) that choice is noisy, and ties are common. Here every run trains
stage 2 of the default recipe (distill + transfer, noisy student) for a fixed `--epochs` without early stopping,
keeps every epoch's student, and scores on the test rows, from that one trajectory, the rules a recipe could use:

    best_val      the first epoch to reach the best validation accuracy, stopping after `--patience` epochs
                  without a new best (the former default; the same weights as transfer.json's
                  distill_transfer_noisy: checked when that cache is there; where its stop falls after `--epochs`,
                  that row's result, kept as `best_val_beyond`)
    latest_best   the latest epoch to match the best validation accuracy, patience 3, at most 10 epochs
                  (`stage2: {epochs: 10, patience: 3, ties: later}`; with a transfer set, the default until
                  `transfer.keep` came; exact on runs of at least 10 epochs)
    stop_last     latest_best's stop, keeping the weights of the epoch it stops at (the default since: over a
                  transfer set `transfer.keep: last`; `--check-default K` trains the library's default on K runs
                  and asserts it)
    average_to_stop  the same stop, keeping the mean of the weights of every epoch run (`keep: average`; the
                  stop is cut at `--epochs`: exact for the runs whose stop falls within them, counted as
                  `stop_within_epochs`)
    last_k        a fixed budget of k epochs, the last epoch's weights (`stage2: {epochs: k, patience: null,
                  keep: last}`)
    average_k     a fixed budget of k epochs, the mean of the k epochs' weights (`keep: average`)

With `--controls fusion transfer_no_teachers_noisy self_training distill` the same runs also train those rows of
transfer.json (AdapterFusion over the teachers; stage 2 without teachers; self-training; stage 2 without the
unlabelled queries) for the same fixed budget,
every epoch kept, so the default's fixed budget is compared with each control's own validation stop, its own
fixed budget, and its best fixed budget in hindsight (a choice that favours the control).

With all four controls the report opens with the six methods of transfer.json as the library's default recipe
trains them (`LIBRARY`: each read from its trajectory under `RecipeConfig()`'s rules), on the runs that have all
of them, and the issue's targets.

With `--longer E` the report adds `latest_best` allowed 15, 20, ... up to E epochs, reading the runs still improving
at epoch 10 from their E-epoch cache (train those with `--epochs E --tenants ...`).

Training does not depend on the rule (shuffling and hidden word-pieces are seeded per epoch), so the rules differ
only in the weights they keep. Data, teachers and settings are those of `accuracy.py --unlabeled 50` (same cache
folder). Writes benchmarks/results/stopping.{json,md,png}; runs are cached under --workdir/stopping.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from accuracy import cached_runs, run_cache, start_transfer_benchmark, stderr, subsample_validation
from torch import nn
from transfer import tenant_file

from adistill.config import RecipeConfig, TrainConfig, TransferConfig
from adistill.data import read_tenant_data
from adistill.datasets import clinc150
from adistill.recipes import baselines, self_training, stage2
from adistill.recipes import loop as recipe_loop
from adistill.recipes.evaluate import accuracy
from adistill.recipes.stage1 import train_adapter
from adistill.recipes.transfer import TransferInputs

log = logging.getLogger("stopping")


@contextlib.contextmanager
def epoch_snapshots(snaps: list[dict[str, torch.Tensor]]):
    """While active, the training loop of stage 2, of the fusion baseline and of self-training copies the trained
    model's weights into `snaps` after every epoch (its validation callback is wrapped; the loop is unchanged)."""
    modules = (stage2, baselines, self_training)  # each calls `fit` through its own module namespace
    real_fit = recipe_loop.fit

    def fit(stage, trained, step, validate, train, cfg, seed, progress=None):
        model = trained["student"] if isinstance(trained, nn.ModuleDict) else trained  # stage 2: student + teacher

        def snapshot_then_validate() -> float:
            snaps.append({k: t.detach().clone() for k, t in model.state_dict().items()})
            return validate()

        return real_fit(stage, trained, step, snapshot_then_validate, train, cfg, seed, progress)

    for module in modules:
        module.fit = fit  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for module in modules:
            module.fit = real_fit  # type: ignore[attr-defined]


# What a run trains after stage 1: the default recipe's stage 2 (DEFAULT) or, with --controls, one of
# transfer.json's other rows trained the same way (a fixed budget, every epoch kept), for fair comparisons
DEFAULT = "distill_transfer_noisy"
TRAIN = {
    DEFAULT: lambda backbone, data, cfg, stage1, teachers: stage2.distill(backbone, data, cfg, stage1, teachers),
    "fusion": lambda backbone, data, cfg, stage1, teachers: baselines.train_fusion(
        backbone, data, cfg, stage1, teachers
    ),
    "transfer_no_teachers_noisy": lambda backbone, data, cfg, stage1, _: stage2.distill(
        backbone, data, cfg, stage1, []
    ),
    "self_training": lambda backbone, data, cfg, stage1, _: self_training.self_train(backbone, data, cfg, stage1)[:2],
    "distill": lambda backbone, data, cfg, stage1, teachers: stage2.distill(  # no transfer set: labelled rows only
        backbone, data, cfg, stage1, teachers, transfer=TransferInputs([], "none")
    ),
}


def best_val_epoch(val: list[float], patience: int, ties: str = "earlier") -> int:
    """The epoch `recipes.loop.fit` keeps with this patience and `TrainConfig.ties` (1-based)."""
    best, best_epoch = -1.0, 0
    for epoch, acc in enumerate(val, 1):
        if acc > best or (ties == "later" and acc == best):
            best, best_epoch = acc, epoch
        if epoch - best_epoch >= patience:
            break
    return best_epoch


def run_one(backbone, domain, shots, seed, teachers, cfg, args, workdir: Path, method: str = DEFAULT) -> dict[str, Any]:
    data = subsample_validation(
        read_tenant_data(str(tenant_file(domain, shots, seed, args.unlabeled, workdir / "transfer" / "data"))),
        args.val_per_label,
        seed,
    )
    cfg = cfg.replace(shots=shots, seed=seed)
    stage1, _ = train_adapter(backbone, data, cfg)
    snaps: list[dict[str, torch.Tensor]] = []
    t0 = time.perf_counter()
    with epoch_snapshots(snaps):
        student, fit = TRAIN[method](backbone, data, cfg, stage1, teachers)
    seconds = time.perf_counter() - t0

    def scored(state: dict[str, torch.Tensor]) -> float:
        student.load_state_dict(state)
        return accuracy(backbone, student, data.test, cfg.max_length)

    mean = lambda states: {k: sum(s[k] for s in states) / len(states) for k in states[0]}  # noqa: E731
    row: dict[str, Any] = {"tenant": domain, "shots": shots, "seed": seed, "method": method}
    row["adapter"] = {"test_accuracy": accuracy(backbone, stage1, data.test, cfg.max_length)}
    row["stage2_seconds"] = round(seconds, 1)
    row["val"] = [h["val_accuracy"] for h in fit.history]
    row["last"] = [scored(s) for s in snaps]
    if method == DEFAULT:  # a control is compared by its best_val and last_k rules only
        row["average"] = [scored(mean(snaps[:k])) for k in range(1, len(snaps) + 1)]
    cached = run_cache(workdir / "transfer" / "runs", domain, shots, seed, f"-n{args.unlabeled}")
    if cached.exists():  # the same stage 1 and, under best_val, the same model as transfer.json's row of `method`
        ref = json.loads(cached.read_text())
        assert ref["adapter"]["test_accuracy"] == row["adapter"]["test_accuracy"], "stage 1 did not repeat itself"
        recorded, epoch = ref[method]["test_accuracy"], best_val_epoch(row["val"], args.patience)
        if epoch + args.patience <= len(row["val"]):
            # the fusion does not repeat itself to the last bit (transfer.py says so too), nor did the distill row on
            # every run: theirs are kept, not checked (the report counts the runs where they differ)
            assert recorded == row["last"][epoch - 1] or method in ("fusion", "distill"), "best_val differs"
            row["transfer_json_test_accuracy"] = recorded
        else:  # transfer.json's run of `method` went past this trajectory: its own result is best_val's
            row["best_val_beyond"] = recorded
    return row


def check_default(backbone, row: dict[str, Any], teachers, cfg: RecipeConfig, args, workdir: Path) -> float:
    """Train stage 2 as the library's default recipe does (`RecipeConfig().stage2`: early stopping, the tie rule;
    `transfer.keep`) on a cached run and assert it keeps the weights `stop_last` picks from that run's trajectory."""
    default = RecipeConfig().stage2
    assert (default.epochs, default.patience, default.ties) == (LATEST["epochs"], LATEST["patience"], "later")
    assert RecipeConfig().transfer.keep == "last" and cfg.transfer == RecipeConfig().transfer
    shots, seed = row["shots"], row["seed"]
    data = subsample_validation(
        read_tenant_data(str(tenant_file(row["tenant"], shots, seed, args.unlabeled, workdir / "transfer" / "data"))),
        args.val_per_label,
        seed,
    )
    cfg = cfg.replace(shots=shots, seed=seed, stage2=default)
    stage1, _ = train_adapter(backbone, data, cfg)
    student, fit = stage2.distill(backbone, data, cfg, stage1, teachers)
    test = accuracy(backbone, student, data.test, cfg.max_length)
    assert fit.best_epoch == fit.epochs_run == latest_stop_epoch(row["val"]), (fit.best_epoch, row["val"])
    assert test == row["last"][fit.best_epoch - 1], "the default recipe did not keep stop_last's weights"
    return test


# transfer.json's baselines on the same runs (same data, same stage 1), for the targets
BASELINES = ("fusion", "self_training", "distill_transfer_neighbours")


def add_baselines(rows: list[dict[str, Any]], workdir: Path, unlabeled: int) -> None:
    for row in rows:
        cached = run_cache(workdir / "transfer" / "runs", row["tenant"], row["shots"], row["seed"], f"-n{unlabeled}")
        ref = json.loads(cached.read_text()) if cached.exists() else {}
        row["baselines"] = {m: ref[m]["test_accuracy"] for m in BASELINES if m in ref}


# The tie rule and patience of the default recipe since 2026-12-05 (`stage2: {epochs: 10, patience: 3, ties:
# later}`): `latest_best` is exact on trajectories of at least its 10 epochs, cut there
LATEST = {"epochs": 10, "patience": 3}
PATIENCE_GRID = (2, 3, 4, 5, 10)


def latest_best_epoch(val: list[float], patience: int = LATEST["patience"], epochs: int = LATEST["epochs"]) -> int:
    return best_val_epoch(val[:epochs], patience, "later")


def latest_stop_epoch(val: list[float], patience: int = LATEST["patience"], epochs: int = LATEST["epochs"]) -> int:
    """The epoch `latest_best`'s stage stops at: `patience` after its best epoch, or its last (`stop_last` keeps it)."""
    return min(latest_best_epoch(val, patience, epochs) + patience, epochs, len(val))


def stops_within(val: list[float], patience: int = LATEST["patience"]) -> bool:
    """Whether `latest_best` stops on its own within this trajectory (then a longer budget keeps the same epoch)."""
    return latest_best_epoch(val, patience, len(val)) + patience <= len(val)


def extended(rows: list[dict[str, Any]], longer: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each run's trajectory as far as `latest_best` needs it under any budget: its longer run where one is cached
    (whose first epochs must be this run's, to the last bit), else this run, where the rule stops within it."""
    by_run = {(r["tenant"], r["shots"], r["seed"]): r for r in longer}
    out = []
    for row in rows:
        key = (row["tenant"], row["shots"], row["seed"])
        if key in by_run:
            long, n = by_run[key], len(row["val"])
            assert (long["val"][:n], long["last"][:n]) == (row["val"], row["last"]), f"{key} did not repeat itself"
            out.append(long)
        else:
            assert stops_within(row["val"]), f"{key}: latest_best runs past {len(row['val'])} epochs, none cached"
            out.append(row)
    return out


def longer_budgets(rows, adapter, budgets, controls: dict[str, list]) -> dict[str, Any]:
    """`latest_best` (patience 3) with at most each budget of epochs, on trajectories `extended` as far as the rule
    needs: gain over the adapter, epochs run, paired change from the default's 10, and the default minus each
    control stopped by the same rule on the same runs (for the controls trained that long). Then the fixed budgets
    on the runs that needed the longer trajectory (does the curve still rise there?)."""
    patience = LATEST["patience"]
    base = [100 * r["last"][latest_best_epoch(r["val"]) - 1] for r in rows]
    out: dict[str, Any] = {"budgets": {}}
    for budget in budgets:
        epochs = [latest_best_epoch(r["val"], patience, budget) for r in rows]
        test = [100 * r["last"][e - 1] for r, e in zip(rows, epochs)]
        gain = [t - a for t, a in zip(test, adapter)]
        change = [t - b for t, b in zip(test, base)]
        cell: dict[str, Any] = {
            "gain_over_adapter": {"mean": statistics.mean(gain), "stderr": stderr(gain)},
            "wins": sum(g > 0 for g in gain),
            "losses": sum(g < 0 for g in gain),
            "epochs_run": statistics.mean(min(budget, e + patience) for e in epochs),
            "over_10_epochs": {"mean": statistics.mean(change), "stderr": stderr(change)},
            "minus_control": {},
        }
        ours = {(r["tenant"], r["seed"]): t for r, t in zip(rows, test)}
        for method, runs in controls.items():
            if len(runs) != len(rows) or not all(len(r["val"]) >= budget or stops_within(r["val"]) for r in runs):
                continue  # that control was not trained on every run for this budget
            d = [
                ours[(r["tenant"], r["seed"])] - 100 * r["last"][latest_best_epoch(r["val"], patience, budget) - 1]
                for r in runs
            ]
            cell["minus_control"][method] = {
                "mean": statistics.mean(d),
                "stderr": stderr(d),
                "wins": sum(x > 0 for x in d),
                "losses": sum(x < 0 for x in d),
            }
        out["budgets"][str(budget)] = cell
    long = [(r, a) for r, a in zip(rows, adapter) if len(r["val"]) > LATEST["epochs"]]
    if long:
        epochs = min(len(r["val"]) for r, _ in long)
        out["long_runs"] = {
            "runs": len(long),
            "fixed": {
                str(k): {
                    "mean": statistics.mean(g := [100 * r["last"][k - 1] - a for r, a in long]),
                    "stderr": stderr(g),
                }
                for k in range(LATEST["epochs"], epochs + 1)
            },
        }
    return out


def rules(row: dict[str, Any], patience: int) -> dict[str, float]:
    """Test accuracy (%) of every rule on one run."""
    best = best_val_epoch(row["val"], patience)
    stop = min(best + patience, len(row["val"]))
    default = row.get("best_val_beyond", row["last"][best - 1])
    out = {"best_val": 100 * default}
    if len(row["val"]) >= LATEST["epochs"]:
        out["latest_best"] = 100 * row["last"][latest_best_epoch(row["val"]) - 1]
        out["stop_last"] = 100 * row["last"][latest_stop_epoch(row["val"]) - 1]
    if "average" in row:
        out["average_to_stop"] = 100 * row["average"][stop - 1]
    for kind in ("last", "average"):
        out.update({f"{kind}_{k}": 100 * acc for k, acc in enumerate(row.get(kind, []), 1)})
    return out


def summarise(
    rows: list[dict[str, Any]],
    patience: int,
    controls: dict[str, list] | None = None,
    longer: list[dict[str, Any]] | None = None,
    budgets: tuple[int, ...] = (),
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for shots in sorted({r["shots"] for r in rows}):
        sub = [r for r in rows if r["shots"] == shots]
        scored = [rules(r, patience) for r in sub]
        adapter = [100 * r["adapter"]["test_accuracy"] for r in sub]
        cell: dict[str, Any] = {"runs": len(sub), "seeds": sorted({r["seed"] for r in sub})}
        cell["adapter"] = statistics.mean(adapter)
        timed = [r["stage2_seconds"] / len(r["val"]) for r in sub if r.get("stage2_seconds")]
        cell["seconds_per_epoch"] = statistics.mean(timed) if timed else None
        stops = [best_val_epoch(r["val"], patience) + patience for r in sub]
        cell["best_val_epochs_run"] = statistics.mean(min(len(r["val"]), s) for s, r in zip(stops, sub))
        cell["stop_within_epochs"] = sum(s <= len(r["val"]) for s, r in zip(stops, sub))
        if "latest_best" in scored[0]:
            cell["latest_best_epochs_run"] = statistics.mean(latest_stop_epoch(r["val"]) for r in sub)
            cell["tie_rule_grid"] = tie_rule_grid(sub, adapter)
        for name in scored[0]:
            acc = [s[name] for s in scored]
            gain = [a - b for a, b in zip(acc, adapter)]
            vs_best = [s[name] - s["best_val"] for s in scored]
            cell[name] = {
                "mean": statistics.mean(acc),
                "gain_over_adapter": statistics.mean(gain),
                "gain_stderr": stderr(gain),
                "wins": sum(g > 0 for g in gain),
                "losses": sum(g < 0 for g in gain),
                "over_best_val": statistics.mean(vs_best),
                "over_best_val_stderr": stderr(vs_best),
            }
        epochs = len(sub[0]["val"])
        cell["versus"] = {  # paired, in points: a rule's test accuracy minus a baseline's on the same run
            f"{name} - {base}": {
                "mean": statistics.mean(diffs := [s[name] - 100 * r["baselines"][base] for s, r in zip(scored, sub)]),
                "stderr": stderr(diffs),
            }
            for name in ("best_val", "latest_best", "stop_last", f"last_{epochs}", f"average_{epochs}")
            if name in scored[0]
            for base in BASELINES
            if all(base in r.get("baselines", {}) for r in sub)
        }
        cell["per_seed"] = {
            str(seed): {
                name: statistics.mean(s[name] - a for s, a, r in zip(scored, adapter, sub) if r["seed"] == seed)
                for name in (
                    "best_val",
                    "latest_best",
                    "stop_last",
                    "average_to_stop",
                    f"last_{epochs}",
                    f"average_{epochs}",
                )
                if name in scored[0]
            }
            for seed in cell["seeds"]
        }
        cell["library"] = library_methods(
            sub, {m: [r for r in runs if r["shots"] == shots] for m, runs in (controls or {}).items()}
        )
        cell["controls"] = {
            method: compare_control(sub, scored, [r for r in runs if r["shots"] == shots], patience)
            for method, runs in (controls or {}).items()
            if any(r["shots"] == shots for r in runs)
        }
        if longer is not None and any(r["shots"] == shots for r in longer):
            cell["longer_budgets"] = longer_budgets(
                extended(sub, [r for r in longer if r["shots"] == shots]),
                adapter,
                budgets,
                {m: [r for r in runs if r["shots"] == shots] for m, runs in (controls or {}).items()},
            )
        out[str(shots)] = cell
    return out


def tie_rule_grid(rows: list[dict[str, Any]], adapter: list[float]) -> dict[str, Any]:
    """Gain over the adapter of the best validation epoch, cut at the default's 10 epochs, per patience and tie
    rule: the first epoch to reach the best (`earlier`) or the latest to match it (`later`), and their paired gap;
    and of the weights of the epoch the `later` rule stops at (`later_last`), and its gap over `later`."""
    out: dict[str, Any] = {}
    for patience in PATIENCE_GRID:
        test = {
            ties: [100 * r["last"][best_val_epoch(r["val"][: LATEST["epochs"]], patience, ties) - 1] for r in rows]
            for ties in ("earlier", "later")
        }
        test["later_last"] = [100 * r["last"][latest_stop_epoch(r["val"], patience) - 1] for r in rows]
        gains = {rule: [t - a for t, a in zip(acc, adapter)] for rule, acc in test.items()}
        gaps = {
            "later_minus_earlier": [b - a for a, b in zip(test["earlier"], test["later"])],
            "last_minus_later": [b - a for a, b in zip(test["later"], test["later_last"])],
        }
        out[str(patience)] = {
            rule: {"mean": statistics.mean(g), "stderr": stderr(g)} for rule, g in {**gains, **gaps}.items()
        }
    return out


def compare_control(rows: list[dict[str, Any]], scored: list[dict[str, float]], runs, patience: int) -> dict:
    """A control's rules on its own runs, and the default's fixed budget paired against them on the same runs."""
    by_run = {(r["tenant"], r["seed"]): s for r, s in zip(rows, scored)}
    mine = [rules(r, patience) for r in runs]
    theirs = [by_run[(r["tenant"], r["seed"])] for r in runs]
    adapter = [100 * r["adapter"]["test_accuracy"] for r in runs]
    epochs, ours = len(runs[0]["val"]), f"last_{len(rows[0]['val'])}"  # the control's budget; the default's
    gains = {
        name: [m[name] - a for m, a in zip(mine, adapter)]
        for name in ("best_val", "latest_best", "stop_last", *(f"last_{k}" for k in range(1, epochs + 1)))
        if name in mine[0]
    }
    hindsight = max(range(1, epochs + 1), key=lambda k: statistics.mean(gains[f"last_{k}"]))
    out: dict[str, Any] = {"runs": len(runs), "epochs": epochs, "best_fixed_epochs": hindsight}
    ref = [
        (m["best_val"], 100 * r["transfer_json_test_accuracy"])
        for m, r in zip(mine, runs)
        if "transfer_json_test_accuracy" in r
    ]
    out["best_val_unlike_transfer_json"] = {  # runs whose validation stop gave another result than transfer.json's
        "runs": sum(a != b for a, b in ref),
        "mean_difference": statistics.mean(a - b for a, b in ref) if ref else 0.0,
    }
    out["gain_over_adapter"] = {n: {"mean": statistics.mean(g), "stderr": stderr(g)} for n, g in gains.items()}
    # its validation stop; the default's budget (if it ran that long); its whole budget; its best in hindsight
    rules_of_control = ["best_val", ours, f"last_{epochs}", f"last_{hindsight}"]
    pairs = [("best_val", "best_val")] + [("latest_best", "latest_best")] * ("latest_best" in gains)
    pairs += [("stop_last", "stop_last"), ("stop_last", "latest_best")] * ("stop_last" in gains)
    pairs += [(ours, rule) for rule in dict.fromkeys(rules_of_control) if rule in gains]
    out["default_minus_control"] = {
        f"{ours} - {rule}": {
            "mean": statistics.mean(d := [t[ours] - m[rule] for t, m in zip(theirs, mine)]),
            "stderr": stderr(d),
            "wins": sum(x > 0 for x in d),
            "losses": sum(x < 0 for x in d),
        }
        for ours, rule in pairs
    }
    return out


# The six methods of issue 17 (transfer.json's rows) as the library's default recipe trains them today: the
# trajectory each is read from, and the rule that picks its weights (`stage2`'s stop; over a transfer set the
# weights of the epoch it stops at, `transfer.keep: last`, else its best epoch's, `stage2.keep: best`)
LIBRARY = {
    "fusion": ("fusion", "latest_best"),
    "distill": ("distill", "latest_best"),
    "distill_transfer": (DEFAULT, "stop_last"),
    "self_training": ("self_training", "stop_last"),
    "transfer_no_teachers": ("transfer_no_teachers_noisy", "stop_last"),
}
LIBRARY_TARGETS = {5: (("adapter", 2.0), ("fusion", 1.0), ("self_training", 0.5)), 10: (("adapter", 1.0),)}


def library_methods(rows: list[dict[str, Any]], controls: dict[str, list]) -> dict[str, Any]:
    """Test accuracy of the six methods under `RecipeConfig()`'s rules, on the runs that have every trajectory:
    mean ± s.e., paired gain over the adapter, the stage's epochs and its seconds (the trajectory's seconds per
    epoch times the epochs the rule runs); and distill_transfer minus each other method, paired. Empty unless every
    control of `LIBRARY` was trained on some of these runs."""
    by_method = {DEFAULT: rows, **controls}
    if not {trajectory for trajectory, _ in LIBRARY.values()} <= by_method.keys():
        return {}
    keyed = {m: {(r["tenant"], r["seed"]): r for r in runs} for m, runs in by_method.items()}
    common = sorted(set.intersection(*(set(keyed[t]) for t, _ in LIBRARY.values())))
    if not common:
        return {}
    adapter = [100 * keyed[DEFAULT][k]["adapter"]["test_accuracy"] for k in common]
    test: dict[str, list[float]] = {"adapter": adapter}
    out: dict[str, Any] = {"runs": len(common), "seeds": sorted({seed for _, seed in common})}
    out["methods"] = {"adapter": {}}
    for name, (trajectory, rule) in LIBRARY.items():
        runs = [keyed[trajectory][k] for k in common]
        assert all(100 * r["adapter"]["test_accuracy"] == a for r, a in zip(runs, adapter)), "stage 1 differs"
        stops = [latest_stop_epoch(r["val"]) for r in runs]
        kept = stops if rule == "stop_last" else [latest_best_epoch(r["val"]) for r in runs]
        test[name] = [100 * r["last"][e - 1] for r, e in zip(runs, kept)]
        timed = [r["stage2_seconds"] / len(r["val"]) * e for r, e in zip(runs, stops) if r.get("stage2_seconds")]
        out["methods"][name] = {
            "epochs_run": statistics.mean(stops),
            "stage2_seconds": statistics.mean(timed) if timed else None,
            "timed_runs": len(timed),
        }
    for name, acc in test.items():
        gain = [a - b for a, b in zip(acc, adapter)]
        cell = out["methods"].setdefault(name, {})
        cell.update(mean=statistics.mean(acc), stderr=stderr(acc), gain=statistics.mean(gain), gain_stderr=stderr(gain))
        cell.update(wins=sum(g > 0 for g in gain), losses=sum(g < 0 for g in gain))
    out["distill_transfer_minus"] = {
        name: {
            "mean": statistics.mean(d := [a - b for a, b in zip(test["distill_transfer"], acc)]),
            "stderr": stderr(d),
            "wins": sum(x > 0 for x in d),
            "losses": sum(x < 0 for x in d),
        }
        for name, acc in test.items()
        if name != "distill_transfer"
    }
    return out


def library_lines(shots: str, lib: dict[str, Any]) -> list[str]:
    lines = [f"### {shots} shots, {lib['runs']} runs, seeds {lib['seeds']}", ""]
    lines += [
        "| method | test % (mean ± s.e.) | gain over adapter | wins / losses | distill_transfer minus it | epochs run "
        "| stage-2 seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, c in lib["methods"].items():
        minus = lib["distill_transfer_minus"].get(name)
        lines.append(
            f"| {name} | {c['mean']:.2f} ± {c['stderr']:.2f} | {c['gain']:+.2f} ± {c['gain_stderr']:.2f} | "
            f"{c['wins']} / {c['losses']} | "
            + (f"{minus['mean']:+.2f} ± {minus['stderr']:.2f} ({minus['wins']} / {minus['losses']})" if minus else "")
            + (f" | {c['epochs_run']:.1f} | " if "epochs_run" in c else " | | ")
            + (f"{c['stage2_seconds']:.1f} ({c['timed_runs']} runs) |" if c.get("stage2_seconds") else "|")
        )
    lines += ["", "Targets (distill_transfer minus the other method, points):", ""]
    for base, margin in LIBRARY_TARGETS.get(int(shots), ()):
        d = lib["distill_transfer_minus"][base]
        met = "met" if d["mean"] >= margin else "**not met**"
        lines.append(f"- vs {base}: {d['mean']:+.2f} ± {d['stderr']:.2f} (target ≥ +{margin:.1f}): {met}")
    return [*lines, ""]


def markdown(report: dict[str, Any]) -> str:
    m = report["meta"]
    lines = ["# Stage 2's stopping rule (one trajectory per run)", ""]
    lines += [f"Backbone {m['backbone']} (frozen), {m['machine']}, seeds {m['seeds']}, {m['date']}.", ""]
    lines += [
        f"Default recipe (distill + transfer, noisy student), stage 2 trained {m['epochs']} epochs without early "
        f"stopping; `best_val` = the first epoch to reach the best validation accuracy, patience {m['patience']} "
        f"(the default until 2026-12-05, at most 20 epochs); `latest_best` = the latest epoch to match it, patience "
        f"{LATEST['patience']}, at most {LATEST['epochs']} epochs (`stage2: {{epochs: {LATEST['epochs']}, patience: "
        f"{LATEST['patience']}, ties: later}}`; with a transfer set the default until `transfer.keep` came); "
        "`stop_last` = the same stop, keeping the weights of the epoch it stops at (the default since: "
        "`transfer.keep: last`); `last_k` / `average_k` = a fixed "
        f"budget of k epochs keeping the last / the mean weights. Validation: {m['val_per_label']} queries per "
        "intent (0.67 points each at 15 intents, so ties are common). Gains are paired over the stage-1 adapter, "
        "mean ± s.e.",
        "",
    ]
    if any(cell.get("library") for cell in report["summary"].values()):
        lines += [
            "## The six methods as the library's default recipe trains them",
            "",
            "Each read from its trajectory under `RecipeConfig()`'s rules: stage 2's stop (`latest_best`'s: patience "
            f"{LATEST['patience']}, ties later, at most {LATEST['epochs']} epochs); over a transfer set "
            "(distill_transfer, self_training, transfer_no_teachers; the last two are the controls (a) and (b), the "
            "noisy student included) the weights of the epoch it stops at (`stop_last`), else its best epoch's "
            "(`latest_best`: fusion, distill). Stage-2 seconds = the trajectory's seconds per epoch times the epochs "
            "the rule runs. Paired over the same runs (same data, same stage 1).",
            "",
        ]
        for shots, cell in report["summary"].items():
            if cell.get("library"):
                lines += library_lines(shots, cell["library"])
    for shots, cell in report["summary"].items():
        lines += [f"## {shots} shots, {cell['runs']} runs, seeds {cell['seeds']} (adapter {cell['adapter']:.2f} %)", ""]
        lines += [
            f"Stage 2: {cell['seconds_per_epoch'] or 0:.1f} s an epoch; `best_val` runs "
            f"{cell['best_val_epochs_run']:.1f} epochs on average; its stop falls within the {m['epochs']} "
            f"epochs in {cell['stop_within_epochs']} of {cell['runs']} runs (`average_to_stop` is exact for those)"
            + (
                f"; `latest_best` runs {cell['latest_best_epochs_run']:.1f} epochs on average."
                if "latest_best_epochs_run" in cell
                else "."
            ),
            "",
        ]
        lines += ["| rule | test % | gain over adapter | wins / losses | over best_val |", "|---|---|---|---|---|"]
        for name, s in cell.items():
            if isinstance(s, dict) and "mean" in s:
                lines.append(
                    f"| {name} | {s['mean']:.2f} | {s['gain_over_adapter']:+.2f} ± {s['gain_stderr']:.2f} | "
                    f"{s['wins']} / {s['losses']} | {s['over_best_val']:+.2f} ± {s['over_best_val_stderr']:.2f} |"
                )
        if "tie_rule_grid" in cell:
            lines += grid_lines(cell["tie_rule_grid"])
        if cell["versus"]:
            lines += ["Against transfer.json's rows on the same runs (paired, points):", ""]
            lines += [f"- {pair}: {v['mean']:+.2f} ± {v['stderr']:.2f}" for pair, v in cell["versus"].items()]
        names = list(next(iter(cell["per_seed"].values())))
        lines += ["", "Gain over the adapter per seed:", "", "| seed | " + " | ".join(names) + " |"]
        lines.append("|---" * (1 + len(names)) + "|")
        for seed, gains in cell["per_seed"].items():
            lines.append(f"| {seed} | " + " | ".join(f"{g:+.2f}" for g in gains.values()) + " |")
        lines.append("")
        if cell.get("controls"):
            lines += control_lines(cell["controls"])
        if "longer_budgets" in cell:
            lines += budget_lines(cell["longer_budgets"])
    if m["note"]:
        lines += [m["note"], ""]
    return "\n".join(lines)


def grid_lines(grid: dict[str, Any]) -> list[str]:
    lines = ["", "The best validation epoch per tie rule and patience (cut at 10 epochs; gain over the adapter):", ""]
    lines += [
        "| patience | first to reach the best | latest to match it | latest minus first | latest's stop, last "
        "weights | last weights minus latest |",
        "|---|---|---|---|---|---|",
    ]
    rules = ("earlier", "later", "later_minus_earlier", "later_last", "last_minus_later")
    for patience, g in grid.items():
        cells = [f"{g[k]['mean']:+.2f} ± {g[k]['stderr']:.2f}" for k in rules]
        lines.append(f"| {patience} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def control_lines(controls: dict[str, Any]) -> list[str]:
    lines = ["Controls trained the same way (every epoch kept, the same runs; gains over the adapter, points):", ""]
    lines += [
        "| control | runs | best_val | latest_best | stop_last | last_E (E epochs) | best fixed k in hindsight |",
        "|---|---|---|---|---|---|---|",
    ]
    gain = lambda g, rule: f"{g[rule]['mean']:+.2f} ± {g[rule]['stderr']:.2f}" if rule in g else ""  # noqa: E731
    for method, c in controls.items():
        g, last, hind = c["gain_over_adapter"], f"last_{c['epochs']}", f"last_{c['best_fixed_epochs']}"
        lines.append(
            f"| {method} | {c['runs']} | {gain(g, 'best_val')} | {gain(g, 'latest_best')} | {gain(g, 'stop_last')} | "
            f"{gain(g, last)} ({c['epochs']}) | {hind}: {gain(g, hind)} |"
        )
    lines += [
        f"{m}: its own validation stop differs from transfer.json's row on {c['best_val_unlike_transfer_json']['runs']}"
        f" runs (mean {c['best_val_unlike_transfer_json']['mean_difference']:+.2f} points; the runs checked)."
        for m, c in controls.items()
        if c["best_val_unlike_transfer_json"]["runs"]
    ]
    lines += ["", "The default recipe minus each control on the same runs (paired, points; wins / losses):", ""]
    for method, c in controls.items():
        lines += [
            f"- {method}: "
            + "; ".join(
                f"{pair} {v['mean']:+.2f} ± {v['stderr']:.2f} ({v['wins']} / {v['losses']})"
                for pair, v in c["default_minus_control"].items()
            )
        ]
    return [*lines, ""]


def budget_lines(longer: dict[str, Any]) -> list[str]:
    lines = [
        f"`latest_best` (patience {LATEST['patience']}) with a longer budget: the runs still improving at epoch "
        f"{LATEST['epochs']} go on (gains over the adapter; change from {LATEST['epochs']} epochs and the default "
        "minus each control stopped by the same rule, paired, points; wins / losses):",
        "",
    ]
    controls = sorted({m for b in longer["budgets"].values() for m in b["minus_control"]})
    lines += [
        "| at most | gain over adapter | wins / losses | epochs run | change | "
        + " | ".join(f"minus {m}" for m in controls)
        + " |"
    ]
    lines.append("|---" * (5 + len(controls)) + "|")
    pm = lambda v: f"{v['mean']:+.2f} ± {v['stderr']:.2f}"  # noqa: E731
    for budget, b in longer["budgets"].items():
        cells = [
            pm(b["minus_control"][m]) + f" ({b['minus_control'][m]['wins']} / {b['minus_control'][m]['losses']})"
            if m in b["minus_control"]
            else ""
            for m in controls
        ]
        lines.append(
            f"| {budget} | {pm(b['gain_over_adapter'])} | {b['wins']} / {b['losses']} | {b['epochs_run']:.1f} | "
            f"{pm(b['over_10_epochs'])} | " + " | ".join(cells) + " |"
        )
    if "long_runs" in longer:
        fixed = longer["long_runs"]["fixed"]
        lines += [
            "",
            f"On the {longer['long_runs']['runs']} runs that went on, a fixed budget of k epochs (last weights): "
            + "; ".join(f"{k}: {v['mean']:+.2f} ± {v['stderr']:.2f}" for k, v in fixed.items()),
        ]
    return [*lines, ""]


def chart(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = report["summary"]
    fig, axes = plt.subplots(1, len(cells), figsize=(6 * len(cells), 4), squeeze=False)
    for ax, (shots, cell) in zip(axes[0], cells.items()):
        epochs = range(1, report["meta"]["epochs"] + 1)
        for kind in ("last", "average"):
            gains = [cell[f"{kind}_{k}"]["gain_over_adapter"] for k in epochs]
            errs = [cell[f"{kind}_{k}"]["gain_stderr"] for k in epochs]
            ax.errorbar(list(epochs), gains, yerr=errs, marker="o", capsize=3, label=f"{kind} weights, k epochs")
        for method, c in cell.get("controls", {}).items():  # their runs may be a subset of the default's
            k = range(1, c["epochs"] + 1)  # a control may be given a longer budget than the default
            gains = [c["gain_over_adapter"][f"last_{i}"]["mean"] for i in k]
            ax.plot(list(k), gains, ls="--", marker=".", label=f"{method}, last weights ({c['runs']} runs)")
        ax.axhline(cell["best_val"]["gain_over_adapter"], color="gray", ls="--", label="best_val (former default)")
        ax.axhline(cell["average_to_stop"]["gain_over_adapter"], color="green", ls=":", label="average_to_stop")
        if "latest_best" in cell:
            ax.axhline(cell["latest_best"]["gain_over_adapter"], color="red", ls="-.", label="latest_best")
            ax.axhline(cell["stop_last"]["gain_over_adapter"], color="purple", ls="-", label="stop_last (default)")
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xlabel("stage-2 epochs (fixed budget)")
        ax.set_ylabel("test accuracy gain over adapter (points)")
        ax.set_title(f"{shots} shots, {cell['runs']} runs (bars: ±1 s.e.)", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shots", type=int, nargs="+", default=[5])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--tenants", nargs="+", default=None)
    p.add_argument("--epochs", type=int, default=10, help="stage-2 epochs of every run (no early stopping)")
    p.add_argument("--patience", type=int, default=3, help="best_val's patience (the default recipe's)")
    p.add_argument("--unlabeled", type=int, default=50)
    p.add_argument("--val-per-label", type=int, default=10)
    p.add_argument("--workdir", default="runs/accuracy")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--note", default="")
    p.add_argument(
        "--controls",
        nargs="*",
        default=[],
        choices=[m for m in TRAIN if m != DEFAULT],
        help="also train these rows of transfer.json the same way (fixed budget, every epoch kept), on the same runs",
    )
    p.add_argument(
        "--check-default",
        type=int,
        default=0,
        metavar="K",
        help="also train the library's default stage 2 on the first K runs and assert it keeps stop_last's weights",
    )
    p.add_argument("--control-epochs", type=int, default=None, help="the controls' stage-2 epochs (default: --epochs)")
    p.add_argument(
        "--longer",
        type=int,
        default=None,
        metavar="E",
        help="also report latest_best with budgets of up to E epochs, reading the runs still improving at epoch 10 "
        "from their E-epoch cache (trained by --epochs E --tenants ...)",
    )
    p.add_argument(
        "--cached-only",
        action="store_true",
        help="report the runs of the arguments already cached, train none; a control without --control-epochs is "
        "reported at its longest budget cached for those shots",
    )
    args = p.parse_args()
    workdir, out = Path(args.workdir), Path(args.out)
    backbone, loaded, stage1 = start_transfer_benchmark(workdir)
    cfg = RecipeConfig(
        stage1=stage1,
        stage2=TrainConfig(epochs=args.epochs, lr=5e-4, patience=None),
        transfer=TransferConfig(student_noise=0.2),
    )

    def runs(method: str) -> list[dict[str, Any]]:
        epochs = args.epochs if method == DEFAULT else (args.control_epochs or args.epochs)
        if args.cached_only:
            return [row for shots in args.shots for row in cached(method, shots, epochs)]
        return cached_runs(
            args,
            workdir / "stopping" / "runs",
            f"-n{args.unlabeled}-e{epochs}" + ("" if method == DEFAULT else f"-{method}"),
            loaded,
            ["adapter"],
            lambda domain, shots, seed, peers, _: run_one(
                backbone,
                domain,
                shots,
                seed,
                peers,
                cfg.replace(stage2=cfg.stage2.replace(epochs=epochs)),
                args,
                workdir,
                method,
            ),
        )

    def cached(method: str, shots: int, epochs: int) -> list[dict[str, Any]]:
        def found(epochs: int) -> list[Path]:
            tail = f"-n{args.unlabeled}-e{epochs}" + ("" if method == DEFAULT else f"-{method}") + ".json"
            paths = [
                workdir / "stopping" / "runs" / f"{domain}-k{shots}-s{seed}{tail}"
                for seed, domain in itertools.product(args.seeds, args.tenants or clinc150.domains())
            ]
            return [path for path in paths if path.exists()]

        if method != DEFAULT and args.control_epochs is None:  # the longest budget cached for these shots
            pattern = f"*-k{shots}-s*-n{args.unlabeled}-e*-{method}.json"
            budgets = {int(p.name.split("-e")[-1].split("-")[0]) for p in (workdir / "stopping" / "runs").glob(pattern)}
            epochs = max((e for e in budgets if found(e)), default=epochs)
        return [json.loads(path.read_text()) for path in found(epochs)]

    rows = runs(DEFAULT)
    for row in rows[: args.check_default]:
        peers = [loaded[d].as_teacher().adapters for d in clinc150.domains() if d != row["tenant"]]
        test = check_default(backbone, row, peers, cfg, args, workdir)
        log.warning(
            "%s k%d s%d: the default recipe keeps epoch %d, test %.4f = stop_last",
            row["tenant"],
            row["shots"],
            row["seed"],
            latest_stop_epoch(row["val"]),
            test,
        )
    controls = {method: runs(method) for method in args.controls}
    add_baselines(rows, workdir, args.unlabeled)
    meta = {
        "backbone": backbone.name,
        "machine": f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)",
        "date": time.strftime("%Y-%m-%d"),
        "seeds": args.seeds,
        "epochs": args.epochs,
        "patience": args.patience,
        "unlabeled_per_intent": args.unlabeled,
        "val_per_label": args.val_per_label,
        "stage1": cfg.stage1.to_dict(),
        "controls": args.controls,
        "note": args.note,
    }
    longer = None
    if args.longer:
        longer = [row for shots in args.shots for row in cached(DEFAULT, shots, args.longer)]
        meta["longer"] = args.longer
    budgets = tuple(range(LATEST["epochs"], (args.longer or 0) + 1, 5))
    summary = summarise(rows, args.patience, controls, longer, budgets)
    report = {"meta": meta, "summary": summary, "runs": rows}
    if longer is not None:
        report["longer_runs"] = longer
    report["controls"] = controls
    out.mkdir(parents=True, exist_ok=True)
    (out / "stopping.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "stopping.md").write_text(markdown(report))
    chart(report, out / "stopping.png")
    print(markdown(report))


if __name__ == "__main__":
    main()
