"""LoRA files: read (kohya layout, or `diffusion_model.`-prefixed lora_A/lora_B), write (kohya layout with sd-scripts'
metadata and hashes, atomically), and apply to a model for inference."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor, nn

from ..atomic import save_safetensors
from ..models.safetensors_file import SafetensorsFile
from .network import LoRANetwork, LoRAWeightsError

_PEFT_PREFIXES = ("diffusion_model.", "model.diffusion_model.")


def read_lora(source: str | os.PathLike | Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors in kohya layout and the file's metadata, from a path or a state dict in either layout."""
    if isinstance(source, Mapping):
        return to_kohya(dict(source)), {}
    file = SafetensorsFile(source, "a LoRA (.safetensors with lora_down/lora_up or lora_A/lora_B tensors)")
    weights = {k: file.tensor(k) for k in file.keys}
    try:
        return to_kohya(weights), dict(file.metadata)
    except LoRAWeightsError as e:
        raise file.error(f"is not a LoRA this trainer reads ({e})") from e


def to_kohya(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """`diffusion_model.<path>.lora_A.weight` / `.lora_B.weight` / `.alpha` -> `lora_unet_<path_>.lora_down...`."""
    if not any(".lora_A." in k or ".lora_B." in k for k in weights):
        return weights
    out = {}
    for key, value in weights.items():
        prefix = next((p for p in _PEFT_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            raise LoRAWeightsError(f"'{key}': lora_A/lora_B files are read with the diffusion_model. prefix only")
        body = key[len(prefix):]
        for old, new in ((".lora_A.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_up.weight"),
                         (".alpha", ".alpha")):
            if body.endswith(old):
                path = body[: -len(old)]
                out["lora_unet_" + path.replace(".", "_") + new] = value
                break
        else:
            raise LoRAWeightsError(f"'{key}' is neither lora_A, lora_B nor alpha")
    return out


def safetensors_hashes(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """sd-scripts' `sshs_model_hash` (sha256 of the tensor bytes after the header) and `sshs_legacy_hash` (first 8
    hex of the sha256 of 64 KiB at 1 MiB), both over the file as written with only the ss_* metadata."""
    from safetensors.torch import save

    blob = save({k: v.contiguous() for k, v in tensors.items()},
                {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header = int.from_bytes(blob[:8], "little")
    return hashlib.sha256(blob[8 + header:]).hexdigest(), hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]


def save_lora(network: LoRANetwork, path: str | os.PathLike, metadata: Mapping[str, str] | None = None,
              dtype: torch.dtype | None = None) -> Path:
    """Write `network` in kohya layout (all tensors in `dtype`, default float32), with `metadata` plus the hashes,
    to a temporary file renamed into place."""
    tensors = network.kohya_state_dict(dtype or torch.float32)
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = safetensors_hashes(tensors, meta)
    return save_safetensors(tensors, path, meta)


def apply_lora(model: nn.Module, path_or_state_dict: str | os.PathLike | Mapping[str, Tensor],
               multiplier: float = 1.0, merge: bool = False) -> nn.Module:
    """Apply a LoRA to `model` (FLUX, CLIP-L or T5) at `multiplier` and return the model.

    Unmerged (default), the LoRA runs beside each layer and `remove_loras(model)` takes it off again; applying the
    same LoRA again sets its multiplier (different LoRAs stack). With `merge` its weights are added into the
    model's. Layers for other models in the file (text encoders when `model` is
    FLUX, say) are skipped; layers that address nothing in a model of this kind are an error.
    """
    weights, _ = read_lora(path_or_state_dict)
    kind = _model_kind(model)
    fingerprint = _fingerprint(weights)
    for attached in model.__dict__.get("_lora_networks", []):
        if attached.fingerprint == fingerprint:  # the same LoRA again: a new strength, not a second copy
            attached.set_multiplier(multiplier)
            return model
    network = LoRANetwork.from_weights(weights, **{kind: model})
    network.fingerprint = fingerprint
    if not network.loras:
        raise LoRAWeightsError(f"the LoRA has no layers for a {type(model).__name__} "
                               f"({len(network.skipped)} layers are for other models)")
    network.set_multiplier(multiplier)
    network.attach()
    if merge:
        network.merge()
    else:
        model.__dict__.setdefault("_lora_networks", []).append(network)
    return model


def _fingerprint(weights: dict[str, Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(weights):
        digest.update(key.encode())
        digest.update(weights[key].detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def remove_loras(model: nn.Module) -> None:
    """Take off every LoRA `apply_lora` attached to `model` (unmerged ones)."""
    for network in reversed(model.__dict__.pop("_lora_networks", [])):
        network.detach()


def _model_kind(model: nn.Module) -> str:
    from ..models.flux import Flux

    if isinstance(model, Flux):
        return "flux"
    inner = getattr(model, "model", model)
    name = type(inner).__name__
    if name.startswith("CLIPText"):
        return "clip_l"
    if name.startswith("T5"):
        return "t5"
    raise TypeError(f"apply_lora: expected a FLUX, CLIP-L or T5 model, got {type(model).__name__}")
