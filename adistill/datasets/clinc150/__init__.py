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
