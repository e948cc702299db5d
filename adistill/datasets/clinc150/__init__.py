"""CLINC150 (CC BY 3.0, see SOURCE.md and LICENSE here) as ten tenants, one per domain."""

import json
from pathlib import Path

HERE = Path(__file__).parent


def domains() -> list[str]:
    """The ten domain names, in CLINC's order."""
    return list(json.loads((HERE / "domains.json").read_text()))


def tenant_path(domain: str) -> str:
    """Path of the packaged Parquet file of one domain (columns text, label, split)."""
    if domain not in domains():
        raise KeyError(f"unknown CLINC150 domain {domain!r}; expected one of {domains()}")
    return str(HERE / f"{domain}.parquet")


def oos_train(domain: str) -> list[str]:
    """This domain's share (10) of CLINC's 100 out-of-scope training queries, without labels (`oos_train.parquet`)."""
    import pyarrow.parquet as pq

    tenant_path(domain)  # an unknown domain is a KeyError naming the known ones
    index = domains().index(domain)
    texts = pq.read_table(HERE / "oos_train.parquet").column("text").to_pylist()
    share = len(texts) // len(domains())
    return [str(t) for t in texts[index * share : (index + 1) * share]]
