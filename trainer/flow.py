"""Flow-matching math for FLUX.1 as pure functions: latent packing and position ids."""

from __future__ import annotations

import torch
from torch import Tensor


def pack_latents(latents: Tensor) -> Tensor:
    """[B, C, 2h, 2w] -> [B, h*w, C*4]: 2x2 patches, channel index c*4 + row*2 + col, tokens row-major."""
    b, c, height, width = latents.shape
    if height % 2 or width % 2:
        raise ValueError(f"latent height and width must be even to pack 2x2 patches, got {height}x{width}")
    x = latents.reshape(b, c, height // 2, 2, width // 2, 2)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (height // 2) * (width // 2), c * 4)


def unpack_latents(packed: Tensor, height: int, width: int) -> Tensor:
    """Inverse of `pack_latents` for a latent of `height` x `width` (latent pixels, both even)."""
    b, _, channels = packed.shape
    x = packed.reshape(b, height // 2, width // 2, channels // 4, 2, 2)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, channels // 4, height, width)


def image_ids(batch: int, height: int, width: int, device=None, dtype=torch.float32) -> Tensor:
    """Position ids [B, (h/2)*(w/2), 3] = (0, row, column) of each packed token."""
    rows = torch.arange(height // 2, device=device, dtype=dtype)
    cols = torch.arange(width // 2, device=device, dtype=dtype)
    ids = torch.stack(torch.broadcast_tensors(torch.zeros((), device=device, dtype=dtype), rows[:, None], cols[None, :]), dim=-1)
    return ids.reshape(1, -1, 3).expand(batch, -1, -1)


def text_ids(batch: int, length: int, device=None, dtype=torch.float32) -> Tensor:
    return torch.zeros(batch, length, 3, device=device, dtype=dtype)
