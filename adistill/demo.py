"""`adistill demo`: the main job on embedded defaults (packaged all-MiniLM-L6-v2 + CLINC150 tenants).

Teachers (earlier tenants) are trained on their full data; a new few-shot tenant is then trained with
`adapter`, `fusion` and `distill`; the demo reports accuracy, size and inference speed, and a few answers.
Output goes through `echo` (the CLI passes one that writes to the terminal).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from adistill.artifacts import load_artifact, save_artifact
from adistill.backbone import Backbone, load_backbone
from adistill.config import RecipeConfig, TrainConfig
from adistill.datasets import clinc150
from adistill.encoder import encode
from adistill.engine import Engine
from adistill.jobs import TenantJob, run_job
from adistill.model import TenantModel


@dataclass(frozen=True)
class DemoPlan:
    teachers: tuple[str, ...]
    new_tenant: str
    shots: int
    teacher_epochs: int
    epochs: int

    @classmethod
    def default(cls, quick: bool = False) -> DemoPlan:
        if quick:
            return cls(("banking", "credit_cards"), "auto_and_commute", 5, 1, 6)
        return cls(("banking", "credit_cards", "travel", "utility", "work"), "auto_and_commute", 5, 3, 30)


QUERIES = ["how much air is in my tires", "when is my car due for an oil change", "tell me a joke about cats"]


def run_demo(out: Path, quick: bool = False, echo: Callable[[str], object] = lambda s: None) -> dict[str, object]:
    plan = DemoPlan.default(quick)
    started = time.perf_counter()
    backbone = load_backbone()
    echo(f"backbone {backbone.name}: {backbone.num_parameters / 1e6:.1f}M parameters, frozen and shared")
    teacher_dirs = [_teacher(backbone, d, out / "teachers", plan.teacher_epochs, echo) for d in plan.teachers]
    teachers = [load_artifact(p, backbone).as_teacher() for p in teacher_dirs]

    rows, models = [], {}
    for method in ("adapter", "fusion", "distill"):
        cfg = RecipeConfig(
            method=method,
            shots=plan.shots,
            stage1=TrainConfig(epochs=plan.epochs, lr=1e-3, patience=8),
            stage2=TrainConfig(epochs=plan.epochs, lr=5e-4, patience=8),
        )
        job = TenantJob(plan.new_tenant.replace("_", "-"), clinc150.tenant_path(plan.new_tenant), cfg)
        t0 = time.perf_counter()
        files, result = run_job(job, backbone, teachers)
        path = save_artifact(files, out / "tenants" / f"{job.tenant_id}-{method}")
        meta = json.loads(files["adapter_config.json"])
        models[method] = result.model
        rows.append(
            {
                "method": method,
                "test_accuracy": round(100 * result.metrics["test"]["accuracy"], 2),
                "added_params_pct": meta["parameters"]["percent_of_backbone"],
                "artifact_bytes": sum(len(b) for b in files.values()),
                "train_seconds": round(time.perf_counter() - t0, 1),
                "artifact": str(path),
            }
        )
        echo(f"trained {job.tenant_id} with {method}: test accuracy {rows[-1]['test_accuracy']}%")

    speed = _throughput(backbone, models)
    for row in rows:
        row["seq_per_s"] = round(speed[str(row["method"])], 1)
        row["ratio_to_bare"] = round(speed[str(row["method"])] / speed["bare"], 3)
    echo("")
    echo(f"new tenant {plan.new_tenant!r}, {plan.shots} shots per intent, {len(teachers)} teachers")
    echo(_table(rows, speed["bare"]))
    echo("")
    engine = Engine(backbone)
    distilled = models["distill"]
    for text, pred in zip(QUERIES, engine.predict(QUERIES, [distilled] * len(QUERIES), top_k=2)):
        echo(json.dumps({"text": text, **pred.to_dict()}))
    report = {
        "plan": plan.__dict__,
        "rows": rows,
        "bare_seq_per_s": speed["bare"],
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / "demo-report.json").write_text(json.dumps(report, indent=2) + "\n")
    echo(f"\ndone in {report['seconds']} s; artifacts and demo-report.json under {out}/")
    return report


def _teacher(backbone: Backbone, domain: str, root: Path, epochs: int, echo: Callable[[str], object]) -> Path:
    path = root / domain.replace("_", "-")
    if (path / "adapter_config.json").exists():
        return path
    cfg = RecipeConfig(method="adapter", stage1=TrainConfig(epochs=epochs, lr=1e-3, patience=2))
    files, result = run_job(TenantJob(domain.replace("_", "-"), clinc150.tenant_path(domain), cfg), backbone, [])
    save_artifact(files, path)
    echo(f"teacher {domain}: validation accuracy {100 * result.metrics['validation']['accuracy']:.1f}%")
    return path


@torch.no_grad()
def _throughput(backbone: Backbone, models: dict[str, TenantModel], repeats: int = 5) -> dict[str, float]:
    """Sequences/s of one batch of 32 queries: bare encoder and each method's model (same batch)."""
    texts = (QUERIES * 11)[:32]
    batch = backbone.tokenize(texts, 32)
    engine = Engine(backbone)

    def rate(fn: Callable[[], object]) -> float:
        fn()
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        return len(texts) * repeats / (time.perf_counter() - t0)

    out = {"bare": rate(lambda: encode(backbone.model, batch["input_ids"], batch["attention_mask"]))}
    for method, model in models.items():
        out[method] = rate(lambda m=model: engine.predict(texts, [m] * len(texts)))  # type: ignore[misc]
    return out


def _table(rows: list[dict[str, object]], bare: float) -> str:
    lines = [
        "| method  | test acc % | added params % | artifact bytes | seq/s | × bare |",
        "|---------|-----------:|---------------:|---------------:|------:|-------:|",
        f"| (bare)  |            |                |                | {bare:5.0f} |   1.00 |",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']:<7} | {r['test_accuracy']:>10} | {r['added_params_pct']:>14} | {r['artifact_bytes']:>14,} "
            f"| {r['seq_per_s']:>5.0f} | {r['ratio_to_bare']:>6.2f} |"
        )
    return "\n".join(lines)
