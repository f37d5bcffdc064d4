"""Training state for --save_state / --resume, written without pickle.

A state folder holds `network.safetensors` (the LoRA at full precision), `state.safetensors` + `state.json` (the
optimizer, scheduler, loss scaler, random generators and position, tensors and the rest kept apart) and sd-scripts'
`train_state.json`. Loading reads JSON and safetensors only, so a state folder from anywhere cannot run code.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from .atomic import save_safetensors
from .errors import StateError

FORMAT = 1


@dataclass
class Position:
    global_step: int
    epoch: int
    next_batch: int  # index of the next batch to train in `epoch`


def _encode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(value, dict):
        return {"__dict__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.dtype):
        return {"__dtype__": str(value).removeprefix("torch.")}
    raise TypeError(f"cannot store a {type(value).__name__} in the training state")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__dict__" in value:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in value["__dict__"]}
        if "__tuple__" in value:
            return tuple(_decode(v, tensors) for v in value["__tuple__"])
        if "__dtype__" in value:
            return getattr(torch, value["__dtype__"])
    return value


def save_state(folder: Path, network_tensors: dict[str, torch.Tensor], parts: dict[str, Any],
               position: Position) -> Path:
    """Write a complete state folder next to its final name, then move it into place."""
    folder = Path(folder)
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_safetensors(network_tensors, staging / "network.safetensors")
    tensors: dict[str, torch.Tensor] = {}
    document = {"format": FORMAT, "position": position.__dict__, "parts": _encode(parts, tensors)}
    save_safetensors(tensors or {"empty": torch.zeros(0)}, staging / "state.safetensors")
    (staging / "state.json").write_text(json.dumps(document))
    (staging / "train_state.json").write_text(json.dumps({"current_epoch": position.epoch,
                                                          "current_step": position.global_step}))
    if folder.exists():
        old = folder.with_name(folder.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
        os.replace(staging, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, folder)
    return folder


def check_state_folder(folder: Path) -> dict:
    """The state document of `folder` after checking the folder holds a state this trainer wrote."""
    folder = Path(folder)
    needed = [folder / n for n in ("network.safetensors", "state.safetensors", "state.json")]
    missing = [p.name for p in needed if not p.is_file()]
    if missing:
        raise StateError(f"resume: {folder} is not a state folder written by this trainer "
                         f"(missing {', '.join(missing)})")
    try:
        document = json.loads((folder / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise StateError(f"resume: {folder / 'state.json'} cannot be read ({e})") from e
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        found = document.get("format") if isinstance(document, dict) else None
        raise StateError(f"resume: {folder} has state format {found}, this trainer reads {FORMAT}")
    return document


def load_state(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], Position]:
    folder = Path(folder)
    document = check_state_folder(folder)
    tensors = load_file(folder / "state.safetensors")
    return (load_file(folder / "network.safetensors"), _decode(document["parts"], tensors),
            Position(**document["position"]))


def capture_rng() -> dict[str, Any]:
    """The global random states a resumed run must continue from (torch, Python, CUDA when present)."""
    states: dict[str, Any] = {"torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}
    if torch.cuda.is_available():
        states["cuda_rng"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng(parts: dict[str, Any]) -> None:
    torch.set_rng_state(parts["torch_rng"])
    random.setstate(parts["python_rng"])
    if "cuda_rng" in parts and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(parts["cuda_rng"])
