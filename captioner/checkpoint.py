"""Checkpoints: weights in safetensors plus a JSON document (config, vocabulary, metadata).

A checkpoint is a directory holding ``model.safetensors`` and ``model.json``. No pickle is read
or written, so loading a checkpoint from anyone cannot run code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from common.atomic import atomic_write, atomic_write_text

from .encoder import Encoder
from .model import Decoder, ModelConfig
from .vocab import Vocabulary

FORMAT = "captionbot-checkpoint"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, malformed, or does not match its own config."""


@dataclass
class CaptionModel:
    """The trained parts of a captioner: config, vocabulary, decoder, encoder and provenance."""

    config: ModelConfig
    vocab: Vocabulary
    encoder: Encoder
    decoder: Decoder
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def create(cls, config: ModelConfig, vocab: Vocabulary, meta: dict[str, Any] | None = None,
               pretrained_encoder: bool = True) -> CaptionModel:
        encoder = Encoder(config.encoder, config.encoder_weights, config.fine_tune_blocks,
                          pretrained=pretrained_encoder)
        decoder = Decoder(config, encoder.feature_dim, len(vocab))
        return cls(config, vocab, encoder, decoder, dict(meta or {}))

    @property
    def version(self) -> str:
        return str(self.meta.get("version", "unversioned"))

    def to(self, device: torch.device | str) -> CaptionModel:
        self.encoder.to(device)
        self.decoder.to(device)
        return self


def _stores_encoder(model: CaptionModel) -> bool:
    """The encoder's weights go in the checkpoint when they are not the public pretrained ones."""
    return model.config.fine_tune_blocks > 0 or not model.encoder.spec.pretrained


def resolve(path: str | Path | None) -> Path:
    """The checkpoint directory for ``path`` (a directory or one of its two files; None = default)."""
    if path is None:
        path = DEFAULT_MODEL_DIR
        if not (path / META_FILE).is_file():
            raise CheckpointError(
                "The bundled default model is missing; pass --model CHECKPOINT_DIR "
                "(train one with `python -m train fit`)."
            )
    path = Path(path)
    if path.is_file() and path.name in (WEIGHTS_FILE, META_FILE):
        path = path.parent
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path}")
    for name in (WEIGHTS_FILE, META_FILE):
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} has no {name}")
    return path


def save(model: CaptionModel, directory: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write the checkpoint atomically (a reader never sees half a checkpoint)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = _state_tensors(model, dtype)
    meta = dict(model.meta)
    meta.setdefault("created", datetime.now(UTC).isoformat(timespec="seconds"))
    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": model.config.to_json(),
        "vocab": model.vocab.to_json(),
        "meta": meta,
        "dtype": str(dtype).removeprefix("torch."),
        "stores_encoder": _stores_encoder(model),
    }
    # 0644: checkpoints are meant to be shared and packaged.
    atomic_write(directory / WEIGHTS_FILE, lambda p: save_file(tensors, str(p)), mode=0o644)
    _write_document(directory, document)
    return directory


def update_meta(path: str | Path | None, key: str, value: Any) -> Path:
    """Set ``meta[key]`` of a stored checkpoint. Only its JSON document is rewritten (atomically):
    the weights file is not touched, so recording metrics or a rule costs no model load."""
    directory = resolve(path)
    document = read_document(directory)
    document["meta"] = {**document.get("meta", {}), key: value}
    _write_document(directory, document)
    return directory


def _write_document(directory: Path, document: dict[str, Any]) -> None:
    atomic_write_text(directory / META_FILE, json.dumps(document, indent=1, ensure_ascii=False) + "\n",
                      mode=0o644)


def _state_tensors(model: CaptionModel, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    parts: dict[str, nn.Module] = {"decoder": model.decoder}
    if _stores_encoder(model):
        parts["encoder"] = model.encoder.backbone
    tensors: dict[str, torch.Tensor] = {}
    for prefix, module in parts.items():
        for name, tensor in module.state_dict().items():
            value = tensor.detach().cpu()
            if value.is_floating_point():
                value = value.to(dtype)
            tensors[f"{prefix}.{name}"] = value.contiguous()
    return tensors


def read_document(path: str | Path | None) -> dict[str, Any]:
    directory = resolve(path)
    try:
        document = json.loads((directory / META_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {directory / META_FILE}: {err}") from err
    if document.get("format") != FORMAT:
        raise CheckpointError(f"{directory / META_FILE} is not a {FORMAT} document")
    if document.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"unsupported checkpoint format version {document.get('format_version')}")
    return dict(document)


def version_of(path: str | Path | None) -> str:
    """A checkpoint's version name (as ``CaptionModel.version`` reads it), without loading its weights."""
    return str(read_document(path).get("meta", {}).get("version") or resolve(path).name)


def load(path: str | Path | None = None, device: torch.device | str = "cpu") -> CaptionModel:
    """Load a checkpoint (None = the bundled default model) in float32 on ``device``."""
    directory = resolve(path)
    document = read_document(directory)
    try:
        config = ModelConfig.from_json(document["config"])
        vocab = Vocabulary.from_json(document["vocab"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{directory / META_FILE}: invalid config or vocabulary: {err}") from err
    try:
        tensors = load_file(str(directory / WEIGHTS_FILE))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"cannot read {directory / WEIGHTS_FILE}: {err}") from err
    meta = dict(document.get("meta", {}))
    meta.setdefault("version", directory.name)
    model = CaptionModel.create(config, vocab, meta, pretrained_encoder=not document.get("stores_encoder"))
    _load_into(model.decoder, "decoder", tensors, directory)
    if document.get("stores_encoder"):
        _load_into(model.encoder.backbone, "encoder", tensors, directory)
    model.encoder.eval()
    model.decoder.eval()
    return model.to(device)


def _load_into(module: nn.Module, prefix: str, tensors: dict[str, torch.Tensor], directory: Path) -> None:
    expected = module.state_dict()
    found = {k.removeprefix(prefix + "."): v for k, v in tensors.items() if k.startswith(prefix + ".")}
    problems = []
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing:
        problems.append(f"missing tensors: {', '.join(missing[:5])}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected[:5])}")
    for name in sorted(set(expected) & set(found)):
        if tuple(expected[name].shape) != tuple(found[name].shape):
            problems.append(
                f"{prefix}.{name} has shape {tuple(found[name].shape)} in the weights file but "
                f"{tuple(expected[name].shape)} from the config and vocabulary"
            )
    if problems:
        raise CheckpointError(f"checkpoint {directory} does not match its config: " + "; ".join(problems))
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in found.items()})


def load_weights_into(model: CaptionModel, path: str | Path) -> None:
    """Load a checkpoint's weights into an existing model of the same shape (used by --resume)."""
    directory = resolve(path)
    document = read_document(directory)
    if document.get("vocab", {}).get("words") != model.vocab.words:
        raise CheckpointError(f"checkpoint {directory} has a different vocabulary than this model")
    tensors = load_file(str(directory / WEIGHTS_FILE))
    _load_into(model.decoder, "decoder", tensors, directory)
    if document.get("stores_encoder"):
        _load_into(model.encoder.backbone, "encoder", tensors, directory)
