"""Seconds per training step of stage 1 vs stage 2 with 1, 5 and 10 teachers (DESIGN.md §5), on the same batches
(the packaged all-MiniLM-L6-v2, batch 32, max length 32), timed through the real recipes (`train_adapter`,
`distill`): `FitResult.seconds / steps` of one epoch (its one validation pass over one query per label included),
best of a few interleaved rounds after warm-up.

Writes benchmarks/results/step_times.{json,md}. Never asserted anywhere; the figures depend on the machine.

    python benchmarks/step_times.py        # a few minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
from pathlib import Path
from typing import Any

import torch

from adistill.adapters import AdapterSet
from adistill.backbone import Backbone, load_backbone
from adistill.config import RecipeConfig, TrainConfig
from adistill.data import Split, TenantData, read_tenant_data
from adistill.datasets import clinc150
from adistill.recipes.stage1 import train_adapter
from adistill.recipes.stage2 import distill

RESULTS = Path(__file__).parent / "results"
log = logging.getLogger("benchmarks.step_times")


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


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    step = report["step"]
    lines = [
        "# Training step cost: stage 1 vs stage 2",
        "",
        f"Machine: {env['machine']}, {env['cpus']} CPUs, torch {env['torch']}, {env['device']}; "
        f"backbone {env['backbone']}. {report['note']}",
        "",
        f"Same batches (batch {step['batch']}, max length {step['max_length']}); best of {step['rounds']} "
        f"interleaved rounds of {step['steps_per_sample']} steps.",
        "",
        "| step | teachers | s/step (best) | x stage 1 | every round, s/step |",
        "|---|---:|---:|---:|---|",
    ]
    for name, row in step["rows"].items():
        label = "stage 1" if name == "stage1" else "stage 2"
        rounds = ", ".join(f"{x:.2f}" for x in row.get("samples", []))
        lines.append(
            f"| {label} | {row.get('teachers', 0)} | {row['seconds_per_step']:.3f} | "
            f"{row.get('ratio_to_stage1', 1.0):.2f} | {rounds} |"
        )
    lines += [
        "",
        "When the rounds of one row differ by more than the rows differ from each other, the machine's other load "
        "decided the figures: compare ratios only from a quiet machine.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default=None, help="default: the packaged all-MiniLM-L6-v2")
    parser.add_argument("--teachers", type=int, nargs="+", default=[1, 5, 10])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4, help="steps per timed epoch")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best is reported")
    parser.add_argument("--note", default="", help="free text recorded with the results (e.g. machine load)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backbone = load_backbone(args.backbone, device)
    report: dict[str, Any] = {
        "environment": {
            "machine": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "device": device,
            "backbone": backbone.name,
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
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "step_times.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "step_times.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
