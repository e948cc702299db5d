"""docs/dashboard.png: four panels of the Grafana dashboard (k8s/observability/adistill-dashboard.json), drawn from a
real scrape of a local run, not from made-up numbers.

A local Ray with a known metrics export port, the serving app (2 encoder replicas, auth on, a local registry of 20
tenants, a cache that holds about 12 of them), and load on 127.0.0.1 in three steps (8, 16, then 32 clients over the
tenants, Zipf-like, with a pause between requests), plus a trickle of mistakes: an unknown tenant (404) and a wrong
key (401). The node's Prometheus endpoint is scraped every `--scrape-every` seconds; the panels compute what the
dashboard's PromQL computes, over a `--window`-second window:

- requests/s by status: `sum by (status) (rate(ray_adistill_requests_total[w]))`;
- predict latency p50 / p99: `histogram_quantile(q, sum by (le) (rate(ray_adistill_request_seconds_bucket[w])))`;
- rows per forward: the mean, `sum(rate(ray_adistill_rows_total[w])) / sum(rate(ray_adistill_forward_rows_count[w]))`,
  and the p99 from `ray_adistill_forward_rows_bucket`;
- cache hit rate: hits / (hits + misses), and adapter loads/s.

    nice python benchmarks/dashboard_png.py                   # about 3 minutes; writes docs/dashboard.png
    python benchmarks/dashboard_png.py --backbone tiny --seconds 30 --out /tmp/dash.png

The scraped samples are kept beside the results (benchmarks/results/dashboard_scrape.json) so the figure can be
checked against them.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the load generator of the fault campaign (bounded, 127.0.0.1 only)

from fault_campaign import Load  # noqa: E402
from fault_scenarios import make_site  # noqa: E402
from helpers import free_port, save_tiny_encoder  # noqa: E402
from serving_helpers import tenant_files  # noqa: E402

from adistill.backbone import load_backbone  # noqa: E402
from adistill.inference.tenant_cache import module_bytes  # noqa: E402
from adistill.store.artifact import artifact_from_files  # noqa: E402
from adistill.store.registry import Registry  # noqa: E402

log = logging.getLogger("benchmarks.dashboard_png")
Samples = dict[str, float]  # "name{label=value,...}" -> value


PANEL_SERIES = (
    "ray_adistill_requests_total",
    "ray_adistill_request_seconds_bucket",
    "ray_adistill_rows_total",
    "ray_adistill_forward_rows_count",
    "ray_adistill_forward_rows_bucket",
    "ray_adistill_cache_hits_total",
    "ray_adistill_cache_misses_total",
    "ray_adistill_adapter_loads_total",
)


def scrape(url: str) -> Samples:
    """The series the panels read from one scrape of a Prometheus text page, summed over the processes (WorkerId:
    no replica restarts during the run, so no counter resets to account for)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in PANEL_SERIES:
                keep = {k: v for k, v in s.labels.items() if k in ("status", "endpoint", "le")}
                key = s.name + "{" + ",".join(f"{k}={v}" for k, v in sorted(keep.items())) + "}"
                out[key] = out.get(key, 0.0) + float(s.value)
    return out


def total(samples: Samples, name: str, **labels: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Sum of `name`'s series by their labels other than WorkerId, restricted to `labels`."""
    out: dict[tuple[tuple[str, str], ...], float] = defaultdict(float)
    for key, value in samples.items():
        base, _, rest = key.partition("{")
        if base != name:
            continue
        tags = dict(p.split("=", 1) for p in rest.rstrip("}").split(",") if p)
        if any(tags.get(k) != v for k, v in labels.items()):
            continue
        out[tuple(sorted((k, v) for k, v in tags.items() if k != "WorkerId"))] += value
    return out


def rate(a: Samples, b: Samples, seconds: float, name: str, by: str | None = None, **labels: str) -> dict[str, float]:
    """`sum by (by) (rate(name[w]))` between two scrapes (a counter that appeared in between started at 0)."""
    before, after = total(a, name, **labels), total(b, name, **labels)
    out: dict[str, float] = defaultdict(float)
    for key, value in after.items():
        group = dict(key).get(by, "") if by else ""
        out[group] += max(0.0, value - before.get(key, 0.0)) / seconds
    return dict(out)


def quantile(q: float, buckets: dict[str, float]) -> float | None:
    """Prometheus' histogram_quantile over cumulative bucket counts (linear within a bucket)."""
    bounds = sorted((math.inf if le == "+Inf" else float(le), n) for le, n in buckets.items())
    if not bounds or bounds[-1][1] <= 0:
        return None
    rank = q * bounds[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in bounds:
        if count >= rank:
            if math.isinf(upper):
                return lower
            return lower + (upper - lower) * ((rank - below) / (count - below) if count > below else 0.0)
        lower, below = upper, count
    return None


def panels(scrapes: list[tuple[float, Samples]], window: float) -> dict[str, Any]:
    """Every panel's series, one point per scrape that has one `window` seconds before it."""
    series: dict[str, Any] = defaultdict(list)
    for i, (t, now) in enumerate(scrapes):
        past = [(u, s) for u, s in scrapes[:i] if t - u >= window - 0.5]
        if not past:
            continue
        u, then = past[-1]
        w = t - u
        series["t"].append(t)
        series["status"].append(rate(then, now, w, "ray_adistill_requests_total", by="status"))
        lat = rate(then, now, w, "ray_adistill_request_seconds_bucket", by="le", endpoint="predict")
        series["p50"].append(quantile(0.5, lat))
        series["p99"].append(quantile(0.99, lat))
        rows = sum(rate(then, now, w, "ray_adistill_rows_total").values())
        forwards = sum(rate(then, now, w, "ray_adistill_forward_rows_count").values())
        series["rows_per_forward"].append(rows / forwards if forwards else None)
        series["rows_p99"].append(quantile(0.99, rate(then, now, w, "ray_adistill_forward_rows_bucket", by="le")))
        hits = sum(rate(then, now, w, "ray_adistill_cache_hits_total").values())
        misses = sum(rate(then, now, w, "ray_adistill_cache_misses_total").values())
        series["hit_rate"].append(hits / (hits + misses) if hits + misses else None)
        series["loads"].append(sum(rate(then, now, w, "ray_adistill_adapter_loads_total").values()))
    return dict(series)


def plot(series: dict[str, Any], steps: list[tuple[float, str]], title: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = series["t"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5), sharex=True)
    (a, b), (c, d) = axes
    statuses = sorted({s for point in series["status"] for s in point})
    for s in statuses:
        a.plot(t, [p.get(s, 0.0) for p in series["status"]], label=s)
    a.set_title("Requests/s by status")
    a.set_ylabel("requests/s")
    a.legend(title="status", fontsize=8)
    ms = [[None if v is None else 1000 * v for v in series[q]] for q in ("p50", "p99")]
    b.plot(t, ms[0], label="p50")
    b.plot(t, ms[1], label="p99")
    b.set_title("Predict latency (from ray_adistill_request_seconds buckets)")
    b.set_ylabel("ms")
    b.legend(fontsize=8)
    c.plot(t, series["rows_per_forward"], label="mean (rows_total / forward_rows_count)")
    c.plot(t, series["rows_p99"], label="p99 (forward_rows buckets)")
    c.set_title("Rows per encoder forward")
    c.legend(fontsize=8)
    d.plot(t, series["hit_rate"], label="cache hit rate")
    d.set_ylim(0, 1.05)
    d.set_title("Tenant cache hit rate, adapter loads/s")
    d2 = d.twinx()
    d2.plot(t, series["loads"], color="tab:red", alpha=0.6, label="adapter loads/s")
    d.legend(loc="lower left", fontsize=8)
    d2.legend(loc="lower right", fontsize=8)
    for ax in axes.flat:
        for at, _ in steps:
            ax.axvline(at, color="grey", lw=0.6, ls=":")
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel(f"seconds (dotted: {', '.join(label for _, label in steps)})")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def run(args: argparse.Namespace, scratch: Path) -> tuple[list[tuple[float, Samples]], list[tuple[float, str]], str]:
    import ray

    spec = str(save_tiny_encoder(scratch / "tiny-bert")) if args.backbone == "tiny" else None
    backbone = load_backbone(spec)
    metrics_port = free_port()
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=True,
        log_to_driver=False,
        configure_logging=False,
        _metrics_export_port=metrics_port,
    )
    try:
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        tenants = [f"t{i:02d}" for i in range(20)]
        registry = Registry(str(scratch / "registry"))
        one = module_bytes(artifact_from_files(tenant_files(backbone, "probe", 0), backbone).model)
        # a cache of about 12 of the 20 tenants per replica: misses and evictions show
        site = make_site(
            registry, backbone, spec, tenants, "dashboard", replicas=2, port=free_port(), route_prefix="/",
            cache_bytes=12 * one,
        )  # fmt: skip
        weights = [1.0 / (i + 1) for i in range(len(tenants))]  # Zipf-like: t00 most often
        zipf = [t for t, w in zip(tenants, weights) for _ in range(max(1, round(10 * w)))]
        load = Load(site.url, zipf, site.expected, clients=8, pause_s=args.pause_s, headers=site.headers, seed=1)
        ghosts = Load(site.url, ["ghost"], site.expected, clients=1, pause_s=2.0, headers=site.headers, seed=2)
        wrong_key = {"Authorization": "Bearer adk_000000000000_wrong"}
        strangers = Load(site.url, tenants, site.expected, clients=1, pause_s=3.0, headers=wrong_key, seed=3)
        step = args.seconds / 3
        scrapes: list[tuple[float, Samples]] = []
        steps: list[tuple[float, str]] = []
        t0 = time.monotonic()
        for g in (load, ghosts, strangers):
            g.max_seconds = args.seconds + 5
            g.start()
        steps.append((0.0, "8 clients"))
        plan = [(step, 8, "16 clients"), (2 * step, 16, "32 clients")]
        try:
            while (now := time.monotonic() - t0) < args.seconds + args.tail:
                if plan and now >= plan[0][0]:
                    at, more, label = plan.pop(0)
                    for i in range(more):
                        load.add_client(zipf, args.pause_s, seed=100 * int(at) + i)
                    steps.append((round(now, 1), label))
                if now >= args.seconds and len(steps) == 3:
                    for g in (load, ghosts, strangers):
                        g.stop_sending()
                    steps.append((round(now, 1), "load stops"))
                scrapes.append((round(now, 1), scrape(url)))
                time.sleep(args.scrape_every)
        finally:
            for g in (load, ghosts, strangers):
                g.stop()
        sent = len(load.snapshot()) + len(ghosts.snapshot()) + len(strangers.snapshot())
        title = (
            "adistill dashboard panels from a real scrape of a local run: "
            f"{'all-MiniLM-L6-v2' if spec is None else 'tiny encoder'}, 2 encoder replicas, 20 tenants, cache of ~12\n"
            f"{sent} requests over 127.0.0.1; the node's metrics endpoint scraped every {args.scrape_every:g} s, "
            f"rates over {args.window:g} s; a 2-core machine shared with other work"
        )
        return scrapes, steps, title
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="minilm", choices=("minilm", "tiny"))
    p.add_argument("--seconds", type=float, default=120.0, help="load time (three steps)")
    p.add_argument("--tail", type=float, default=30.0, help="scraping after the load stops (Ray exports late)")
    p.add_argument("--scrape-every", type=float, default=3.0)
    p.add_argument("--window", type=float, default=20.0, help="the rate window, seconds")
    p.add_argument("--pause-s", type=float, default=0.3, help="each client's pause between requests")
    p.add_argument("--out", default="docs/dashboard.png")
    p.add_argument("--raw", default="benchmarks/results/dashboard_scrape.json", help="the scraped samples")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    with tempfile.TemporaryDirectory(prefix="adistill-dashboard-") as scratch:
        scrapes, steps, title = run(args, Path(scratch))
    Path(args.raw).parent.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for _, samples in scrapes for k in samples})
    columns = {k: [samples.get(k) for _, samples in scrapes] for k in keys}
    raw = {"title": title, "steps": steps, "t": [t for t, _ in scrapes], "series": columns}
    Path(args.raw).write_text(json.dumps(raw) + "\n")
    plot(panels(scrapes, args.window), steps, title, Path(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
