"""One LoRA on one Linear: y = W·x + multiplier · (alpha / rank) · up(down(x)).

The Linear itself is left in place (its state dict keys do not change); its `forward` is redirected to the LoRA's,
which calls the original and adds the low-rank term. The per-call cost is two small matmuls; nothing in Python
grows with the batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import LoRAWeightsError


class LoRAModule(nn.Module):
    def __init__(self, name: str, org: nn.Linear, rank: int, alpha: float, splits: tuple[int, ...] | None = None,
                 dropout: float | None = None, rank_dropout: float | None = None, module_dropout: float | None = None,
                 dtype: torch.dtype | None = None, ggpo: tuple[float, float] | None = None):
        super().__init__()
        self.lora_name = name
        self.rank = rank
        self.splits = splits
        parts = len(splits) if splits else 1
        if splits and sum(splits) != org.out_features:
            raise ValueError(f"{name}: split sizes {splits} do not add up to {org.out_features} outputs")
        device = org.weight.device
        dtype = dtype or (org.weight.dtype if org.weight.is_floating_point() and org.weight.element_size() > 1
                          else torch.float32)
        # split parts share one down matrix [parts * rank, in]: the same as one down per part, in one matmul
        self.lora_down = nn.Linear(org.in_features, parts * rank, bias=False, device=device, dtype=dtype)
        self.lora_up = nn.Linear(rank, org.out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.scale = float(alpha) / rank
        self.multiplier = 1.0
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.enabled = True
        self.ggpo = ggpo  # (sigma, beta) of GGPO, or None
        self.ggpo_base_norm: Tensor | None = None  # mean row norm of the base weight, read once
        self.ggpo_weight_norms: Tensor | None = None  # [out, 1], set by update_ggpo_norms
        self.ggpo_grad_norms: Tensor | None = None  # [out, 1], set by update_ggpo_norms
        self.__dict__["org_module"] = org  # a plain reference: the base weights are not part of this module
        self.__dict__["org_forward"] = None

    # ------------------------------------------------------------------ hooking

    def attach(self) -> None:
        org = self.org_module
        if self.org_forward is not None:
            raise RuntimeError(f"{self.lora_name} is already attached")
        self.__dict__["org_forward"] = org.forward
        self.__dict__["replaced_instance_forward"] = "forward" in org.__dict__  # another hook was there before
        org.forward = self.forward

    def detach(self) -> None:
        if self.org_forward is None:
            return
        org = self.org_module
        if org.__dict__.get("forward") != self.forward:
            raise RuntimeError(f"{self.lora_name}: another hook was attached after this one; detach that first")
        if self.replaced_instance_forward:
            org.forward = self.org_forward
        else:
            del org.forward  # back to the class's own forward
        self.__dict__["org_forward"] = None

    # ------------------------------------------------------------------ math

    def forward(self, x: Tensor) -> Tensor:
        out = self.org_forward(x)
        if not self.enabled or self.multiplier == 0:
            return out
        if self.module_dropout and self.training and torch.rand(()) < self.module_dropout:
            return out
        out = out + self.delta(x).to(out.dtype)
        perturbation = self.ggpo_perturbation(x)
        return out if perturbation is None else out + perturbation.to(out.dtype)

    def delta(self, x: Tensor) -> Tensor:
        weight = self.lora_down.weight
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(weight.dtype)
        lx = F.linear(x, weight)
        scale = self.multiplier * self.scale
        if self.training:
            if self.dropout:
                lx = F.dropout(lx, p=self.dropout)
            if self.rank_dropout:
                keep = torch.rand(lx.shape[0], *([1] * (lx.ndim - 2)), lx.shape[-1],
                                  device=lx.device) > self.rank_dropout
                lx = lx * keep
                scale = scale / (1.0 - self.rank_dropout)  # as if the rank were smaller
        if not self.splits:
            return F.linear(lx, self.lora_up.weight) * scale
        parts = zip(lx.split(self.rank, dim=-1), self.lora_up.weight.split(self.splits, dim=0))
        return torch.cat([F.linear(part, up) for part, up in parts], dim=-1) * scale

    # ------------------------------------------------------------------ GGPO (sd-scripts' lora_flux, training only)

    @torch.no_grad()
    def ggpo_perturbation(self, x: Tensor) -> Tensor | None:
        """x · Pᵀ with P a fresh standard-normal [out, in] matrix whose row i is scaled by
        (sigma · ‖W_i‖ + beta · ‖G_i‖²) / √out, from the norms of the last optimizer step; None when GGPO is off,
        outside training, before the first optimizer step, and on split layers (sd-scripts perturbs neither)."""
        if self.ggpo is None or not self.training or self.ggpo_grad_norms is None or self.splits:
            return None
        sigma, beta = self.ggpo
        out_features, in_features = self.org_module.out_features, self.org_module.in_features
        rows = (sigma * self.ggpo_weight_norms + beta * self.ggpo_grad_norms**2) / math.sqrt(out_features)
        weight = self.lora_down.weight
        perturbation = torch.randn(out_features, in_features, dtype=weight.dtype, device=weight.device)
        perturbation *= rows.to(weight.dtype)
        if x.dtype != perturbation.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(perturbation.dtype)
        return F.linear(x, perturbation)

    @torch.no_grad()
    def update_ggpo_norms(self) -> None:
        """After the gradients of an optimizer step are final (clipped) and before the step: the row norms GGPO scales
        its perturbation by. ‖W_i‖ combines the base weight's mean row norm with row i of up·down (unscaled, as
        sd-scripts computes it); ‖G_i‖ is row i of scale · (up · ∇down + ∇up · down)."""
        if self.ggpo is None or not self.training:
            return
        down, up = self.lora_down.weight, self.lora_up.weight
        if self.ggpo_base_norm is None:
            self.ggpo_base_norm = _mean_row_norm(self.org_module.weight).to(down.device)
        if down.grad is not None and up.grad is not None:
            grad = self.scale * (up.float() @ down.grad.float() + up.grad.float() @ down.float())
            self.ggpo_grad_norms = grad.norm(dim=1, keepdim=True)
        product = up.float() @ down.float()
        self.ggpo_weight_norms = torch.sqrt(self.ggpo_base_norm**2 + (product**2).sum(dim=1, keepdim=True))

    def weight_delta(self) -> Tensor:
        """multiplier · scale · up @ down in float32, the change merging makes to the base weight."""
        down = self.lora_down.weight.float()
        up = self.lora_up.weight.float()
        if self.splits:
            rows = up.split(self.splits, dim=0)
            downs = down.split(self.rank, dim=0)
            product = torch.cat([r @ d for r, d in zip(rows, downs)], dim=0)
        else:
            product = up @ down
        return product * (self.multiplier * self.scale)

    # ------------------------------------------------------------------ kohya file layout

    def kohya_tensors(self) -> dict[str, Tensor]:
        """down [parts·rank, in], up [out, parts·rank], alpha. Split parts are saved merged, with a
        block-diagonal up and alpha × parts, so any loader's alpha / rank gives the scale that was trained."""
        down = self.lora_down.weight.detach()
        up = self.lora_up.weight.detach()
        alpha = self.alpha.detach().clone()
        if self.splits:
            block = torch.zeros(up.shape[0], down.shape[0], dtype=up.dtype, device=up.device)
            row = 0
            for i, size in enumerate(self.splits):
                block[row:row + size, i * self.rank:(i + 1) * self.rank] = up[row:row + size]
                row += size
            up = block
            alpha = alpha * len(self.splits)
        return {f"{self.lora_name}.lora_down.weight": down, f"{self.lora_name}.lora_up.weight": up,
                f"{self.lora_name}.alpha": alpha}

    def load_kohya(self, down: Tensor, up: Tensor, alpha: Tensor | float | None) -> None:
        """Take weights from a file (the inverse of `kohya_tensors`, for split parts too)."""
        parts = len(self.splits) if self.splits else 1
        file_rank = down.shape[0]
        alpha = float(alpha) if alpha is not None else float(file_rank)
        if self.splits:
            if tuple(down.shape) != tuple(self.lora_down.weight.shape) or up.shape[1] != file_rank:
                raise LoRAWeightsError(f"{self.lora_name}: file shapes {list(down.shape)}/{list(up.shape)} do not fit "
                                 f"{parts} parts of rank {self.rank}")
            rows, row = [], 0
            for i, size in enumerate(self.splits):
                rows.append(up[row:row + size, i * self.rank:(i + 1) * self.rank])
                row += size
            up = torch.cat(rows, dim=0)
            alpha = alpha / parts
        elif (tuple(down.shape) != tuple(self.lora_down.weight.shape)
              or tuple(up.shape) != tuple(self.lora_up.weight.shape)):
            raise LoRAWeightsError(f"{self.lora_name}: file has down {list(down.shape)} and up {list(up.shape)}, "
                                   f"the network expects {list(self.lora_down.weight.shape)} and "
                                   f"{list(self.lora_up.weight.shape)}")
        with torch.no_grad():
            self.lora_down.weight.copy_(down)
            self.lora_up.weight.copy_(up)
            self.alpha.fill_(alpha)
        self.scale = alpha / self.rank


def _mean_row_norm(weight: Tensor, rows_at_once: int = 4096) -> Tensor:
    """The mean L2 norm of the rows of `weight` in float32 (any storage dtype, fp8 included), a block of rows at a
    time. sd-scripts estimates it from up to 1000 randomly chosen rows; all of them are read here."""
    total = torch.zeros((), dtype=torch.float32, device=weight.device)
    for start in range(0, weight.shape[0], rows_at_once):
        total += weight[start:start + rows_at_once].float().norm(dim=1).sum()
    return total / weight.shape[0]
