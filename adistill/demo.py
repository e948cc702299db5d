"""`adistill demo`: the main job on embedded defaults (packaged all-MiniLM-L6-v2 + CLINC150 tenants).

1. Onboard earlier tenants (CLINC domains, full data) with Ray Train into a local registry.
2. Onboard a new few-shot tenant with `distill`; the same tenant with `adapter` and `fusion` are onboarded beside
   it (as `<id>-adapter`, `<id>-fusion`) for comparison. Teachers are the adapters already in the registry.
3. Report accuracy, size and inference speed per method.
4. Serve every tenant with Ray Serve, send real HTTP requests for two tenants (printed as curl lines that paste
   and run), print the answers, shut down, and print the `adistill serve` line that serves the registry again.

Everything goes through the same manifests, registry and Serve application a platform uses; output goes through
`echo` (the CLI passes one that writes to the terminal). A re-run skips tenants already published.
"""

from __future__ import annotations

import json
import logging
import math
import shlex
import shutil
import socket
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from adistill.backbone import Backbone, load_backbone
from adistill.datasets import clinc150
from adistill.encoder import encode
from adistill.inference.engine import Engine
from adistill.model import TenantModel
from adistill.reports import artifact_bytes, text_table
from adistill.store.registry import Registry

Echo = Callable[[str], object]


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

    @property
    def new_id(self) -> str:
        return self.new_tenant.replace("_", "-")


QUERIES = {
    "auto-and-commute": ["how much air is in my tires", "when is my car due for an oil change", "tell me a joke"],
    "banking": ["what's my checking account balance", "i need to report fraud on my account"],
}


def write_manifests(plan: DemoPlan, out: Path) -> tuple[Path, Path]:
    """The two batches as tenants manifests (docs/onboarding.md), with their recipes inline."""
    out.mkdir(parents=True, exist_ok=True)
    teacher_recipe = {"stage1": {"epochs": plan.teacher_epochs, "patience": 2}}
    new_recipe = {"stage1": {"epochs": plan.epochs, "patience": 8}, "stage2": {"epochs": plan.epochs, "patience": 8}}
    teachers = {
        "defaults": {"method": "adapter", "config": teacher_recipe},
        "tenants": [{"id": d.replace("_", "-"), "data": clinc150.tenant_path(d)} for d in plan.teachers],
    }
    data = clinc150.tenant_path(plan.new_tenant)
    new = {
        "defaults": {"shots": plan.shots, "config": new_recipe},
        "tenants": [
            {"id": plan.new_id, "data": data, "method": "distill"},
            {"id": f"{plan.new_id}-adapter", "data": data, "method": "adapter"},
            {"id": f"{plan.new_id}-fusion", "data": data, "method": "fusion"},
        ],
    }
    paths = out / "teachers.yaml", out / "new-tenant.yaml"
    for path, manifest in zip(paths, (teachers, new)):
        path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return paths


def run_demo(out: Path, quick: bool = False, echo: Echo = lambda s: None, port: int | None = None) -> dict[str, Any]:
    from adistill.distributed.common import ensure_ray, shutdown_ray
    from adistill.distributed.onboard import OnboardOptions, onboard_manifest, summary_table
    from adistill.manifest import load_manifest

    plan = DemoPlan.default(quick)
    started = time.perf_counter()
    backbone = load_backbone()
    echo(f"backbone {backbone.name}: {backbone.num_parameters / 1e6:.1f}M parameters, frozen and shared")
    registry = Registry(str(out / "registry"))
    teachers_yaml, new_yaml = write_manifests(plan, out)
    ensure_ray(num_cpus=4)
    options = OnboardOptions(workers=2, storage_path=str((out / "runs").resolve()))

    outcomes = []
    for path in (teachers_yaml, new_yaml):
        echo(f"\n$ adistill onboard {shlex.quote(str(path))} --registry {shlex.quote(registry.uri)}")
        echo("  (Ray Train, 2 tenants at a time; the first lines come once Ray and its workers have started)")
        batch = onboard_manifest(load_manifest(path), registry, options=options, on_event=DemoProgress(echo))
        echo(summary_table(batch))
        outcomes += batch
    failed = [o.tenant_id for o in outcomes if o.status == "failed"]
    if failed:
        raise RuntimeError(f"demo: onboarding failed for {failed}")

    rows = _comparison(backbone, registry, plan, echo)
    answers = _serve_and_ask(registry, echo, port)
    report = {
        "plan": plan.__dict__,
        "rows": rows,
        "answers": answers,
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / "demo-report.json").write_text(json.dumps(report, indent=2) + "\n")
    echo(f"\ndone in {report['seconds']} s; registry, manifests and demo-report.json under {out}/")
    shutdown_ray()
    echo("serve every demo tenant again (Ctrl-C stops it), then use the curl lines above:")
    echo(serve_command(registry.uri))
    return report


class DemoProgress:
    """What the demo prints while a batch onboards: each tenant's start, its training (a stage's first and last
    epoch, and at most one line per tenant every `every_s` seconds in between) and its end."""

    def __init__(self, echo: Echo, every_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.echo, self.every_s, self.clock = echo, every_s, clock
        self.last: dict[str, float] = {}

    def __call__(self, event: Any) -> None:
        d, tenant = event.detail, event.tenant_id
        if event.status == "reading":
            self.echo(f"  {tenant}: training started")
        elif "epoch" in d and "epochs" in d:
            now = self.clock()
            due = now - self.last.get(tenant, -math.inf) >= self.every_s
            if d["epoch"] in (1, d["epochs"]) or due:
                self.last[tenant] = now
                self.echo(f"  {tenant}: {event.status} epoch {d['epoch']}/{d['epochs']} val {d['val_accuracy']:.3f}")
        elif event.status in ("published", "skipped", "failed"):
            shown = {k: d[k] for k in ("version", "accuracy", "error") if d.get(k) is not None}
            count = f"  [{d['done']}/{d['total']} tenants]" if "done" in d else ""
            extra = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())
            self.echo(f"  {tenant}: {event.status}{f' ({extra})' if extra else ''}{count}")


def serve_command(registry_uri: str) -> str:
    """The `adistill serve` line for the demo's registry, as it pastes into this shell."""
    return f"{adistill_command()} serve --registry {shlex.quote(registry_uri)}"


def adistill_command() -> str:
    """How to call adistill from the shell that started this process: `adistill` when that is on PATH, else the
    path it was started as (`.venv/bin/adistill` under `make demo`)."""
    argv0 = Path(sys.argv[0])
    if argv0.name != "adistill":
        return "adistill"
    on_path = shutil.which("adistill")
    if on_path and Path(on_path).resolve() == argv0.resolve():
        return "adistill"
    return shlex.quote(str(argv0))


def curl_command(url: str, body: dict[str, Any], key: str | None = None) -> str:
    """A curl line that pastes into a shell and runs: the tenant's API key, a JSON content type, the body quoted
    for the shell (texts with quotes in them included)."""
    auth = f" -H {shlex.quote('Authorization: Bearer ' + key)}" if key else ""
    header = "content-type: application/json"
    body_text = shlex.quote(json.dumps(body))
    return f"curl -s -X POST {shlex.quote(url)}{auth} -H {shlex.quote(header)} -d {body_text}"


def _comparison(backbone: Backbone, registry: Registry, plan: DemoPlan, echo: Echo) -> list[dict[str, Any]]:
    """Accuracy (from each artifact's metadata), size and engine throughput of the three methods."""
    ids = {"adapter": f"{plan.new_id}-adapter", "fusion": f"{plan.new_id}-fusion", "distill": plan.new_id}
    artifacts = {m: registry.get(t, backbone) for m, t in ids.items()}
    speed = _throughput(backbone, {m: a.model for m, a in artifacts.items()})
    rows = []
    for method, art in artifacts.items():
        meta = art.meta
        rows.append(
            {
                "method": method,
                "tenant": ids[method],
                "test_accuracy": round(100 * meta["metrics"]["test"]["accuracy"], 2),
                "added_params_pct": meta["parameters"]["percent_of_backbone"],
                "artifact_bytes": artifact_bytes(meta),
                "seq_per_s": round(speed[method], 1),
                "ratio_to_bare": round(speed[method] / speed["bare"], 3),
            }
        )
    echo(f"\nnew tenant {plan.new_id!r}: {plan.shots} shots per intent, {len(plan.teachers)} teachers")
    echo(comparison_table(rows, speed["bare"]))
    return rows


@torch.no_grad()
def _throughput(backbone: Backbone, models: dict[str, TenantModel], repeats: int = 5) -> dict[str, float]:
    """Sequences/s of one batch of 32 queries: bare encoder and each method's model (same batch, one run)."""
    texts = (QUERIES["auto-and-commute"] * 11)[:32]
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


def comparison_table(rows: list[dict[str, Any]], bare: float) -> str:
    """The methods side by side, as a Markdown table (README.md shows one), the bare encoder first."""
    header = ["method", "test acc %", "added params %", "artifact bytes", "seq/s", "× bare"]
    cells = [["(bare)", "", "", "", f"{bare:.0f}", "1.00"]]
    cells += [
        [
            r["method"],
            f"{r['test_accuracy']:.2f}",
            r["added_params_pct"],
            f"{r['artifact_bytes']:,}",
            f"{r['seq_per_s']:.0f}",
            f"{r['ratio_to_bare']:.2f}",
        ]
        for r in rows
    ]
    return text_table(header, cells, align="<>>>>>", markdown=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve_and_ask(registry: Registry, echo: Echo, port: int | None) -> list[dict[str, Any]]:
    """Start the Serve application on this registry, ask two tenants over HTTP, shut the service down."""
    from adistill.distributed.serve import ServeConfig, serving
    from adistill.store.keys import create_key

    port = port or _free_port()
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # the demo prints its own lines
    config = ServeConfig(registry=registry.uri, max_batch_size=16, ray_actor_options={"num_cpus": 0.5})
    # Auth is on: one API key per tenant asked (`adistill keys create`); created before the service reads its keys.
    keys = {tenant: create_key(registry.uri, tenant=tenant, name="demo") for tenant in QUERIES}
    echo(f"\n$ adistill keys create --registry {registry.uri} --tenant TENANT   (one API key per tenant asked below)")
    answers = []
    with serving(config, "127.0.0.1", port):
        echo(f"\nserving every tenant at http://127.0.0.1:{port} (Ray Serve, one backbone replica group)")
        for tenant, texts in QUERIES.items():
            url = f"http://127.0.0.1:{port}/v1/tenants/{tenant}/predict"
            payload = {"texts": texts, "top_k": 2}
            body = json.dumps(payload).encode()
            echo(f"$ {curl_command(url, payload, keys[tenant])}")
            headers = {"Content-Type": "application/json", "Authorization": f"Bearer {keys[tenant]}"}
            req = urllib.request.Request(url, body, headers)
            with urllib.request.urlopen(req, timeout=60) as resp:
                answer = json.loads(resp.read())
            echo(json.dumps(answer))
            answers.append(answer)
    echo("service shut down")
    return answers
