"""Tiny Chroma transformers in the real key layout (what `Chroma.safetensors` holds, only small), for tests.

TINY_CHROMA pairs with trainer/models/tiny.py's T5 (its text width) and AE (16 latent channels, packed to 64).
ComfyUI's Chroma computes a fixed 344 modulation vectors and takes the last layer's from the end of them, which
is where Chroma's own layout puts them only at its real depth (19 double + 38 single blocks): COMFYUI_DEPTHS gives
a tiny model of that depth, for comparisons with ComfyUI.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from ..atomic import save_safetensors
from .chroma import Chroma, ChromaParams
from .tiny import LAYOUT_PREFIXES, TINY_T5, _randomize, to_fp8

TINY_CHROMA = ChromaParams(
    in_channels=64, out_channels=64, context_in_dim=TINY_T5["d_model"], hidden_size=64, mlp_hidden_dim=256,
    num_heads=2, depth=2, depth_single_blocks=2, axes_dim=(4, 14, 14), approximator_in_dim=64,
    approximator_hidden_dim=96, approximator_layers=2,
)
COMFYUI_DEPTHS = dict(depth=19, depth_single_blocks=38)  # 3 * 38 + 12 * 19 + 2 = 344 vectors, ComfyUI's count
TINY_CHROMA_COMFYUI = replace(TINY_CHROMA, **COMFYUI_DEPTHS)


def chroma_state_dict(params: ChromaParams = TINY_CHROMA, seed: int = 0) -> dict[str, Tensor]:
    with torch.device("meta"):
        model = Chroma(params)
    return _randomize(model, seed)


def write_chroma(path: str | os.PathLike, params: ChromaParams = TINY_CHROMA, layout: str = "bfl", seed: int = 0,
                 dtype: torch.dtype = torch.float32, fp8: torch.dtype | None = None, scaled: bool = False,
                 metadata: dict[str, str] | None = None) -> Path:
    """layout: bfl (bare keys, as `Chroma.safetensors`) | comfy (under `model.diffusion_model.`)."""
    if layout not in LAYOUT_PREFIXES:
        raise ValueError(f"layout must be one of {', '.join(LAYOUT_PREFIXES)}; got {layout!r}")
    state = {k: v.to(dtype) for k, v in chroma_state_dict(params, seed).items()}
    if fp8 is not None:
        state = to_fp8(state, fp8, scaled)
    state = {LAYOUT_PREFIXES[layout] + k: v for k, v in state.items()}
    return save_safetensors(state, path, metadata=metadata)
