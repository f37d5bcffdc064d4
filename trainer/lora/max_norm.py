"""--scale_weight_norms: sd-scripts' max-norm regularisation of LoRA weights, applied after each optimizer step.

For each LoRA (each part of a split one), the update it makes, scale · up @ down, has its Frobenius norm capped at
`max_norm`; a capped LoRA has both matrices multiplied by the square root of the ratio. The norm is clamped below at
max_norm / 2 before the ratio is taken, as sd-scripts does (it only matters for the reported norms).

The cap runs on the device without reading anything back (multi-tensor norms and multiplies; an uncapped part is
multiplied by exactly 1, which leaves it bit for bit as it was): the figures come back with the step's one read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .network import LoRANetwork


@dataclass(frozen=True)
class MaxNormResult:
    keys_scaled: int
    average_norm: float
    max_norm: float

    @classmethod
    def from_values(cls, values: list[float]) -> "MaxNormResult":
        """From `CappedNorms.values()` read back: [keys scaled, norm of each part ...]."""
        norms = values[1:]
        return cls(int(values[0]), sum(norms) / len(norms) if norms else 0.0, max(norms, default=0.0))


@dataclass(frozen=True)
class CappedNorms:
    """The cap's figures, still on the device: 1 per capped part, and each part's norm after the cap."""
    scaled: Tensor
    norms: Tensor

    def values(self) -> Tensor:
        """One float64 vector [keys scaled, norms ...], to read back with the step's other figures."""
        return torch.cat([self.scaled.sum().double().reshape(1), self.norms.double()])


def _parts(network: LoRANetwork) -> list[tuple[Tensor, Tensor, float]]:
    """(up, down, scale) of every LoRA part; views of a split LoRA's matrices, so scaling them scales the LoRA."""
    parts = []
    for lora in network.loras:
        down, up = lora.lora_down.weight, lora.lora_up.weight
        if lora.splits:
            pairs = zip(up.split(list(lora.splits), dim=0), down.split(lora.rank, dim=0))
        else:
            pairs = [(up, down)]
        parts += [(part_up, part_down, lora.scale) for part_up, part_down in pairs]
    return parts


@torch.no_grad()
def cap_weight_norms(network: LoRANetwork, max_norm: float) -> CappedNorms | None:
    """Apply the cap on the device; None when the network has no LoRA."""
    parts = _parts(network)
    if not parts:
        return None
    products = [(up.float() @ down.float()) * scale for up, down, scale in parts]
    device = products[0].device
    norms = torch.stack([n.to(device) for n in torch._foreach_norm(products)])
    clamped = norms.clamp(min=max_norm / 2)
    ratios = clamped.clamp(max=max_norm) / clamped
    roots = ratios.sqrt().unbind()
    ups = [up for up, _, _ in parts]
    downs = [down for _, down, _ in parts]
    torch._foreach_mul_(ups, [r.to(t.device, t.dtype) for r, t in zip(roots, ups)])
    torch._foreach_mul_(downs, [r.to(t.device, t.dtype) for r, t in zip(roots, downs)])
    return CappedNorms(ratios != 1, norms * ratios)


def scale_weight_norms(network: LoRANetwork, max_norm: float) -> MaxNormResult:
    """Apply the cap and read its figures back (one read)."""
    capped = cap_weight_norms(network, max_norm)
    return MaxNormResult.from_values(capped.values().tolist()) if capped is not None else MaxNormResult(0, 0.0, 0.0)
