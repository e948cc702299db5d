"""API keys without a service: the key store (digests only, atomic updates) and `adistill keys`."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import pytest
from helpers import run_cli

from adistill.backbone import Backbone
from adistill.errors import ConfigError, InvalidTenantId
from adistill.store.keys import KEYS_DIR, KeyNotFound, KeyStore, create_key, digest, key_id_of, new_key
from adistill.store.registry import Registry
from adistill.tenant_id import validate_tenant_id

KEY = re.compile(r"^adk_[0-9a-f]{12}_[A-Za-z0-9_-]{43}$")


def test_keys_are_32_random_bytes_with_a_public_id() -> None:
    seen = set()
    for _ in range(200):
        key_id, key = new_key()
        assert KEY.match(key) and key_id_of(key) == key_id
        seen.add(key)
    assert len(seen) == 200
    for bad in ("", "adk_", "Bearer x", "adk_0123456789ab_short", "xdk_0123456789ab_" + "a" * 43, "adk_ZZ_" + "a" * 43):
        assert key_id_of(bad) is None


def test_only_digests_are_stored(tmp_path: Path) -> None:
    store = KeyStore(str(tmp_path / "keys"))
    record, key = store.create(tenant="bank", name="bank's app")
    admin, admin_key = store.create(admin=True, name="ops")
    text = (tmp_path / "keys" / "keys.json").read_text()
    for k in (key, admin_key):
        assert k not in text and k[4:] not in text and k[-20:] not in text
        assert digest(k) in text
    doc = json.loads(text)
    assert doc["format"] == "adistill-keys" and set(doc["keys"]) == {record.key_id, admin.key_id}
    [r1, r2] = store.records()
    assert (r1.tenant, r1.admin, r1.last4, r1.sha256) == ("bank", False, key[-4:], digest(key))
    assert (r2.tenant, r2.admin, r2.scope) == (None, True, "admin")


def test_revoke_keeps_the_record_and_hides_it(tmp_path: Path) -> None:
    store = KeyStore(str(tmp_path))
    a, _ = store.create(tenant="a")
    b, _ = store.create(tenant="b")
    revoked = store.revoke(a.key_id)
    assert revoked.revoked_at is not None and not revoked.active
    assert [r.key_id for r in store.records()] == [b.key_id]
    assert {r.key_id for r in store.records(include_revoked=True)} == {a.key_id, b.key_id}
    assert store.revoke(a.key_id).revoked_at == revoked.revoked_at  # revoking twice changes nothing
    with pytest.raises(KeyNotFound, match="no key 'feedfeedfeed'"):
        store.revoke("feedfeedfeed")


def test_bad_requests_are_refused(tmp_path: Path) -> None:
    store = KeyStore(str(tmp_path))
    with pytest.raises(ConfigError, match="either for one tenant"):
        store.create()
    with pytest.raises(ConfigError, match="either for one tenant"):
        store.create(tenant="a", admin=True)
    with pytest.raises(InvalidTenantId):
        store.create(tenant="Bad Tenant")
    with pytest.raises(ConfigError, match="one line"):
        store.create(tenant="a", name="two\nlines")
    (tmp_path / "keys.json").write_text("{not json")
    with pytest.raises(Exception, match="not valid JSON"):
        store.records()


def test_concurrent_creates_lose_no_key(tmp_path: Path) -> None:
    store = KeyStore(str(tmp_path))
    made: list[str] = []

    def work(i: int) -> None:
        for j in range(5):
            made.append(store.create(tenant=f"t{i}", name=f"{i}-{j}")[0].key_id)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(made) == sorted(r.key_id for r in store.records()) and len(made) == 30


def test_the_key_store_of_a_registry_is_no_tenant(tmp_path: Path, tiny: Backbone) -> None:
    from serving_helpers import tenant_files

    registry = Registry(str(tmp_path / "reg"))
    registry.publish("bank", tenant_files(tiny, "bank", seed=1))
    key = create_key(registry.uri, tenant="bank")
    assert (tmp_path / "reg" / KEYS_DIR / "keys.json").is_file()
    assert registry.tenants() == ["bank"]
    with pytest.raises(InvalidTenantId):
        validate_tenant_id(KEYS_DIR)  # tenant ids start with a letter or digit: `_keys` can never be one
    assert KeyStore.for_registry(registry.uri).records()[0].sha256 == digest(key)


def test_keys_command_create_list_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reg = tmp_path / "reg"
    (reg / "tenants").mkdir(parents=True)
    code, out, err = run_cli(capsys, "keys", "create", "--registry", str(reg), "--tenant", "bank", "--name", "app 1")
    assert code == 0
    key = out.strip()
    assert KEY.match(key) and out.count("\n") == 1
    assert "shown once" in err and "not published yet" in err and key not in err
    code, admin_key, _ = run_cli(capsys, "keys", "create", "--registry", str(reg), "--admin")
    assert code == 0 and KEY.match(admin_key.strip())
    code, out, err = run_cli(capsys, "keys", "list", "--registry", str(reg))
    assert code == 0 and key not in out and admin_key.strip() not in out
    lines = out.splitlines()
    assert len(lines) == 2
    first = lines[0].split()
    assert first[0] == key_id_of(key) and first[1] == "bank" and "app 1" in lines[0] and first[-1] == f"...{key[-4:]}"
    assert lines[1].split()[1] == "admin" and lines[1].split()[2] == "-"
    code, out, _ = run_cli(capsys, "keys", "revoke", str(key_id_of(key)), "--registry", str(reg))
    assert code == 0 and "revoked key" in out
    code, out, _ = run_cli(capsys, "keys", "list", "--registry", str(reg))
    assert len(out.splitlines()) == 1
    code, out, _ = run_cli(capsys, "keys", "list", "--registry", str(reg), "--all", "--json")
    listed = json.loads(out)
    assert len(listed) == 2 and listed[0]["revoked_at"] and "sha256" not in listed[0]


def test_keys_command_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = [
        ("keys", "create", "--registry", str(tmp_path / "typo"), "--tenant", "bank"),  # no such registry
        ("keys", "revoke", "feedfeedfeed", "--keys", str(tmp_path / "k")),
        ("keys", "list"),  # neither --registry nor --keys
    ]
    for argv in cases:
        code, out, err = run_cli(capsys, *argv)
        assert code == 1 and out == "" and err.count("\n") == 1 and err.startswith("adistill keys: error:"), err
    assert not (tmp_path / "typo").exists(), "a typo creates nothing"
    code, out, _ = run_cli(capsys, "keys", "create", "--keys", str(tmp_path / "k"), "--tenant", "bank")
    assert code == 0 and (tmp_path / "k" / "keys.json").is_file()
