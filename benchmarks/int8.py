"""The int8 CPU backbone (issue 13): engine throughput and CLINC150 accuracy against fp32, same artifacts.

The artifacts are the CLINC150 accuracy benchmark's domain tenants (benchmarks/accuracy.py's teachers: one adapter
per domain on its full training data, the same recipe), trained once on the fp32 backbone and cached under
--workdir. Each is then evaluated on its domain's in-scope test queries with the fp32 backbone and with the int8
one (`load_backbone(precision="int8")`: the encoder's linear layers dynamically quantized, one weight scale per output
channel; one scale per tensor is evaluated too, for the record); the engine's throughput
is timed in interleaved rounds (sequences per CPU-second of the calling thread, one torch thread, batch 32, seq 32).

    python benchmarks/int8.py --json benchmarks/results/int8.json      # serving.py calls `int8_report`
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from accuracy import teacher_artifacts  # the same domain tenants, the same recipe

from adistill.backbone import Backbone, load_backbone, quantize_int8
from adistill.config import AdapterConfig
from adistill.data import read_tenant_data
from adistill.datasets import clinc150
from adistill.inference.engine import Engine
from adistill.recipes.evaluate import accuracy
from adistill.store.artifact import load_artifact

log = logging.getLogger("benchmarks.int8")


def test_accuracy(backbone: Backbone, artifacts: dict[str, Path]) -> dict[str, float]:
    out = {}
    for domain, path in artifacts.items():
        artifact = load_artifact(path, backbone)  # the fingerprint check: int8 keeps the fp32 fingerprint
        data = read_tenant_data(clinc150.tenant_path(domain))
        out[domain] = 100 * accuracy(backbone, artifact.model, data.test, artifact.model.max_length)
    return out


def engine_ratio(fp32: Backbone, int8: Backbone, rounds: int, batch: int = 32, seq: int = 32) -> dict[str, float]:
    sys.path.insert(0, str(Path(__file__).parent))
    from serving import long_texts, random_tenant

    texts = long_texts(batch)
    cpu: dict[str, list[float]] = {"fp32": [], "int8": []}
    engines = {"fp32": Engine(fp32), "int8": Engine(int8)}
    models = {
        name: [random_tenant(b, s, seq, AdapterConfig()) for s in range(batch)]
        for name, b in (("fp32", fp32), ("int8", int8))
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, engine in engines.items():
            engine.predict(texts, models[name])  # warm
        for _ in range(rounds):
            for name, engine in engines.items():
                start = time.thread_time()
                engine.predict(texts, models[name])
                cpu[name].append(time.thread_time() - start)
    finally:
        torch.set_num_threads(threads)
    rate = {name: batch / statistics.median(v) for name, v in cpu.items()}
    return {"fp32_seq_per_s": round(rate["fp32"], 1), "int8_seq_per_s": round(rate["int8"], 1)}


def int8_report(workdir: Path, epochs: int = 8, rounds: int = 12) -> dict[str, Any]:
    fp32 = load_backbone(None)
    int8 = load_backbone(None, precision="int8")  # per-channel weight scales (the default)
    per_tensor = load_backbone(None)
    quantize_int8(per_tensor, per_channel=False)  # the alternative, for the record
    artifacts = teacher_artifacts(fp32, workdir, epochs)
    acc32, acc8 = test_accuracy(fp32, artifacts), test_accuracy(int8, artifacts)
    acc_tensor = test_accuracy(per_tensor, artifacts)
    speed = engine_ratio(fp32, int8, rounds)
    mean32, mean8 = statistics.mean(acc32.values()), statistics.mean(acc8.values())
    return {
        "seq_per_s_ratio": round(speed["int8_seq_per_s"] / speed["fp32_seq_per_s"], 3),
        **speed,
        "accuracy_fp32": round(mean32, 2),
        "accuracy_int8": round(mean8, 2),
        "accuracy_delta": round(mean8 - mean32, 2),
        "accuracy_int8_per_tensor": round(statistics.mean(acc_tensor.values()), 2),
        "per_tenant": {
            d: {"fp32": round(acc32[d], 2), "int8": round(acc8[d], 2), "int8_per_tensor": round(acc_tensor[d], 2)}
            for d in artifacts
        },
        "tenants": len(artifacts),
        "epochs": epochs,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/int8", help="cached domain artifacts")
    p.add_argument("--epochs", type=int, default=8, help="as benchmarks/accuracy.py --teacher-epochs")
    p.add_argument("--json", default="benchmarks/results/int8.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    report = int8_report(Path(args.workdir), args.epochs)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    sys.stdout.write(json.dumps({k: v for k, v in report.items() if k != "per_tenant"}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
