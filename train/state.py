"""Trainer state (optimizer moments, RNG, counters) in safetensors + JSON: resumable without pickle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from captioner import checkpoint
from captioner.checkpoint import CaptionModel
from common.atomic import atomic_write, atomic_write_text

STATE_TENSORS = "trainer.safetensors"
STATE_JSON = "trainer.json"


def save_trainer_state(directory: Path, model: CaptionModel, optimizer: torch.optim.Optimizer,
                       info: dict[str, Any]) -> None:
    checkpoint.save(model, directory)
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
    scalars: dict[str, dict[str, float]] = {}
    for index, slots in state["state"].items():
        for name, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = float(value)
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    document = {"info": info, "param_groups": state["param_groups"], "scalars": scalars}
    atomic_write(directory / STATE_TENSORS, lambda tmp: save_file(tensors, str(tmp)))
    atomic_write_text(directory / STATE_JSON, json.dumps(document))


def load_trainer_state(directory: Path, model: CaptionModel,
                       optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore weights, optimizer and RNG saved by :func:`save_trainer_state`; returns ``info``."""
    checkpoint.load_weights_into(model, directory)
    document = json.loads((directory / STATE_JSON).read_text())
    tensors = load_file(str(directory / STATE_TENSORS))
    slots: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, index, name = key.split(".", 2)
            slots.setdefault(int(index), {})[name] = value
    for index, values in document["scalars"].items():
        slots.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": slots, "param_groups": document["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return dict(document["info"])
