"""`adistill keys create | list | revoke`: the service's API keys (digests in `<registry>/_keys`, or `--keys URI`)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from adistill.cli.common import add_storage_args, existing_registry, storage_options
from adistill.errors import ConfigError


def key_store(args: argparse.Namespace) -> Any:
    """The key store of `--keys`, else of `--registry` (which must exist: a typo is not a new key store)."""
    from adistill.store.keys import KeyStore

    if args.keys is None:
        if args.registry is None:
            raise ConfigError("pass --registry URI (keys kept in <registry>/_keys) or --keys URI")
        existing_registry(args)
    return KeyStore.for_registry(args.registry, storage_options(args), args.keys)


def cmd_keys_create(args: argparse.Namespace) -> int:
    store = key_store(args)
    record, key = store.create(tenant=args.tenant, admin=args.admin, name=args.name or "")
    if args.tenant is not None and args.registry is not None and args.keys is None:
        from adistill.cli.common import registry_from_args

        if registry_from_args(args).latest_version(args.tenant) is None:
            sys.stderr.write(f"adistill keys create: note: tenant {args.tenant!r} is not published yet\n")
    sys.stdout.write(key + "\n")
    sys.stderr.write(
        f"adistill keys create: key {record.key_id} for {record.scope}"
        f"{f' ({record.name})' if record.name else ''} in {store.uri}; it is shown once: store it now, "
        "send it as 'Authorization: Bearer <key>'\n"
    )
    return 0


def key_lines(records: list[Any]) -> list[str]:
    """One line per key: id, tenant (or admin), name, created, last four characters[, revoked when]."""
    rows = [
        [r.key_id, r.scope, r.name or "-", r.created_at, f"...{r.last4}"]
        + ([f"revoked {r.revoked_at}"] if r.revoked_at else [])
        for r in records
    ]
    widths = [max((len(row[i]) for row in rows if i < len(row)), default=0) for i in range(6)]
    return ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows]


def cmd_keys_list(args: argparse.Namespace) -> int:
    store = key_store(args)
    records = store.records(include_revoked=args.all)
    if args.json:
        fields = ("key_id", "tenant", "admin", "name", "created_at", "last4", "revoked_at")
        out = [{f: getattr(r, f) for f in fields} for r in records]
        sys.stdout.write(json.dumps(out, indent=2) + "\n")
    elif records:
        sys.stdout.write("\n".join(key_lines(records)) + "\n")
    else:
        sys.stderr.write(f"adistill keys list: no {'' if args.all else 'active '}keys in {store.uri}\n")
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    store = key_store(args)
    record = store.revoke(args.key_id)
    sys.stdout.write(
        f"revoked key {record.key_id} ({record.scope}) at {record.revoked_at}; the service refuses it within its "
        "registry poll interval\n"
    )
    return 0


def add_parser(sub: Any) -> None:
    """`keys` and its subcommands on the `adistill` subparsers."""
    p = sub.add_parser("keys", help="create, list or revoke the API keys of the service (adistill serve)")
    keys_sub = p.add_subparsers(dest="keys_command", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--registry", default=None, help="registry URI: keys are kept in <registry>/_keys")
        q.add_argument("--keys", default=None, metavar="URI", help="a key store elsewhere (the service's `keys`)")
        add_storage_args(q, backbone=False)

    q = keys_sub.add_parser("create", help="a new key for one tenant (or --admin); printed once, on stdout")
    who = q.add_mutually_exclusive_group(required=True)
    who.add_argument("--tenant", default=None, help="the tenant this key may call")
    who.add_argument("--admin", action="store_true", help="a key for every tenant and the admin routes")
    q.add_argument("--name", default=None, help="a label for people (who holds the key), shown by `keys list`")
    common(q)
    q.set_defaults(func=cmd_keys_create)
    q = keys_sub.add_parser("list", help="one line per key: id, tenant or admin, name, created, last 4 characters")
    q.add_argument("--all", action="store_true", help="revoked keys too")
    q.add_argument("--json", action="store_true", help="JSON instead of lines")
    common(q)
    q.set_defaults(func=cmd_keys_list)
    q = keys_sub.add_parser("revoke", help="revoke a key by its id (the service refuses it within its poll interval)")
    q.add_argument("key_id", help="the key's id (first column of `keys list`)")
    common(q)
    q.set_defaults(func=cmd_keys_revoke)
