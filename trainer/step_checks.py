"""The per-step checks on the device, read back once: a step's losses, whether its gradients and the LoRA weights
are finite, and the max-norm figures travel to the host in one read instead of one per tensor.

Multi-tensor (foreach) norms do the work in a few kernels. The gradients' total 2-norm is the one gradient clipping
uses (`torch.nn.utils.get_total_norm`, what `clip_grad_norm_` computes), so clipping reuses it, and it is
non-finite exactly when a gradient is (or when the squares overflow float range, a step not worth taking either).
The weights' check takes each tensor's largest magnitude, which is non-finite exactly when an element is.
"""

from __future__ import annotations

import torch
from torch import Tensor


def gradients(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]


def gradient_norm(optimizer: torch.optim.Optimizer) -> Tensor | None:
    """The total 2-norm of the optimizer's gradients (None without any), on their device."""
    grads = gradients(optimizer)
    return torch.nn.utils.get_total_norm(grads) if grads else None


def all_finite(tensors: list[Tensor]) -> Tensor | None:
    """A 0-d flag on the device: every element of every tensor is finite (None for no tensors)."""
    if not tensors:
        return None
    largest = torch._foreach_norm([t.detach() for t in tensors], ord=float("inf"))
    device = largest[0].device
    return torch.stack([m.float().to(device) for m in largest]).isfinite().all()


def read_back(tensors: list[Tensor | None]) -> list[float | None]:
    """The values of 0-d or 1-d tensors, in one read from the device; None stays None."""
    present = [t for t in tensors if t is not None]
    if not present:
        return [None] * len(tensors)
    device = present[0].device
    flat = torch.cat([t.detach().double().reshape(-1).to(device) for t in present]).tolist()
    values, at = [], 0
    for t in tensors:
        if t is None:
            values.append(None)
            continue
        n = t.numel()
        values.append(flat[at] if t.dim() == 0 else flat[at:at + n])
        at += n
    return values
