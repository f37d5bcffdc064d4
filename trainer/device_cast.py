"""Casting a tensor read from a model file, with the arithmetic on another device than the one it is stored on.

With block swap the transformer is read into host memory, and with an fp8 base its block weights are narrowed from
bf16 to fp8 as they are read: on the CPU that is ~40 s for FLUX.1 on 2 cores, on the compute device a fraction of a
second. Only torch here, so the model loaders can import it without a cycle.
"""

from __future__ import annotations

import torch
from torch import Tensor

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def cast_on(value: Tensor, dtype: torch.dtype, device, convert_device=None) -> Tensor:
    """`value` in `dtype` on `device`. A narrowing to fp8 is computed on `convert_device` when one is given (one
    tensor at a time: its extra memory there is one weight), the result then moved to `device`; every other cast
    happens as `Tensor.to` does it."""
    if convert_device is None or dtype not in FP8 or value.dtype == dtype:
        return value.to(device=device, dtype=dtype)
    return value.to(device=convert_device).to(dtype).to(device=device)
