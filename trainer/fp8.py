"""fp8 base compute: the transformer's block Linears keep their float8 weights and are computed without casting each
weight on every call.

`enable(flux)` sets this up after `load_flux(..., fp8=True)`. Each call of a block's fp8 Linear then takes one of two
paths:

- fp8 matmul (`scaled_mm_linear`), on CUDA devices of compute capability 8.9 or newer (Ada, Hopper) for e4m3fn
  weights whose sizes are multiples of 16: the input is quantised per tensor to e4m3fn with a power-of-two scale
  from its absolute maximum, multiplied with the stored weight by `torch._scaled_mm` (weight scale: the layer's
  `weight_scale`, else 1) and returned in the compute dtype. Opt-in: FLUX_TRAINER_FP8_MATMUL=1 (or `fp8.SCALED_MM =
  True`). Quantising activations to e4m3 changes the numbers (about 2% on outputs and up to 7% on gradients of the
  tiny test model), which sd-scripts' fp8 path (weights upcast, activations kept) does not; it stays off until it
  is measured against the upcast path on full-size FLUX (bench/memory.py).
- block upcast, everywhere else: `enable` packs each block's fp8 weights into one buffer; the first Linear the block
  runs in a pass upcasts that buffer in one cast to the compute dtype (autocast's, else the input's) and every
  Linear of the block uses its slice. The copies live only while the block runs: forward hooks on the block open
  and close that scope, and since gradient checkpointing recomputes a block by calling it again, its recomputation
  upcasts once more and frees again. `upcast_block(block)` opens the same scope by hand.

Backward, on both paths: the base weights are frozen, so a Linear only owes the gradient of its input, dy·W. Nothing
upcast is saved for it; the first Linear backward of a block upcasts the block's weights again, in one cast, and the
last one drops them. Between forward and backward only the fp8 weights stay in memory, with or without
checkpointing. LoRA adds its own bf16/fp32 branch beside the Linear (trainer/lora/module.py) and is untouched.

Packing makes each Linear's `weight` a view into its block's buffer (the Parameter objects stay the same). Whether
a block upcasts in one cast is read from where its weights lie at each pass: a tool that moves parameters one by
one (`Module.to`) breaks the packing, and the block then upcasts weight by weight, still once per pass, with the
same result.

With the block runners (trainer/memory.py): the session calls `enable` after installing the runner, once block swap
has moved the resident blocks to the GPU (moving parameters one by one would undo the packing). Every runner ends in
`block(*args)` (checkpointing, its recomputation, block swap's recomputation), so the hooks fire whichever runs.
Swapped blocks hold placeholders when `enable` runs (nothing to pack) and, when they run, views into their block-swap
slot, where the weights lie back to back as packing would put them: they upcast in one cast too. Inside
`torch.compile` the layers compute the plain per-call upcast and the compiler schedules it.
"""

from __future__ import annotations

import contextlib
import os
import warnings
import weakref
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .models.flux import FP8_DTYPES, Linear

SCALED_MM = False  # module switch for the fp8-matmul path; the environment variable below also turns it on
SCALED_MM_ENV = "FLUX_TRAINER_FP8_MATMUL"
SCALED_MM_MIN_CAPABILITY = (8, 9)
E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
_STATE = "fp8_block"  # attribute holding a block's _Block


# ------------------------------------------------------------------------------------------------ fp8 matmul

def scaled_mm_wanted() -> bool:
    value = os.environ.get(SCALED_MM_ENV, "").strip().lower()
    if value:
        return value not in ("0", "false", "no", "off")
    return SCALED_MM


def scaled_mm_supported(x: Tensor, weight: Tensor) -> bool:
    """Whether `x @ weight.T` can run as an fp8 matmul here: a CUDA input on compute capability >= 8.9, an e4m3fn
    weight with both sizes multiples of 16, a float input. Never true for a CPU tensor."""
    if not x.is_cuda or weight.dtype != torch.float8_e4m3fn or not hasattr(torch, "_scaled_mm"):
        return False
    if weight.shape[0] % 16 or weight.shape[1] % 16 or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    return tuple(torch.cuda.get_device_capability(x.device)) >= SCALED_MM_MIN_CAPABILITY


_ONES: dict[torch.device, Tensor] = {}


def _one(device: torch.device) -> Tensor:
    """A float32 1 on `device`, made once: the fp8 matmul path needs it on every Linear call (a fresh one is an
    allocation and, on CUDA, a fill kernel each time). Only ever read."""
    one = _ONES.get(device)
    if one is None:
        one = _ONES[device] = torch.ones((), dtype=torch.float32, device=device)
    return one


def quantize_e4m3(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [M, K] -> (x_fp8, scale) with x ≈ x_fp8 · scale; the scale is the power of two that brings amax(|x|) into
    (224, 448], so scaling is exact and nothing overflows."""
    amax = x.abs().amax().float().clamp(min=2.0**-64)
    _, exponent = torch.frexp(E4M3_MAX / amax)  # E4M3_MAX / amax = m · 2**exponent, m in [0.5, 1)
    one = _one(x.device)
    inverse = torch.ldexp(one, exponent - 1)  # <= E4M3_MAX / amax
    if x.dtype == torch.float16:
        x = x.float()  # the power of two may exceed float16's range
    x8 = (x * inverse.to(x.dtype)).to(torch.float8_e4m3fn).contiguous()  # _scaled_mm wants it row-major
    return x8, torch.ldexp(one, 1 - exponent)


def scaled_mm_linear(x: Tensor, weight: Tensor, weight_scale: Tensor | None, bias: Tensor | None,
                     out_dtype: torch.dtype) -> Tensor:
    """x @ (weight · weight_scale).T + bias by one `torch._scaled_mm`, x quantised per tensor to e4m3fn."""
    rows = x.reshape(-1, x.shape[-1])
    x8, x_scale = quantize_e4m3(rows)
    if weight_scale is None:
        w_scale = _one(x.device)
    else:
        w_scale = weight_scale.float().reshape(())
    out = torch._scaled_mm(x8, weight.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=out_dtype)
    if bias is not None:
        out = out + bias.to(out_dtype)
    return out.reshape(*x.shape[:-1], weight.shape[0])


# ------------------------------------------------------------------------------------------------ upcasts

def upcast_one(weight: Tensor, scale: Tensor | None, dtype: torch.dtype) -> Tensor:
    """One Linear's weight in `dtype` (times its scale), as `Linear.forward` computes it."""
    out = weight.to(dtype)
    return out * scale.to(dtype) if scale is not None else out


def upcast_layers(layers: list[nn.Module], dtype: torch.dtype) -> list[Tensor]:
    """Every weight of `layers` in `dtype`: one cast when the weights lie back to back in one buffer (packed by
    `_pack`, or a block-swap slot), else one cast per weight. Scaled-fp8 weights are multiplied by their scale in
    place."""
    weights = [layer.weight for layer in layers]
    flat = _flat_run(weights)
    if flat is not None:
        wide = flat.to(dtype)
        out, at = [], 0
        for w in weights:
            out.append(wide[at:at + w.numel()].view(w.shape))
            at += w.numel()
    else:
        out = [w.to(dtype) for w in weights]
    for layer, w in zip(layers, out):
        scale = layer._buffers.get("weight_scale")
        if scale is not None:
            w.mul_(scale.to(dtype))
    return out


def _pack(layers: list[nn.Module]) -> bool:
    """Copy the weights of `layers` into one contiguous buffer and make each weight a view of it. Not for weights
    that are placeholders (a block swapped out: its slot is such a buffer already) or already lie back to back."""
    weights = [layer.weight for layer in layers]
    if len({(w.dtype, w.device) for w in weights}) != 1 or weights[0].is_meta or any(w.numel() == 0 for w in weights):
        return False
    if _flat_run(weights) is not None:
        return True
    flat = torch.empty(sum(w.numel() for w in weights), dtype=weights[0].dtype, device=weights[0].device)
    at = 0
    with torch.no_grad():
        for w in weights:
            view = flat[at:at + w.numel()].view(w.shape)
            view.copy_(w)
            w.data = view
            at += w.numel()
    return True


def _flat_run(weights: list[Tensor]) -> Tensor | None:
    """The weights as one flat tensor, if they share one storage, one dtype, and lie back to back in order."""
    first = weights[0]
    if first.is_meta:
        return None
    storage, start = first.untyped_storage().data_ptr(), first.storage_offset()
    at = start
    for w in weights:
        if (w.dtype != first.dtype or w.numel() == 0 or not w.is_contiguous() or w.storage_offset() != at
                or w.untyped_storage().data_ptr() != storage):
            return None
        at += w.numel()
    return first.detach().as_strided((at - start,), (1,), start)


# ------------------------------------------------------------------------------------------------ per block

class _Pass:
    """One run of a block: its forward upcasts (dropped when the block returns) and, for backward, how many Linear
    backwards are still to come and the weights they share."""

    __slots__ = ("block", "dtype", "forward", "backward", "pending")

    def __init__(self, block: "_Block"):
        self.block = block
        self.dtype: torch.dtype | None = None
        self.forward: list[Tensor] | None = None
        self.backward: list[Tensor] | None = None
        self.pending = 0

    def forward_weight(self, index: int, dtype: torch.dtype) -> Tensor | None:
        if self.forward is None and self.dtype is None:
            self.forward = upcast_layers(self.block.layers(), dtype)
            self.dtype = dtype
        if self.forward is None or dtype != self.dtype:
            return None  # scope closed, or a second compute dtype inside one block: upcast that layer alone
        return self.forward[index]

    def backward_weight(self, index: int, dtype: torch.dtype) -> Tensor:
        if self.backward is None or self.backward[index].dtype != dtype:
            self.backward = upcast_layers(self.block.layers(), dtype)
        weight = self.backward[index]
        self.pending -= 1
        if self.pending <= 0:
            self.backward = None  # the block's last Linear backward: free its upcast weights
        return weight


class _Block:
    """The fp8 Linears of one transformer block and the scope in which their upcast weights live."""

    def __init__(self, layers: list[nn.Module], pack: bool):
        self.refs = [weakref.ref(layer) for layer in layers]
        if pack:
            _pack(layers)
        self.depth = 0
        self.current: _Pass | None = None
        self.handles: list = []

    def layers(self) -> list[nn.Module]:
        layers = [ref() for ref in self.refs]
        if any(layer is None for layer in layers):
            raise RuntimeError("a Linear of an fp8 block was deleted; call fp8.enable again")
        return layers

    def enter(self) -> None:
        self.depth += 1
        if self.depth == 1:
            self.current = _Pass(self)

    def pre_hook(self, module, args) -> None:
        if not torch.compiler.is_compiling():
            self.enter()

    def post_hook(self, module, args, output) -> None:
        if not torch.compiler.is_compiling():
            self.exit()

    def exit(self) -> None:
        self.depth = max(0, self.depth - 1)
        if self.depth == 0 and self.current is not None:
            self.current.forward = None  # the upcast weights die with the block's run
            self.current = None


class _Fp8Linear(torch.autograd.Function):
    """y = forward(x, bias); dx = dy · W with W upcast in backward (per block when `run` is given); db = Σ dy."""

    @staticmethod
    def forward(ctx, x, bias, layer, compute, run, index):
        ctx.layer, ctx.run, ctx.index, ctx.x_dtype = layer, run, index, x.dtype
        ctx.has_bias = bias is not None
        return compute(x, bias)

    @staticmethod
    def backward(ctx, grad):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            if ctx.run is not None:
                weight = ctx.run.backward_weight(ctx.index, grad.dtype)
            else:
                weight = upcast_one(ctx.layer.weight, ctx.layer._buffers.get("weight_scale"), grad.dtype)
            grad_x = grad.matmul(weight).to(ctx.x_dtype)
        elif ctx.run is not None:
            ctx.run.pending -= 1
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, grad_bias, None, None, None, None


class _Layer:
    """`Linear.fp8_compute` of one layer: picks the path and runs it."""

    def __init__(self, block: _Block, index: int):
        self.block = block
        self.index = index
        self.scaled_mm_failed = False

    def __call__(self, linear: nn.Module, x: Tensor) -> Tensor:
        weight, bias = linear.weight, linear.bias
        scale = linear._buffers.get("weight_scale")
        autocast = torch.is_autocast_enabled(x.device.type)
        dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
        if bias is not None and not autocast:
            bias = bias.to(dtype)
        if torch.compiler.is_compiling():  # inside torch.compile the compiler schedules (and recomputes) the casts
            return F.linear(x, upcast_one(weight, scale, dtype), bias)
        run = self.block.current
        if not self.scaled_mm_failed and scaled_mm_wanted() and scaled_mm_supported(x, weight):
            try:
                return self._apply(x, bias, linear, lambda x, b: scaled_mm_linear(x, weight, scale, b, dtype), run)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as e:  # an fp8 matmul this build or card refuses: this layer upcasts from now on
                self.scaled_mm_failed = True
                warnings.warn(f"fp8 matmul failed ({e}); upcasting this layer's weight instead", stacklevel=2)
        upcast = run.forward_weight(self.index, dtype) if run is not None else None
        if upcast is None:
            upcast = upcast_one(weight, scale, dtype)
        return self._apply(x, bias, linear, lambda x, b: F.linear(x, upcast, b), run)

    def _apply(self, x, bias, linear, compute, run):
        if not torch.is_grad_enabled() or not (x.requires_grad or (bias is not None and bias.requires_grad)):
            return compute(x, bias)  # nothing will backpropagate through this call
        out = _Fp8Linear.apply(x, bias, linear, compute, run, self.index)
        if run is not None:
            run.pending += 1  # one more Linear backward to come before the block's backward weights can go
        return out


# ------------------------------------------------------------------------------------------------ public API

def transformer_blocks(flux: nn.Module) -> list[nn.Module]:
    return [*flux.double_blocks, *flux.single_blocks]


def enable(flux: nn.Module, blocks: Iterable[nn.Module] | None = None, pack: bool = True) -> int:
    """Compute the fp8 Linears of every block of `flux` (or of `blocks`) as this module describes: pack each block's
    fp8 weights into one buffer, route its Linears through fp8 compute and hook the block so its upcast weights live
    only while it runs. Idempotent. Returns how many blocks hold fp8 Linears."""
    count = 0
    for block in (transformer_blocks(flux) if blocks is None else blocks):
        if _STATE in block.__dict__:
            count += 1
            continue
        layers = [m for m in block.modules() if isinstance(m, Linear) and m.weight.dtype in FP8_DTYPES]
        if not layers:
            continue
        state = _Block(layers, pack)
        for index, layer in enumerate(layers):
            layer.fp8_compute = _Layer(state, index)
        state.handles = [block.register_forward_pre_hook(state.pre_hook),
                         block.register_forward_hook(state.post_hook, always_call=True)]
        block.__dict__[_STATE] = state
        count += 1
    return count


def disable(flux: nn.Module, blocks: Iterable[nn.Module] | None = None) -> None:
    """Undo `enable`: the Linears upcast on each call again (their weights stay packed, which changes nothing)."""
    for block in (transformer_blocks(flux) if blocks is None else blocks):
        state = block.__dict__.pop(_STATE, None)
        if state is None:
            continue
        for handle in state.handles:
            handle.remove()
        for layer in state.layers():
            layer.__dict__.pop("fp8_compute", None)


def is_enabled(block: nn.Module) -> bool:
    return _STATE in block.__dict__


@contextlib.contextmanager
def upcast_block(block: nn.Module) -> Iterator[None]:
    """Hold one upcast of `block`'s fp8 weights for every call of the block inside (the hooks `enable` installs do the
    same around each call); nothing for a block `enable` did not set up."""
    state = block.__dict__.get(_STATE)
    if state is None:
        yield
        return
    state.enter()
    try:
        yield
    finally:
        state.exit()
