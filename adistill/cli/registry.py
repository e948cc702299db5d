"""`adistill registry ls | show | publish | rm`: what a registry holds, and changing it by hand."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from adistill.cli.common import add_storage_args, existing_registry, registry_from_args
from adistill.errors import AdistillError, ConfigError
from adistill.reports import rounded


def cmd_registry_ls(args: argparse.Namespace) -> int:
    from adistill.reports import registry_record, registry_table

    registry = existing_registry(args)
    records: list[dict[str, Any]] = []
    for tenant_id in registry.tenants():
        try:
            records.append(registry_record(tenant_id, registry.meta(tenant_id)))
        except AdistillError as exc:
            records.append({"tenant_id": tenant_id, "error": str(exc)})
    failed = sum("error" in r for r in records)
    if args.json:
        sys.stdout.write(json.dumps(rounded(records), indent=2) + "\n")
    elif records:
        sys.stdout.write(registry_table(records) + "\n")
    else:
        sys.stdout.write(f"no tenants in {registry.uri}\n")
    if failed:
        sys.stderr.write(f"adistill registry ls: {failed} tenant(s) unreadable\n")
    return 1 if failed else 0


def cmd_registry_show(args: argparse.Namespace) -> int:
    registry = existing_registry(args)
    meta = registry.meta(args.tenant, args.version)
    if args.json:
        sys.stdout.write(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return 0
    lines = describe_version(meta, registry.versions(args.tenant), registry.uri)
    width = max(len(k) for k, _ in lines)
    sys.stdout.write("\n".join(f"{k + ':':<{width + 1}} {v}" for k, v in lines) + "\n")
    return 0


def describe_version(meta: dict[str, Any], versions: list[int], uri: str) -> list[tuple[str, Any]]:
    """The (field, text) lines of `registry show` for one version's metadata."""
    metrics = meta.get("metrics") or {}
    scores = []
    for split in ("test", "validation"):
        m = metrics.get(split) or {}
        if "accuracy" in m:
            scores.append(f"{split} accuracy {m['accuracy']:.4f} ({int(m.get('examples', 0))} examples)")
        if "oos_recall" in m:
            scores.append(f"{split} oos recall {m['oos_recall']:.4f}")
    if metrics.get("seconds"):
        scores.append("seconds " + ", ".join(f"{k} {v}" for k, v in metrics["seconds"].items()))
    teachers = ", ".join(f"{t['tenant_id']} v{t.get('version')}" for t in meta.get("teachers") or []) or "-"
    adapter, backbone, params = meta.get("adapter") or {}, meta["backbone"], meta.get("parameters") or {}
    data, files, labels = meta.get("data") or {}, meta.get("files") or {}, list(meta.get("labels") or [])
    lines: list[tuple[str, Any]] = [
        ("tenant", meta["tenant_id"]),
        ("version", f"{meta['version']} (versions: {', '.join(map(str, versions))}; latest {max(versions)})"),
        ("uri", f"{uri}/tenants/{meta['tenant_id']}/v{meta['version']:06d}"),
        ("method", meta.get("method")),
        ("created_at", meta.get("created_at")),
        (
            "backbone",
            f"{backbone['name']} (fingerprint {backbone['fingerprint'][:12]}, {backbone['parameters']} params)",
        ),
        (
            "adapter",
            f"{adapter.get('kind')}, reduction factor {adapter.get('reduction_factor')}, "
            f"bottleneck {adapter.get('bottleneck')}",
        ),
        ("labels", f"{len(labels)}: {', '.join(labels[:8])}{' ...' if len(labels) > 8 else ''}"),
        (
            "parameters",
            f"{params.get('added')} added ({params.get('percent_of_backbone')}% of the backbone), "
            f"{params.get('stored')} stored",
        ),
        ("metrics", "; ".join(scores) or "-"),
        ("oos", _out_of_scope(meta)),
        ("teachers", teachers),
        (
            "data",
            f"{data.get('source')} (fingerprint {str(data.get('fingerprint'))[:12]}, "
            f"{data.get('train_examples')} train examples, shots {data.get('shots') or '-'})",
        ),
        (
            "size",
            f"{sum(f['bytes'] for f in files.values())} bytes of weights + "
            f"{len(json.dumps(meta, indent=2, sort_keys=True)) + 1} bytes of metadata",
        ),
    ]
    lines += [("file", f"{name}  {f['bytes']} bytes  sha256 {f['sha256'][:16]}") for name, f in sorted(files.items())]
    return lines


def _out_of_scope(meta: dict[str, Any]) -> str:
    """`registry show`'s out-of-scope line: the threshold, or why detection is off."""
    threshold = meta.get("oos_threshold")
    if threshold is not None:
        return f"on, threshold {threshold:.4f} (calibrated on the validation data's 'oos' rows)"
    reason = (meta.get("out_of_scope") or {}).get("reason") or "no threshold was calibrated"
    return f"off: {reason}"


def cmd_registry_publish(args: argparse.Namespace) -> int:
    from adistill.store.artifact import parse_meta, read_dir
    from adistill.store.names import CONFIG

    files = read_dir(args.artifact)
    built_for = parse_meta(files.get(CONFIG, b""), args.artifact)["tenant_id"]
    if args.tenant is not None and args.tenant != built_for:
        raise ConfigError(
            f"{args.artifact} was trained for tenant {built_for!r}, not {args.tenant!r}: --tenant only confirms the id "
            f"(an artifact keeps the id it was trained with); train it again with --tenant {args.tenant} to publish "
            "it under that id"
        )
    tenant_id = built_for
    registry = registry_from_args(args)
    version = registry.publish(tenant_id, files)
    sys.stdout.write(f"published {tenant_id} version {version} to {registry.uri}\n")
    return 0


def cmd_registry_rm(args: argparse.Namespace) -> int:
    registry = existing_registry(args)
    try:
        versions = registry.versions(args.tenant)
    except AdistillError:  # a corrupt tenant can still be removed as a whole
        if args.version is not None:
            raise
        versions = []
    registry.delete(args.tenant, args.version)
    if args.version is None:
        sys.stdout.write(
            f"deleted tenant {args.tenant} (versions: {', '.join(map(str, versions)) or 'none'}) from {registry.uri}\n"
        )
    else:
        latest = registry.latest_version(args.tenant)
        after = f"latest is now {latest}" if latest is not None else "no versions left: tenant removed"
        sys.stdout.write(f"deleted {args.tenant} version {args.version} from {registry.uri}; {after}\n")
    return 0


def add_parser(sub: Any) -> None:
    """`registry` and its subcommands on the `adistill` subparsers."""
    p = sub.add_parser("registry", help="list, show, publish or delete published tenants")
    registry_sub = p.add_subparsers(dest="registry_command", required=True)

    def registry_common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--registry", required=True, help="registry URI: folder, file://, s3://bucket/prefix")
        add_storage_args(q, backbone=False)

    q = registry_sub.add_parser("ls", help="every tenant: latest version, method, accuracy, backbone")
    q.add_argument("--json", action="store_true", help="JSON instead of a table")
    registry_common(q)
    q.set_defaults(func=cmd_registry_ls)
    q = registry_sub.add_parser("show", help="a version's metadata: method, metrics, teachers, sizes, files")
    q.add_argument("tenant", help="tenant id")
    q.add_argument("--version", type=int, default=None, help="default: the latest")
    q.add_argument("--json", action="store_true", help="the whole adapter_config.json")
    registry_common(q)
    q.set_defaults(func=cmd_registry_show)
    q = registry_sub.add_parser(
        "publish", help="publish an artifact folder as the next version of the tenant it was trained for"
    )
    q.add_argument("artifact", help="artifact folder (adistill train --out)")
    q.add_argument(
        "--tenant",
        default=None,
        help="check that the artifact was trained for this tenant id (an artifact is never renamed; "
        "default: the id it records)",
    )
    registry_common(q)
    q.set_defaults(func=cmd_registry_publish)
    q = registry_sub.add_parser("rm", help="delete a tenant, or one version of it")
    q.add_argument("tenant", help="tenant id")
    q.add_argument("--version", type=int, default=None, help="only this version (the latest moves back)")
    registry_common(q)
    q.set_defaults(func=cmd_registry_rm)
