"""The metadata sd-scripts writes into a FLUX LoRA: its `ss_*` keys and the modelspec keys."""

from __future__ import annotations

import json
import time
import uuid
from datetime import datetime
from typing import Mapping

from ..config.lora import LoRAConfig, as_mapping

MODELSPEC_VERSION = "1.0.1"
FLUX_IMPLEMENTATION = "https://github.com/black-forest-labs/flux"
CHROMA_IMPLEMENTATION = "https://huggingface.co/lodestones/Chroma"
# variant -> (ss_model_type, ss_base_model_version, modelspec architecture, modelspec implementation), as
# sd-scripts' flux_train_network.py and sai_model_spec.py write them
MODEL_KEYS = {
    "dev": ("flux", "flux1", "flux-1-dev", FLUX_IMPLEMENTATION),
    "schnell": ("flux", "flux1", "flux-1-schnell", FLUX_IMPLEMENTATION),
    "chroma": ("chroma", "chroma", "chroma", CHROMA_IMPLEMENTATION),
}


def lora_metadata(config: LoRAConfig, variant: str = "dev", title: str | None = None,
                  resolution: tuple[int, int] = (1024, 1024), training: Mapping[str, object] | None = None,
                  timestamp: float | None = None) -> dict[str, str]:
    """Network and model keys, plus `training` (ss_* keys, given with or without the prefix) from the loop.

    variant: "dev" or "schnell" (the transformer's guidance embedding tells which), or "chroma"."""
    if variant not in MODEL_KEYS:
        raise ValueError(f"variant must be one of {', '.join(MODEL_KEYS)}, not {variant!r}")
    model_type, base_version, architecture, implementation = MODEL_KEYS[variant]
    timestamp = time.time() if timestamp is None else timestamp
    meta = {
        "ss_session_id": str(uuid.uuid4().int % 2**31),
        "ss_training_started_at": str(timestamp),
        "ss_network_module": "networks.lora_flux",
        "ss_network_dim": str(config.network_dim),
        "ss_network_alpha": str(float(config.network_alpha)),
        "ss_network_dropout": str(config.network_dropout),
        "ss_network_args": json.dumps(as_mapping(config)),
        "ss_base_model_version": base_version,
        "ss_model_type": model_type,
        "ss_network_train_unet_only": str(config.network_train_unet_only),
    }
    for key, value in (training or {}).items():
        meta[key if key.startswith("ss_") else f"ss_{key}"] = value if isinstance(value, str) else json.dumps(value)
    meta.update({
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": f"{architecture}/lora",
        "modelspec.implementation": implementation,
        "modelspec.title": title or f"LoRA@{timestamp}",
        "modelspec.resolution": f"{resolution[0]}x{resolution[1]}",
        "modelspec.date": datetime.fromtimestamp(int(timestamp)).isoformat(),
    })
    return meta
