"""The faults of issue 16, one function each, sized by their arguments: tests/test_faults.py runs them short,
benchmarks/faults.py long. Each returns `(row, facts)`: the faults.json row (tests/fault_campaign.row) and what the
caller asserts on (or reports).

A `Site` is one serving app under test on the Ray this process is connected to: a registry (S3 or a local folder),
the tenants under load, an admin key (auth on, as deployed), the app's URL and the offline answers (`Expected`) of
every version published through it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fault_campaign import Expected, Load, Outcome, failures, row
from serving_helpers import tenant_files

from adistill.backbone import Backbone
from adistill.store.keys import create_key
from adistill.store.registry import Registry, RegistryError, version_dir

DEPLOYMENT = "EncoderGroup"


@dataclass
class Site:
    url: str
    app: str
    registry: Registry
    backbone: Backbone
    expected: Expected
    tenants: list[str]
    headers: dict[str, str]
    s3: Any = None  # tests/s3_servers.S3Server when the registry is on S3
    seeds: Counter[str] = field(default_factory=Counter)

    def files(self, tenant: str) -> dict[str, bytes]:
        """A new artifact of `tenant` (another seed each time)."""
        self.seeds[tenant] += 1
        return tenant_files(self.backbone, tenant, seed=1000 * self.seeds[tenant] + sum(map(ord, tenant)))

    def publish(self, tenant: str, files: dict[str, bytes] | None = None) -> int:
        """Publish (a new artifact by default); its offline answers are known before any replica can serve it."""
        files = files or self.files(tenant)
        taken = self.claimed(tenant)
        self.expected.add(tenant, range(taken + 1, taken + 4), files)
        return self.registry.publish(tenant, files)

    def claimed(self, tenant: str) -> int:
        """The highest version number taken, committed or only claimed (a failed publish's folder): the next
        publish gets a higher one. Read at the store level, below what a reader of the pointer sees."""
        folders = self.registry._store.list_dirs(f"tenants/{tenant}")
        return max((int(d[1:]) for d in folders if d.startswith("v") and d[1:].isdigit()), default=0)

    def load(self, **options: Any) -> Load:
        return Load(self.url, self.tenants, self.expected, headers=self.headers, **options)

    def delete(self) -> None:
        from ray import serve

        with contextlib.suppress(Exception):
            serve.delete(self.app)


def make_site(
    registry: Registry,
    backbone: Backbone,
    backbone_spec: str | None,
    tenants: list[str],
    app: str,
    replicas: int = 1,
    poll_interval_s: float = 5.0,
    cold: tuple[str, ...] = (),
    s3: Any = None,
    port: int = 8000,
    route_prefix: str | None = None,
    **config: Any,
) -> Site:
    """Publish `tenants` (and `cold` ones, never put under load), create an admin key, deploy the app at
    `route_prefix` (default `/<app>`) on Serve's HTTP proxy (started on 127.0.0.1:`port` unless Serve already
    runs); `config`: more ServeConfig fields."""
    from ray import serve

    from adistill.distributed.serve import build_app

    expected = Expected(backbone)
    site = Site("", app, registry, backbone, expected, list(tenants), {}, s3)
    for t in [*tenants, *cold]:
        site.publish(t)
    key = create_key(registry.uri, admin=True, name="faults", storage_options=registry.storage_options)
    site.headers = {"Authorization": f"Bearer {key}"}
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    port = serve.context._get_global_client().http_config.port  # Serve may run already
    settings = {
        "registry": registry.uri,
        "storage_options": registry.storage_options,
        "backbone": backbone_spec,
        "device": "cpu",
        "replicas": replicas,
        "ray_actor_options": {"num_cpus": 0.5},
        "poll_interval_s": poll_interval_s,
        "max_batch_size": 16,
        "quota": {"requests_per_s": None, "rows_in_flight": None},  # quotas are not under test here
        **config,
    }
    prefix = route_prefix or f"/{app}"
    serve.run(build_app(settings), name=app, route_prefix=prefix)
    site.url = f"http://127.0.0.1:{port}{prefix.rstrip('/')}"
    return site


def replica_pids(app: str) -> list[int]:
    """Process ids of the app's live encoder replicas (Ray's state API)."""
    import ray
    from ray.util.state import list_actors

    address = ray.get_runtime_context().gcs_address  # this process's Ray (others may run on the machine)
    actors = list_actors(address, filters=[("state", "=", "ALIVE")], limit=10_000, detail=True)
    return sorted(int(a.pid) for a in actors if str(a.class_name).startswith(f"ServeReplica:{app}:") and a.pid)


def running_replicas(app: str) -> int:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None or DEPLOYMENT not in status.deployments:
        return 0
    states = status.deployments[DEPLOYMENT].replica_states
    return int(sum(n for s, n in states.items() if str(getattr(s, "value", s)) == "RUNNING"))


def replica_views(site: Site, tries: int = 20) -> dict[str, Any]:
    """Cache entries and adapter bank slots of each replica that answers `GET /metrics` in `tries` calls."""
    import urllib.request

    views: dict[str, Any] = {}
    for _ in range(tries):
        request = urllib.request.Request(f"{site.url}/metrics", headers=site.headers)
        with urllib.request.urlopen(request, timeout=30) as response:
            body = json.loads(response.read())
        views[body["replica"]] = {"cache_entries": body["cache"]["entries"], "reloads": body["cache"]["reloads"],
                                  "bank": body["bank"]}  # fmt: skip
    return views


def rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def ok_per_tenant(outcomes: list[Outcome]) -> Counter[str]:
    return Counter(o.tenant for o in outcomes if o.kind == "ok")


def warm(load: Load, tenants: list[str], per_tenant: int, wait_s: float) -> None:
    """Until every tenant answered `per_tenant` times (with 2 replicas: both have loaded every tenant)."""
    load.wait_until(lambda: all(ok_per_tenant(load.snapshot())[t] >= per_tenant for t in tenants), wait_s, "warm-up")


@contextlib.contextmanager
def warm_load(site: Site, warm_per_tenant: int, wait_s: float, **load: Any) -> Iterator[Load]:
    """The steady load, started and warmed up (every tenant answered `warm_per_tenant` times); stopped on the way out
    (every request in flight ends first), so `run.stop()` after the block returns every outcome."""
    run = site.load(**load).start()
    try:
        warm(run, site.tenants, warm_per_tenant, wait_s)
        yield run
    finally:
        run.stop()


def latency(outcomes: list[Outcome], q: float) -> float | None:
    values = sorted(o.end - o.start for o in outcomes)
    return round(values[min(len(values) - 1, int(q * len(values)))], 3) if values else None


# ---------------------------------------------------------------------------------------- 1. a replica killed


def replica_killed(
    site: Site,
    kills: int = 1,
    warm_per_tenant: int = 10,
    post_s: float = 5.0,
    wait_s: float = 120.0,
    in_flight: int = 4,
    **load: Any,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """SIGKILL one encoder replica's process under load, `kills` times in turn, each at a moment when at least
    `in_flight` requests are unanswered (so some are on the victim); after each, wait until the group runs all its
    replicas again, then `post_s` more seconds of load."""
    before = replica_pids(site.app)
    assert len(before) >= 2 and running_replicas(site.app) == len(before), before
    windows: list[tuple[float, float]] = []
    with warm_load(site, warm_per_tenant, wait_s, **load) as run:
        for _ in range(kills):
            pids = replica_pids(site.app)
            victim = pids[0]
            run.wait_in_flight(in_flight, within_s=10.0)  # the kill lands on requests being answered
            t_kill = time.monotonic()
            os.kill(victim, signal.SIGKILL)

            def back(victim: int = victim) -> bool:
                now = replica_pids(site.app)
                return len(now) == len(before) and victim not in now and running_replicas(site.app) == len(before)

            windows.append((t_kill, run.wait_until(back, wait_s, f"{len(before)} replicas running again")))
            time.sleep(post_s)
    outcomes = run.stop()
    per_kill = []
    for t_kill, t_back in windows:
        failed = [o for o in failures(outcomes) if t_kill <= o.end and o.start < t_back]
        per_kill.append(
            {
                "in_flight_at_kill": sum(o.start < t_kill < o.end for o in outcomes),
                "failed": len(failed),
                "failed_sent_before_kill": sum(o.start < t_kill for o in failed),
                "failed_ending_s_after_kill": [round(o.end - t_kill, 2) for o in failed],
                "recovery_s": round(t_back - t_kill, 2),
            }
        )
    first_kill, last_back = windows[0][0], windows[-1][1]
    facts = {
        "replicas": len(before),
        "kills": per_kill,
        "failed": len(failures(outcomes)),
        "failed_outside_kill_windows": sum(
            not any(k <= o.end and o.start < b for k, b in windows) for o in failures(outcomes)
        ),
        "failed_not_in_flight_at_kill": sum(
            not any(o.start < k <= o.end for k, _ in windows) for o in failures(outcomes)
        ),
        "ok_after_recovery": sum(o.kind == "ok" and o.start >= last_back for o in outcomes),
        "failed_before_first_kill": sum(o.end < first_kill for o in failures(outcomes)),
        "p99_s": latency(outcomes, 0.99),
    }
    recovery = max(t_back - t_kill for t_kill, t_back in windows)
    return row("encoder replica SIGKILLed", outcomes, recovery, **facts), facts


# ---------------------------------------------------------------------------------------- 2. S3 unreachable


def s3_unreachable(
    site: Site,
    cold: str,
    outage_s: float = 10.0,
    warm_per_tenant: int = 10,
    post_s: float = 5.0,
    wait_s: float = 120.0,
    **load: Any,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Stop the S3 server under load while a probe asks for `cold` (published, never loaded); start it again."""
    assert site.s3 is not None
    with warm_load(site, warm_per_tenant, wait_s, **load) as run:
        t_down = time.monotonic()
        with site.s3.down():
            run.add_client([cold], pause_s=0.5, seed=99)
            time.sleep(outage_s)
            t_up = time.monotonic()

        def cold_answers() -> bool:
            return any(o.tenant == cold and o.kind == "ok" and o.start >= t_up for o in run.snapshot())

        t_cold = run.wait_until(cold_answers, wait_s, f"{cold} answered once S3 is back")
        time.sleep(post_s)
    outcomes = run.stop()
    warm_ones = [o for o in outcomes if o.tenant != cold]
    cold_ones = [o for o in outcomes if o.tenant == cold]
    during = [o for o in warm_ones if t_down <= o.start < t_up]
    cold_during = [o for o in cold_ones if o.end <= t_up]  # answered while S3 was down
    facts = {
        "outage_s": round(t_up - t_down, 2),
        "cached_sent": len(warm_ones),
        "cached_not_ok": len(failures(warm_ones)),
        "cached_during_outage": len(during),
        "cached_p99_before_s": latency([o for o in warm_ones if o.start < t_down], 0.99),
        "cached_p99_during_s": latency(during, 0.99),
        "cached_max_during_s": latency(during, 1.0),
        "cold_sent_during_outage": sum(t_down <= o.start < t_up for o in cold_ones),
        "cold_during_outage": dict(Counter(o.kind for o in cold_during)),
        "cold_statuses_during_outage": dict(Counter(str(o.status) for o in cold_during)),
        "cold_errors_name_registry": all(site.registry.uri in o.detail for o in cold_during if o.kind == "failed_5xx"),
        "cold_p50_during_s": latency(cold_during, 0.5),
        "cold_max_during_s": latency(cold_during, 1.0),
        "cold_not_ok_after_recovery": len(failures(o for o in cold_ones if o.start >= t_cold)),
        "first_cold_error": next((o.detail for o in cold_during if o.kind == "failed_5xx"), None),
    }
    return row("S3 unreachable while serving", outcomes, t_cold - t_up, **facts), facts


# ---------------------------------------------------------------------------------------- 3. S3 fails mid-publish


CUTS = {
    # name: (what the server receives when it stops, whether it stored that request first)
    "weights": ("the PUT of adapter.safetensors", False),
    "config": ("the PUT of adapter_config.json", False),
    "pointer": ("the PUT of LATEST", False),
    "pointer-stored": ("the PUT of LATEST, stored but never answered", True),
}


def _cut_predicate(cut: str, tenant: str) -> Any:
    suffix = {"weights": "/adapter.safetensors", "config": "/adapter_config.json"}.get(cut, f"/tenants/{tenant}/LATEST")
    return lambda method, path: method == "PUT" and path.endswith(suffix)


def s3_fails_mid_publish(
    site: Site,
    tenant: str,
    cuts: tuple[str, ...] = tuple(CUTS),
    down_s: float = 3.0,
    warm_per_tenant: int = 5,
    wait_s: float = 120.0,
    **load: Any,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Publish a new version of `tenant` (under load) while the S3 server stops in the middle of it, at each of
    `cuts`; start S3 again and retry the same artifact."""
    assert site.s3 is not None and site.s3.moto is not None, "the mid-upload cut needs the moto server"
    attempts = []
    with warm_load(site, warm_per_tenant, wait_s, **load) as run:
        try:
            for cut in cuts:
                files = site.files(tenant)
                before = site.registry.versions(tenant)
                claimed = site.claimed(tenant)
                site.s3.moto.cut_when(_cut_predicate(cut, tenant), after=CUTS[cut][1])
                t0 = time.monotonic()
                error = None
                try:
                    site.publish(tenant, files)
                except RegistryError as exc:
                    error = str(exc)
                t_failed = time.monotonic()
                assert site.s3.moto.cut_done.is_set(), f"the cut at {cut} did not happen"
                time.sleep(down_s)
                t_up = time.monotonic()
                site.s3.resume()
                after_cut = site.registry.versions(tenant)
                version = site.publish(tenant, files)  # the retry
                served = run.wait_until(
                    lambda v=version: any(o.tenant == tenant and o.version == v for o in run.snapshot()),
                    wait_s,
                    f"version {version} of {tenant} served",
                )
                attempts.append(
                    {
                        "cut": cut,
                        "publish_error": error,
                        "publish_failed_after_s": round(t_failed - t0, 2),
                        "versions_before": before,
                        "versions_after_cut": after_cut,
                        "cut_version": claimed + 1,
                        "retry_version": version,
                        "versions_after_retry": site.registry.versions(tenant),
                        "recovery_s": round(served - t_up, 2),
                    }
                )
        finally:
            site.s3.resume()
    outcomes = run.stop()
    served_versions = sorted({o.version for o in outcomes if o.tenant == tenant and o.version is not None})
    facts = {"attempts": attempts, "served_versions": served_versions, "not_ok": len(failures(outcomes))}
    recovery = max(a["recovery_s"] for a in attempts) if attempts else None
    return row("S3 stopped mid-publish", outcomes, recovery, **facts), facts


# ---------------------------------------------------------------------------------------- 4. onboarding worker


def onboarding_worker_killed(
    site: Site,
    manifest_path: str,
    backbone_spec: str | None,
    storage_path: str,
    epochs: int = 200,
    kill_at_epoch: int = 2,
    probe_s: float = 3.0,
    **load: Any,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Onboard the manifest's tenants (one worker, `adapter`) into the site's registry under serving load; SIGKILL
    the worker in the middle of the second tenant's training."""
    from helpers import fast_config

    from adistill.distributed.onboard import OnboardOptions, onboard_manifest
    from adistill.manifest import load_manifest

    events: list[tuple[float, str, str]] = []
    pids: dict[str, int] = {}
    killed: dict[str, Any] = {}

    def on_event(event: Any) -> None:
        events.append((time.monotonic(), event.tenant_id, event.status))
        if event.status == "reading" and event.detail.get("pid"):
            pids[event.tenant_id] = int(event.detail["pid"])
        started = [t for t, s in ((t, s) for _, t, s in events) if s == "reading"]
        epoch = event.detail.get("epoch")
        if (
            not killed
            and len(started) >= 2
            and event.tenant_id == started[1]
            and event.status == "stage1"
            and isinstance(epoch, int)
            and epoch >= kill_at_epoch
        ):
            os.kill(pids[event.tenant_id], signal.SIGKILL)
            killed.update(tenant=event.tenant_id, pid=pids[event.tenant_id], at=time.monotonic(), epoch=epoch)

    manifest = load_manifest(manifest_path)
    options = OnboardOptions(backbone=backbone_spec, storage_path=storage_path, workers=1)
    run = site.load(**load).start()
    try:
        t0 = time.monotonic()
        recipe = fast_config("adapter", epochs=epochs)
        outcomes = onboard_manifest(manifest, site.registry, recipe, None, options, on_event)
        seconds = time.monotonic() - t0
        for t in manifest.tenants:  # what onboarding published: the offline answers of its files
            site.expected.add(t.id, 1, site.registry.get_files(t.id, 1))
        run.add_client([t.id for t in manifest.tenants], pause_s=0.1, seed=7)  # the new tenants answer too
        time.sleep(probe_s)
    finally:
        served = run.stop()
    published = {t: [s for _, x, s in events if x == t].count("published") for t in pids}
    requeued = [t for _, t, s in events if s == "requeued"]
    t_done = next((at for at, t, s in events if s == "published" and t == killed.get("tenant")), None)
    facts = {
        "killed": {k: v for k, v in killed.items() if k != "at"},
        "onboarded": [(o.tenant_id, o.status, o.version) for o in outcomes],
        "published_events": published,
        "requeued": requeued,
        "versions": {t.id: site.registry.versions(t.id) for t in manifest.tenants},
        "onboard_seconds": round(seconds, 1),
        "new_tenants_ok": sum(o.kind == "ok" for o in served if o.tenant in published),
        "not_ok": len(failures(served)),
    }
    recovery = t_done - killed["at"] if t_done is not None and killed else None
    return row("onboarding worker SIGKILLed mid-tenant", served, recovery, **facts), facts


# ---------------------------------------------------------------------------------------- 5. disk full


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Any:
    """A tmpfs of `size` mounted at `path` (needs root); yields None when it cannot be mounted, with the reason."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
    )
    if done.returncode != 0:
        yield f"cannot mount a tmpfs ({(done.stderr or done.stdout).strip() or done.returncode})"
        return
    try:
        yield None
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(folder: Path, leave_bytes: int) -> Path:
    """A file that takes all but about `leave_bytes` of the filesystem's free space."""
    filler = folder / "filler"
    st = os.statvfs(folder)
    size = max(0, st.f_bavail * st.f_frsize - leave_bytes)
    with open(filler, "wb") as f:
        f.truncate(0)
        chunk = b"\0" * (1 << 20)
        while size > 0:
            n = f.write(chunk[: min(size, len(chunk))])
            size -= n
    return filler


def disk_full(
    site: Site,
    root: Path,
    tenant: str,
    full_s: float = 2.0,
    warm_per_tenant: int = 5,
    wait_s: float = 120.0,
    **load: Any,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The registry's filesystem (a small tmpfs at `root`) fills up; a publish of `tenant` fails; space is freed and
    the same artifact is published again."""
    with warm_load(site, warm_per_tenant, wait_s, **load) as run:
        files = site.files(tenant)
        before = site.registry.versions(tenant)
        filler = fill(root, leave_bytes=len(files["adapter.safetensors"]) // 2)
        error = None
        try:
            site.publish(tenant, files)
        except RegistryError as exc:
            error = str(exc)
        after_fail = site.registry.versions(tenant)
        new_dirs = [d for d in (root / "tenants" / tenant).glob("v*") if d.name not in _dirs(before)]
        leftovers = sorted(f"{d.name}/{p.name}" for d in new_dirs for p in d.iterdir())
        time.sleep(full_s)  # serving goes on with the full disk
        t_freed = time.monotonic()
        filler.unlink()
        version = site.publish(tenant, files)
        served = run.wait_until(
            lambda: any(o.tenant == tenant and o.version == version for o in run.snapshot()),
            wait_s,
            f"version {version} of {tenant} served",
        )
    outcomes = run.stop()
    facts = {
        "publish_error": error,
        "versions_before": before,
        "versions_after_failure": after_fail,
        "left_in_failed_version": leftovers,
        "retry_version": version,
        "versions_after_retry": site.registry.versions(tenant),
        "served_versions": sorted({o.version for o in outcomes if o.tenant == tenant and o.version is not None}),
        "not_ok": len(failures(outcomes)),
    }
    return row("registry disk full during a publish", outcomes, served - t_freed, **facts), facts


def _dirs(versions: list[int]) -> set[str]:
    return {version_dir(v) for v in versions}


# ---------------------------------------------------------------------------------------- 6. soak


def soak(
    site: Site,
    seconds: float,
    republish_every_s: float = 60.0,
    sample_every_s: float = 15.0,
    warmup_s: float = 300.0,
    **load: Any,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Steady load for `seconds`, a new version of one tenant (in turn) every `republish_every_s`, each replica's
    resident memory sampled every `sample_every_s`; memory is judged on the samples after `warmup_s`."""
    run = site.load(**{**load, "max_seconds": seconds + 60}).start()
    samples: list[tuple[float, int, int]] = []  # (seconds since start, pid, RSS bytes)
    published: list[tuple[float, str, int]] = []
    try:
        t0 = time.monotonic()
        next_sample, next_publish, turn = t0, t0 + republish_every_s, 0
        while (now := time.monotonic()) < t0 + seconds:
            if now >= next_sample:
                for pid in replica_pids(site.app):
                    rss = rss_bytes(pid)
                    if rss is not None:
                        samples.append((round(now - t0, 1), pid, rss))
                next_sample += sample_every_s
            if now >= next_publish:
                tenant = site.tenants[turn % len(site.tenants)]
                published.append((time.monotonic(), tenant, site.publish(tenant)))
                turn, next_publish = turn + 1, next_publish + republish_every_s
            time.sleep(0.5)
        banks = replica_views(site)
    finally:
        outcomes = run.stop()
    delays = []
    for at, tenant, version in published:
        first = min((o.end for o in outcomes if o.tenant == tenant and o.version == version), default=None)
        delays.append(None if first is None else round(first - at, 2))
    memory = {}
    for pid in sorted({p for _, p, _ in samples}):
        mine = [(t, rss) for t, p, rss in samples if p == pid]
        after = [rss for t, rss in mine if t >= warmup_s]
        memory[str(pid)] = {
            "samples": len(mine),
            "mib_at_start": round(mine[0][1] / 2**20, 1),
            "mib_after_warmup_first": round(after[0] / 2**20, 1) if after else None,
            "mib_after_warmup_min": round(min(after) / 2**20, 1) if after else None,
            "mib_after_warmup_max": round(max(after) / 2**20, 1) if after else None,
            "mib_last": round(mine[-1][1] / 2**20, 1),
            "spread_after_warmup": round(max(after) / min(after) - 1, 4) if after else None,
        }
    facts = {
        "seconds": round(seconds, 1),
        "warmup_s": warmup_s,
        "republishes": len(published),
        "republish_served_s": delays,
        "republishes_never_served": sum(d is None for d in delays),
        "memory": memory,
        "memory_flat_within_10pct": bool(memory)
        and all(m["spread_after_warmup"] is not None and m["spread_after_warmup"] <= 0.10 for m in memory.values()),
        "rss_samples": samples,
        "not_ok": len(failures(outcomes)),
        "p50_s": latency(outcomes, 0.5),
        "p99_s": latency(outcomes, 0.99),
        "requests_per_s": round(len(outcomes) / seconds, 1),
        "requests_in_last_minute": sum(o.start >= t0 + seconds - 60 for o in outcomes),
        "replicas_at_end": banks,
    }
    served = [d for d in delays if d is not None]
    return row("soak: steady load, a re-publish every minute", outcomes, max(served, default=None), **facts), facts
