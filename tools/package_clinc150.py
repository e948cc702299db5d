"""Build adistill/datasets/clinc150/*.parquet (one tenant per CLINC150 domain) from the upstream JSON.

Usage: python tools/package_clinc150.py ../shared/data/clinc150 adistill/datasets/clinc150

Each domain's 15 intents become one tenant: train 100/intent, validation 20/intent, test 30/intent. Every
tenant also gets out-of-scope rows (label `oos`): all 100 of CLINC's `oos_val` in validation (to calibrate
the threshold), and its own 100 of the 1000 `oos_test` in test. CLINC's 100 `oos_train` queries go, unlabelled and in
their upstream order, to `oos_train.parquet` (column `text`): the share of domain i is rows 10i..10i+9, part of the
new tenant's unlabelled queries in `benchmarks/transfer.py`.
"""

import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def main(src: Path, dst: Path) -> None:
    full = json.loads((src / "data_full.json").read_text())
    domains = json.loads((src / "domains.json").read_text())
    for i, (domain, intents) in enumerate(domains.items()):
        wanted = set(intents)
        rows: list[tuple[str, str, str]] = []
        for split, key in (("train", "train"), ("validation", "val"), ("test", "test")):
            rows += [(t, y, split) for t, y in full[key] if y in wanted]
        rows += [(t, "oos", "validation") for t, _ in full["oos_val"]]
        rows += [(t, "oos", "test") for t, _ in full["oos_test"][i * 100 : (i + 1) * 100]]
        table = pa.table({k: [r[j] for r in rows] for j, k in enumerate(("text", "label", "split"))})
        pq.write_table(table, dst / f"{domain}.parquet", compression="zstd")
    oos_train = [t for t, _ in full["oos_train"]]
    pq.write_table(pa.table({"text": oos_train}), dst / "oos_train.parquet", compression="zstd")
    (dst / "domains.json").write_text(json.dumps(list(domains), indent=1) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
