"""What a teacher set costs: stage-2 step time and peak memory vs k, and selection time over 1,000 tenants.

    python benchmarks/teachers.py                    # all-MiniLM-L6-v2, k = 1, 5, 10, 20, batch 32
    python benchmarks/teachers.py --backbone PATH --ks 1 10

Part 1 (cost vs k): one stage-2 step (teacher path with a fusion over k frozen adapters + student path,
forward and backward, AdamW step) on the same batch of CLINC queries, with the factored fusion (the default)
and the plain textbook form; each k runs in its own process so its peak RSS is its own. Part 2 (scale):
1,000 synthetic published tenants (random adapters + metadata with a data embedding) in a local registry;
time to rank them for a new tenant with `similar` and `random` (metadata only), and the stage-2 step at k = 10.
Writes benchmarks/results/teachers.{json,md,png}. Accuracy per selector and k: benchmarks/teacher_accuracy.py.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def step_cost(backbone_spec: str | None, k: int, plain: bool, steps: int) -> dict[str, float]:
    from adistill.adapters import AdapterSet
    from adistill.backbone import load_backbone
    from adistill.config import AdapterConfig, DistillConfig
    from adistill.data import read_tenant_data
    from adistill.datasets import clinc150
    from adistill.encoder import encode
    from adistill.fusion import FusionSet
    from adistill.heads import Head
    from adistill.losses import distillation_loss

    torch.manual_seed(0)
    backbone = load_backbone(backbone_spec)
    data = read_tenant_data(clinc150.tenant_path("banking"))
    batch = backbone.tokenize(data.train.texts[:32], 32)
    labels = torch.tensor([data.labels.index(y) for y in data.train.labels[:32]])
    g = torch.Generator().manual_seed(0)
    cfg = AdapterConfig()

    def adapter() -> AdapterSet:
        a = AdapterSet(backbone.num_layers, backbone.hidden_size, cfg, g)
        with torch.no_grad():
            for p in a.parameters():
                p.normal_(std=0.02, generator=g)
        return a

    fusion = FusionSet([adapter() for _ in range(k)], backbone.num_layers, backbone.hidden_size, g, plain=plain)
    student, head_t, head_s = (
        adapter(),
        Head(backbone.hidden_size, data.labels),
        Head(backbone.hidden_size, data.labels),
    )
    params = [p for m in (fusion, student, head_t, head_s) for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-4)
    ids, mask = batch["input_ids"], batch["attention_mask"]

    def step() -> None:
        z_t = head_t(encode(backbone.model, ids, mask, fusion), mask)
        z_s = head_s(encode(backbone.model, ids, mask, student), mask)
        loss = distillation_loss(z_s, z_t, labels, DistillConfig()).total
        opt.zero_grad()
        loss.backward()
        opt.step()

    def stage1_step() -> None:
        z = head_s(encode(backbone.model, ids, mask, student), mask)
        loss = torch.nn.functional.cross_entropy(z, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()

    out = {}
    for name, fn in (("stage1", stage1_step), ("stage2", step)):
        fn()
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        out[f"{name}_step_s"] = (time.perf_counter() - t0) / steps
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def selection_at_scale(n: int, dim: int) -> dict[str, float]:
    """Publish n synthetic tenants' metadata-bearing artifacts to a local registry; time ranking them."""
    from adistill.selection import Candidate, SelectionConfig, select_teachers
    from adistill.store.registry import Registry

    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as root:
        registry = Registry(root)
        template = _synthetic_files(dim)
        t0 = time.perf_counter()
        for i in range(n):
            meta = json.loads(template["adapter_config.json"])
            meta["tenant_id"] = f"t{i:05d}"
            meta["data"]["embedding"] = torch.randn(dim, generator=g).tolist()
            files = dict(template)
            files["adapter_config.json"] = json.dumps(meta).encode()
            registry.publish(f"t{i:05d}", files)
        publish_s = time.perf_counter() - t0
        fingerprint = json.loads(template["adapter_config.json"])["backbone"]["fingerprint"]
        t0 = time.perf_counter()
        listed = registry.adapters_for(fingerprint)
        candidates = [Candidate(t, v, registry.meta(t, v)) for t, v in listed]
        read_s = time.perf_counter() - t0
        embedding = torch.randn(dim, generator=g)
        timings = {}
        for strategy in ("similar", "random"):
            t0 = time.perf_counter()
            sel = select_teachers(candidates, SelectionConfig(strategy, k=10), embedding=embedding)  # type: ignore[arg-type]
            timings[f"rank_{strategy}_s"] = time.perf_counter() - t0
            assert len(sel.chosen) == 10
        return {"tenants": n, "publish_s": publish_s, "read_metadata_s": read_s, **timings}


def _synthetic_files(dim: int) -> dict[str, bytes]:
    """A real (random-weight) artifact of the default backbone's shape, built once and reused."""
    from adistill.backbone import load_backbone
    from adistill.config import RecipeConfig, TrainConfig
    from adistill.data import few_shot, read_tenant_data
    from adistill.datasets import clinc150
    from adistill.recipes import train_tenant

    backbone = load_backbone()
    data = few_shot(read_tenant_data(clinc150.tenant_path("meta")), 4, 0)
    cfg = RecipeConfig(method="adapter", stage1=TrainConfig(epochs=1))
    result = train_tenant(backbone, data, cfg)
    return result.files("template", backbone, cfg, {"source": "synthetic", "embedding": [0.0] * dim})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default=None)
    p.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10, 20])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--tenants", type=int, default=1000)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--one", nargs=2, metavar=("K", "PLAIN"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(step_cost(args.backbone, int(args.one[0]), args.one[1] == "1", args.steps)))
        return
    rows = []
    for k in args.ks:
        for plain in (False, True):
            cmd = [sys.executable, __file__, "--one", str(k), str(int(plain)), "--steps", str(args.steps)]
            if args.backbone:
                cmd += ["--backbone", args.backbone]
            res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            rows.append({"k": k, "fusion": "plain" if plain else "factored", **res})
            print(rows[-1], flush=True)
    scale = selection_at_scale(args.tenants, 384)
    report = {
        "machine": f"CPU, {torch.get_num_threads()} threads",
        "date": time.strftime("%Y-%m-%d"),
        "batch": 32,
        "max_length": 32,
        "steps": args.steps,
        "rows": rows,
        "scale": scale,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "teachers.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [
        "# Stage-2 cost vs number of teachers k",
        "",
        f"{report['machine']}, batch 32, max length 32, mean of {args.steps} steps, {report['date']}.",
        "",
        "| k | fusion | stage-1 step s | stage-2 step s | stage-2 / stage-1 | peak RSS MB |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['k']} | {r['fusion']} | {r['stage1_step_s']:.3f} | {r['stage2_step_s']:.3f} | "
            f"{r['stage2_step_s'] / r['stage1_step_s']:.2f} | {r['peak_rss_mb']:.0f} |"
        )
    lines += [
        "",
        f"Selection over {scale['tenants']} published tenants (local registry, metadata only): "
        f"reading their metadata {scale['read_metadata_s']:.2f} s; ranking `similar` "
        f"{1000 * scale['rank_similar_s']:.1f} ms, `random` {1000 * scale['rank_random_s']:.1f} ms.",
    ]
    (out / "teachers.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for form in ("factored", "plain"):
        sub = [r for r in rows if r["fusion"] == form]
        ax.plot([r["k"] for r in sub], [r["stage2_step_s"] / r["stage1_step_s"] for r in sub], "o-", label=form)
    ax.set_xlabel("teachers k")
    ax.set_ylabel("stage-2 step / stage-1 step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "teachers.png", dpi=110)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
