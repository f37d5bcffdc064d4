"""--scale_weight_norms: sd-scripts' max-norm regularisation of LoRA weights, applied after each optimizer step.

For each LoRA (each part of a split one), the update it makes, scale · up @ down, has its Frobenius norm capped at
`max_norm`; a capped LoRA has both matrices multiplied by the square root of the ratio. The norm is clamped below at
max_norm / 2 before the ratio is taken, as sd-scripts does (it only matters for the reported norms).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .network import LoRANetwork


@dataclass(frozen=True)
class MaxNormResult:
    keys_scaled: int
    average_norm: float
    max_norm: float


@torch.no_grad()
def scale_weight_norms(network: LoRANetwork, max_norm: float) -> MaxNormResult:
    keys_scaled, norms = 0, []
    for lora in network.loras:
        down, up = lora.lora_down.weight, lora.lora_up.weight
        if lora.splits:
            parts = list(zip(up.split(list(lora.splits), dim=0), down.split(lora.rank, dim=0)))
        else:
            parts = [(up, down)]
        for part_up, part_down in parts:  # views: scaling them scales the LoRA's own weights
            product = (part_up.float() @ part_down.float()) * lora.scale
            norm = product.norm().clamp(min=max_norm / 2)
            ratio = norm.clamp(max=max_norm) / norm
            if ratio != 1:
                keys_scaled += 1
                root = ratio.sqrt()
                part_up.mul_(root.to(part_up.dtype))
                part_down.mul_(root.to(part_down.dtype))
            norms.append((product.norm() * ratio).item())
    return MaxNormResult(keys_scaled, sum(norms) / len(norms) if norms else 0.0, max(norms, default=0.0))
