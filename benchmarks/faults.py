"""Fault campaign (issue 16): each fault under steady load from 16 clients over 10 tenants, every answer checked.

The faults (tests/fault_scenarios.py; tests/test_faults.py runs 1-5 short inside `make test`):
1. an encoder replica SIGKILLed (2 replicas);
2. the S3 registry unreachable while serving (its server stopped, then started again on the same port);
3. S3 stopped in the middle of a publish, at each cut point (the weights, the config, the pointer; and the pointer
   written but its answer lost), then the same artifact published again;
4. an onboarding worker SIGKILLed mid-tenant (Ray Train, one worker, three new tenants) while serving goes on;
5. the registry's disk full during a publish (a local registry on a small tmpfs: needs root, else skipped);
6. a soak: `--soak-minutes` of steady load with a new version of one tenant every minute; each replica's resident
   memory sampled.

Every load generator sends to 127.0.0.1 only, is bounded in time (each request by its timeout, each run by its
length) and stops by itself. A request ends `ok` (a 200 equal to the offline engine's answer for the version that
answered), `failed_5xx` (a JSON 5xx), `wrong` (another answer) or `lost` (no response, a timeout, a non-JSON error).

    nice python benchmarks/faults.py --faults 1 2 3 4 5              # about 10 minutes on 2 cores
    nice python benchmarks/faults.py --faults 6 --soak-minutes 30    # the soak
    python benchmarks/faults.py --backbone tiny --faults 1 2 --quick # a smoke run

Writes benchmarks/results/faults.json (one row per fault: fault, sent, ok, failed_5xx, wrong, lost, recovery_s),
faults_details.json (what each run measured besides), faults.md and, after a soak, faults_soak.png (each replica's
resident memory); a run of some faults replaces their rows and keeps the others (`--report-only` rewrites the .md
and .png from faults_details.json).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the campaign's code and the S3 servers are shared with the tests

from fault_scenarios import (  # noqa: E402
    Site,
    disk_full,
    make_site,
    onboarding_worker_killed,
    replica_killed,
    s3_fails_mid_publish,
    s3_unreachable,
    small_tmpfs,
    soak,
)
from helpers import free_port, save_tiny_encoder, write_tenant  # noqa: E402
from s3_servers import start_moto  # noqa: E402

from adistill.backbone import load_backbone  # noqa: E402
from adistill.store.registry import Registry  # noqa: E402

log = logging.getLogger("benchmarks.faults")
FRONTS = {"ray": "Serve's Python proxy", "haproxy": "HAProxy front"}
ROW_KEYS = ("fault", "sent", "ok", "failed_5xx", "wrong", "lost", "recovery_s")
TENANTS = [f"t{i:02d}" for i in range(10)]
NAMES = {
    "1": "encoder replica SIGKILLed",
    "2": "S3 unreachable while serving",
    "3": "S3 stopped mid-publish",
    "4": "onboarding worker SIGKILLed mid-tenant",
    "5": "registry disk full during a publish",
    "6": "soak: steady load, a re-publish every minute",
}


def run_faults(args: argparse.Namespace, scratch: Path) -> list[dict[str, Any]]:
    import ray

    spec = str(save_tiny_encoder(scratch / "tiny-bert")) if args.backbone == "tiny" else None
    backbone = load_backbone(spec)
    quick = args.quick
    load = {"clients": args.clients, "pause_s": args.pause_s, "timeout_s": 30.0, "max_seconds": 600.0}
    if args.http_proxy == "haproxy":  # before the local Ray starts: every process it starts reads them
        from adistill.cli.serve import HAPROXY_ENV

        os.environ.update(HAPROXY_ENV)
    ray.init(address="local", num_cpus=8, include_dashboard=True, log_to_driver=False, configure_logging=False)
    moto = start_moto()
    port = free_port()
    rows: list[dict[str, Any]] = []
    site: Site | None = None
    settings = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "backbone": "all-MiniLM-L6-v2" if spec is None else "tiny (2 layers, hidden 48)",
        "quick": quick,
        "poll_interval_s": args.poll_s,
        "http_proxy": args.http_proxy,
        **{k: v for k, v in load.items() if k != "max_seconds"},
    }

    def attempt(number: str, run: Any) -> None:
        log.warning("fault %s: %s", number, NAMES[number])
        start = time.monotonic()
        try:
            result, _ = run()
        except Exception as exc:  # one fault's failure is reported, the others still run
            log.exception("fault %s failed", number)
            result = {"fault": NAMES[number], "error": f"{type(exc).__name__}: {exc}"}
        result["fault_number"] = int(number)
        if args.http_proxy != "ray":  # a row per front: `merge` keeps the other front's row of the same fault
            result["fault"] = f"{result['fault']} ({FRONTS[args.http_proxy]})"
        result["run_seconds"] = round(time.monotonic() - start, 1)
        result["settings"] = settings
        rows.append(result)
        log.warning("fault %s: %s", number, {k: result.get(k) for k in (*ROW_KEYS, "error")})

    try:
        s3_faults = {"1", "2", "3", "4", "6"} & set(args.faults)
        if s3_faults:
            bucket = moto.new_bucket()
            registry = Registry(bucket.uri("registry"), bucket.storage_options)
            site = make_site(
                registry, backbone, spec, TENANTS, "faults", replicas=2, poll_interval_s=args.poll_s, cold=("cold",),
                s3=moto, port=port,
            )  # fmt: skip
        if "1" in args.faults:
            assert site is not None
            attempt("1", lambda: replica_killed(site, kills=1 if quick else 3, post_s=5 if quick else 20, **load))
        if "2" in args.faults:
            assert site is not None
            outage = 10.0 if quick else 60.0
            attempt("2", lambda: s3_unreachable(site, "cold", outage_s=outage, post_s=5 if quick else 15, **load))
        if "3" in args.faults:
            assert site is not None
            cuts = ("weights", "pointer") if quick else ("weights", "config", "pointer", "pointer-stored")
            attempt("3", lambda: s3_fails_mid_publish(site, "t03", cuts=cuts, down_s=3 if quick else 10, **load))
        if "4" in args.faults:
            assert site is not None
            attempt("4", lambda: onboard(site, spec, scratch, args.backbone == "tiny", load))
        if "6" in args.faults:
            assert site is not None
            seconds = 60.0 * args.soak_minutes
            warmup = min(300.0, seconds / 6)
            attempt("6", lambda: soak(site, seconds, warmup_s=warmup, **load))
        if site is not None:
            site.delete()
        if "5" in args.faults:
            attempt("5", lambda: full_disk(backbone, spec, scratch, port, args.poll_s, load))
    finally:
        from adistill.distributed.serve import _haproxy_configs, _stop_haproxy

        haproxy = _haproxy_configs()
        moto.stop()
        ray.shutdown()
        _stop_haproxy(haproxy)
    return rows


def onboard(site: Site, spec: str | None, scratch: Path, tiny: bool, load: dict[str, Any]) -> Any:
    import yaml

    labels = {"bank": ["pay_bill", "balance", "weather"], "travel": ["flight", "hotel", "weather"]}
    labels["home"] = ["music", "alarm", "recipe", "weather"]
    tenants = [{"id": f"new-{n}", "data": str(write_tenant(scratch / f"{n}.parquet", ls, seed=i))}
               for i, (n, ls) in enumerate(labels.items())]  # fmt: skip
    path = scratch / "manifest.yaml"
    path.write_text(yaml.safe_dump({"tenants": tenants}))
    epochs, kill_at = (100, 1) if tiny else (30, 2)
    runs = str(scratch / "runs")
    return onboarding_worker_killed(site, str(path), spec, runs, epochs=epochs, kill_at_epoch=kill_at, **load)


def full_disk(backbone: Any, spec: str | None, scratch: Path, port: int, poll_s: float, load: dict[str, Any]) -> Any:
    root = scratch / "registry-fs"
    with small_tmpfs(root, "64m") as refused:
        if refused:
            raise RuntimeError(f"skipped: {refused}")
        site = make_site(Registry(str(root)), backbone, spec, TENANTS, "faults-disk", poll_interval_s=poll_s, port=port)
        try:
            return disk_full(site, root, "t05", full_s=10.0, **load)
        finally:
            site.delete()


# ------------------------------------------------------------------------------------------------ the report


def merge(path: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """This run's rows in place of the same faults' earlier rows (a details file keeps the whole of each)."""
    details_path = path.with_name(path.stem + "_details.json")
    old = json.loads(details_path.read_text()) if details_path.exists() else []
    keys = {_key(r) for r in rows}
    merged = sorted([r for r in old if _key(r) not in keys] + rows, key=_key)
    details_path.write_text(json.dumps(merged, indent=1, default=str) + "\n")
    table = [
        {k: r.get(k) for k in ROW_KEYS} if "error" not in r else {"fault": r["fault"], "error": r["error"]}
        for r in merged
    ]
    path.write_text(json.dumps(table, indent=2) + "\n")
    return merged


def _key(row: dict[str, Any]) -> tuple[int, int]:
    """A row is a fault under one HTTP front."""
    front = (row.get("settings") or {}).get("http_proxy", "ray")
    return row["fault_number"], list(FRONTS).index(front)


def markdown(rows: list[dict[str, Any]], setup: str) -> str:
    lines = [
        "# Fault campaign: each fault under steady load from 16 clients over 10 tenants",
        "",
        setup,
        "",
        "| # | fault | sent | ok | failed 5xx (JSON) | wrong | lost | recovery s | wrong = lost = 0 |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['fault_number']} | {r['fault']} | | | | | | | no result: {r['error']} |")
            continue
        met = "yes" if r["wrong"] == 0 and r["lost"] == 0 else "**no**"
        lines.append(
            f"| {r['fault_number']} | {r['fault']} | {r['sent']} | {r['ok']} | {r['failed_5xx']} | {r['wrong']} | "
            f"{r['lost']} | {r['recovery_s']} | {met} |"
        )
    lines += ["", "What each run measured besides (faults_details.json has all of it):", ""]
    skip = {*ROW_KEYS, "fault_number", "rss_samples", "samples", "statuses", "error", "settings", "run_seconds"}
    for r in rows:
        if "statuses" not in r:  # failed before measuring anything
            continue
        lines.append(f"- **{r['fault_number']}. {r['fault']}** ({r['run_seconds']} s): statuses {r['statuses']}")
        lines.append(f"  - settings: {json.dumps(r.get('settings'))}")
        for kind, details in r.get("samples", {}).items():
            lines.append(f"  - {kind}, e.g.: {'; '.join(f'`{d}`' for d in details)}")
        for key, value in r.items():
            if key not in skip:
                lines.append(f"  - {key}: {json.dumps(value, default=str)}")
    return "\n".join(lines) + "\n"


def soak_png(rows: list[dict[str, Any]], out: Path) -> bool:
    """Each replica's resident memory over the soak (the samples in faults_details.json)."""
    soak_row = next((r for r in rows if r.get("fault_number") == 6 and r.get("rss_samples") and "error" not in r), None)
    if soak_row is None:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for pid in sorted({p for _, p, _ in soak_row["rss_samples"]}):
        mine = [(t / 60, rss / 2**20) for t, p, rss in soak_row["rss_samples"] if p == pid]
        ax.plot([t for t, _ in mine], [m for _, m in mine], label=f"replica pid {pid}")
    ax.axvline(soak_row["warmup_s"] / 60, color="grey", ls=":", label="end of warm-up")
    ax.set_xlabel("minutes")
    ax.set_ylabel("resident memory (MiB)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"Soak: {soak_row['sent']} requests, {soak_row['republishes']} re-publishes", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--faults", nargs="+", default=["1", "2", "3", "4", "5"], choices=sorted(NAMES))
    p.add_argument("--soak-minutes", type=float, default=30.0, help="fault 6's length")
    p.add_argument("--backbone", default="minilm", choices=("minilm", "tiny"))
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--pause-s", type=float, default=0.5, help="each client's pause between requests")
    p.add_argument("--poll-s", type=float, default=5.0, help="the app's poll_interval_s (the default)")
    p.add_argument("--quick", action="store_true", help="shorter outages and waits (a smoke run)")
    p.add_argument("--http-proxy", default="ray", choices=("ray", "haproxy"), help="Serve's HTTP front (as serve)")
    p.add_argument("--json", default="benchmarks/results/faults.json", help="JSON out; .md and _details.json beside it")
    p.add_argument("--report-only", action="store_true", help="rewrite .md and .png from _details.json only")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("adistill").setLevel(logging.ERROR)  # the faults' own warnings would drown the report lines
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        merged = merge(path, [])
        started = "(report rewritten from faults_details.json)"
    else:
        with tempfile.TemporaryDirectory(prefix="adistill-faults-") as scratch:
            rows = run_faults(args, Path(scratch))
        merged = merge(path, rows)
    ran = "" if args.report_only else f" (faults {', '.join(args.faults)}, front {args.http_proxy})"
    setup = (
        "Every fault: the serving app on a local Ray (its HTTP front in each row's settings: `ray`, Serve's Python "
        "proxy, or `haproxy`, its high-throughput mode as `adistill serve --http-proxy haproxy` and k8s run it) with 2 "
        "encoder replicas (1 for fault 5), auth on, quotas off, "
        "its registry on moto S3 over HTTP on 127.0.0.1 (fault 5: a local folder on a tmpfs); 16 clients over 10 "
        "tenants, each sending one request (one text) at a time with a pause between; every 200 compared with the "
        f"offline engine. Each row's settings are listed below. Last run {started}{ran} "
        f"on {platform.machine()} with {os.cpu_count()} cores, shared with other work."
    )
    path.with_suffix(".md").write_text(markdown(merged, setup))
    soak_png(merged, path.with_name(path.stem + "_soak.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
