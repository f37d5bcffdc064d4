"""Block swap: the frozen weights of the last transformer blocks live in host memory and stream to the compute device
just before each of those blocks runs.

Layout. Every Linear `weight` of a swapped block (over 99.9% of its bytes) has one host copy (pinned when computing
on CUDA); biases, norm scales and small buffers such as an fp8 `weight_scale` stay on the compute device. The
compute device holds a fixed number of slots per block kind (2 by default: double buffering); a slot is one set of
tensors shaped like one block's weights. Loading a block copies its host weights into a free or least recently
used slot (on a side CUDA stream, overlapping compute) and points the block's `weight` parameters at the slot; an
evicted block's weights point at an empty placeholder, so running it outside this runner fails loudly instead of
reading stale memory. Nothing is ever copied back: the weights are frozen. LoRA parameters are not part of the
blocks (the LoRA modules live in the network and only hook the Linears' forward), so they are never moved.

Order. Forward: before block i runs it is made resident and the next swapped block is prefetched. Backward runs
the blocks in reverse: before block i is recomputed, the previous swapped block is prefetched.

Backward correctness. A swapped block always runs as a recomputation (`_Recompute`, below), with or without
gradient checkpointing: the forward keeps only the block's inputs, and the block's backward re-runs it, with its
weights loaded, and backpropagates through that recomputation inside its own backward call. Every use of a slot's
weights therefore ends before the runner moves to another block, whatever order the autograd engine picks, and
autograd never holds a slot's memory (or, with fp8 weights, an upcast copy of it) across blocks. Without gradient
checkpointing this costs one extra forward of the swapped blocks only; with it, the same work as checkpointing.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

MAX_DOUBLE, MAX_SINGLE = 17, 36


@dataclass(frozen=True)
class SwapPlan:
    double: int
    single: int
    note: str | None = None  # set when the model is smaller than the request


def swap_plan(blocks_to_swap: int, depth: int, depth_single: int, slots: int = 0) -> SwapPlan:
    """sd-scripts' mapping: the memory of N//2 double and (N - N//2)*2 single blocks (at most 17 and 36) leaves the
    device. sd-scripts brings each block into the memory of the one going out; here the blocks that stream share
    `slots` device slots per kind, so `slots` more blocks of each kind stream and the device holds what it holds in
    sd-scripts. Capped so that at least one block of each kind stays resident on a model smaller than FLUX.1."""
    if not 0 <= blocks_to_swap <= 35:
        raise ValueError(f"blocks_to_swap: expected 0-35, not {blocks_to_swap}")
    freed_double = min(blocks_to_swap // 2, MAX_DOUBLE)
    freed_single = min((blocks_to_swap - blocks_to_swap // 2) * 2, MAX_SINGLE)
    wanted_double = freed_double + slots if freed_double else 0
    wanted_single = freed_single + slots if freed_single else 0
    double, single = min(wanted_double, max(depth - 1, 0)), min(wanted_single, max(depth_single - 1, 0))
    note = None
    if double < freed_double or single < freed_single:  # the model is too small for the memory asked to be freed
        note = (f"blocks_to_swap {blocks_to_swap} asks for {wanted_double} double + {wanted_single} single blocks "
                f"streamed, but this model has {depth} double and {depth_single} single blocks and one of each stays "
                f"on the compute device: {double} double + {single} single are swapped")
    return SwapPlan(double, single, note)


def _pinned_empty(shape: torch.Size, dtype: torch.dtype) -> Tensor:
    """Page-locked host memory of exactly this size. torch's pinned allocator rounds every block up to a power of two
    (a 648 MiB block weight set would take 1 GiB) and keeps it cached after the run; registering an ordinary
    allocation with CUDA pins just its bytes, and unregistering it when the tensor goes gives them back."""
    host = torch.empty(shape, dtype=dtype)
    size = host.numel() * host.element_size()
    try:
        cudart = torch.cuda.cudart()
        if size and int(cudart.cudaHostRegister(host.data_ptr(), size, 0)) == 0:
            weakref.finalize(host, cudart.cudaHostUnregister, host.data_ptr())
            return host
    except (AssertionError, AttributeError, RuntimeError, TypeError):  # no CUDA runtime binding: torch's pinning
        pass
    return torch.empty(shape, dtype=dtype, pin_memory=True)


# ------------------------------------------------------------------------------------------------ recompute

class _Job:
    """What `_Recompute` needs from a runner for one block call."""

    def __init__(self, call: Callable[..., Any], device: torch.device, pack=None, unpack=None,
                 before_backward: Callable[[], None] | None = None):
        self.call, self.device = call, device
        self.pack, self.unpack, self.before_backward = pack, unpack, before_backward


def _device_of(args) -> torch.device:
    return next((a.device for a in args if isinstance(a, Tensor)), torch.device("cpu"))


def _rng_state(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _run_detached(job: _Job, args, needs) -> tuple[list, Any]:
    inputs = [a.detach().requires_grad_(bool(n)) if isinstance(a, Tensor) else a for a, n in zip(args, needs)]
    with torch.enable_grad():
        return inputs, job.call(*inputs)


class _Recompute(torch.autograd.Function):
    """Runs a block, keeps only its inputs (as they are, or through `job.pack`), and in backward re-runs it and
    backpropagates through the re-run at once (the reentrant checkpointing scheme). The forward also runs with
    gradients enabled, on detached inputs, so every kernel choice is the one the plain model makes; random draws
    (LoRA dropout) and autocast are replayed as in the forward."""

    @staticmethod
    def forward(ctx, job: _Job, anchor: Tensor, *args):
        ctx.set_materialize_grads(False)
        ctx.job = job
        ctx.rng = _rng_state(job.device)
        ctx.autocast = [(t, torch.is_autocast_enabled(t), torch.get_autocast_dtype(t))
                        for t in {"cpu", job.device.type}]
        if job.pack is not None:
            ctx.packed = job.pack(args)
        else:
            ctx.save_for_backward(*(a if isinstance(a, Tensor) else None for a in args))
            ctx.others = tuple(None if isinstance(a, Tensor) else a for a in args)
        needs = [isinstance(a, Tensor) and a.requires_grad for a in args]
        _, out = _run_detached(job, args, needs)
        return tuple(o.detach() for o in out) if isinstance(out, tuple) else out.detach()

    @staticmethod
    def backward(ctx, *grads):
        job: _Job = ctx.job
        if job.pack is not None:
            args = job.unpack(ctx.packed)
        else:
            args = [s if s is not None else o for s, o in zip(ctx.saved_tensors, ctx.others)]
        if job.before_backward is not None:
            job.before_backward()
        cpu_rng, cuda_rng = ctx.rng
        cuda = [] if cuda_rng is None else [job.device.index if job.device.index is not None
                                            else torch.cuda.current_device()]
        with torch.random.fork_rng(devices=cuda):
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng, job.device)
            with _autocast(ctx.autocast):
                inputs, out = _run_detached(job, args, ctx.needs_input_grad[2:])
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, None, *(a.grad if isinstance(a, Tensor) and a.requires_grad else None for a in inputs))


class _autocast:
    def __init__(self, states):
        self.contexts = [torch.autocast(t, dtype=dtype, enabled=enabled) for t, enabled, dtype in states]

    def __enter__(self):
        for c in self.contexts:
            c.__enter__()

    def __exit__(self, *exc):
        for c in reversed(self.contexts):
            c.__exit__(*exc)


_anchors: dict[torch.device, Tensor] = {}


def recompute(job: _Job, *args) -> Any:
    """`job.call(*args)` as a recomputed block. An empty leaf that requires grad rides along as an input, so the
    block's backward runs even when none of its inputs require grad (the first block: only its LoRAs train)."""
    anchor = _anchors.get(job.device)
    if anchor is None:
        anchor = _anchors[job.device] = torch.empty(0, device=job.device, requires_grad=True)
    return _Recompute.apply(job, anchor, *args)


# ------------------------------------------------------------------------------------------------ slots

class _Slots:
    """`count` device-side sets of one block kind's streamed weights."""

    def __init__(self, spec: list[tuple[torch.Size, torch.dtype]], count: int, device: torch.device):
        self.tensors = [[torch.empty(shape, dtype=dtype, device=device) for shape, dtype in spec]
                        for _ in range(count)]
        self.owner: list[tuple[str, int] | None] = [None] * count
        self.last_use = [0] * count
        self.ready: list[Any] = [None] * count  # CUDA event: the copy into the slot is done


class BlockSwapRunner:
    """Streams the frozen weights of the last `blocks_to_swap` blocks (sd-scripts' count) from `host_device` into
    `slots` device-side slots per block kind on `compute_device` (see the module docstring). Resident blocks run
    plainly, or checkpointed with `checkpointing`. `bind(flux)` (called by `memory.install`) sets it up; `release()`
    puts every weight back into an ordinary tensor on the device it had before."""

    def __init__(self, blocks_to_swap: int, checkpointing: bool = False, *, compute_device=None,
                 host_device="cpu", slots: int = 2):
        if slots < 1:
            raise ValueError(f"block swap needs at least one slot per block kind, not {slots}")
        self.blocks_to_swap = blocks_to_swap
        self.checkpointing = checkpointing
        self.compute_device = torch.device(compute_device) if compute_device is not None else None
        self.host_device = torch.device(host_device)
        self.slot_count = slots
        self.plan: SwapPlan | None = None
        self.loads = 0
        self.bytes_streamed = 0
        self.max_resident = 0
        self.max_resident_by_kind = {"double": 0, "single": 0}
        self._linears: dict[tuple[str, int], list[nn.Linear]] = {}
        self._host: dict[tuple[str, int], list[Tensor]] = {}
        self._origin: dict[tuple[str, int], list[torch.device]] = {}
        self._slots: dict[str, _Slots] = {}
        self._where: dict[tuple[str, int], int] = {}
        self._next: dict[tuple[str, int], tuple[str, int] | None] = {}
        self._prev: dict[tuple[str, int], tuple[str, int] | None] = {}
        self._placeholders: dict[torch.dtype, Tensor] = {}
        self._running: tuple[str, int] | None = None
        self._clock = 0
        self._side = None
        self._bound = self._released = False

    # ---------------------------------------------------------------------------------------- setup

    def bind(self, flux: nn.Module) -> None:
        if self._bound:
            raise RuntimeError("this block-swap runner is already bound to a model")
        device = self.compute_device or flux.img_in.weight.device
        self.compute_device = device
        self.plan = swap_plan(self.blocks_to_swap, len(flux.double_blocks), len(flux.single_blocks), self.slot_count)
        pin = device.type == "cuda" and self.host_device.type == "cpu"
        order, specs = [], {}
        for kind, blocks, count in (("double", flux.double_blocks, self.plan.double),
                                    ("single", flux.single_blocks, self.plan.single)):
            for index in range(len(blocks) - count, len(blocks)):  # check everything before changing anything
                named = [(n, m) for n, m in blocks[index].named_modules() if isinstance(m, nn.Linear)]
                trainable = [n for n, m in named if m.weight.requires_grad]
                if trainable:
                    raise ValueError(f"block swap streams frozen weights only: {kind} block {index} has trainable "
                                     f"Linear weights ({', '.join(trainable[:3])}); call requires_grad_(False)")
                spec = [(m.weight.shape, m.weight.dtype) for _, m in named]
                if specs.setdefault(kind, spec) != spec:
                    raise ValueError(f"{kind} block {index}: its weights differ in shape or dtype from the other "
                                     f"swapped {kind} blocks; slots need one layout per kind")
                self._linears[(kind, index)] = [m for _, m in named]
                order.append((kind, index))
        for key in order:
            linears = self._linears[key]
            self._origin[key] = [m.weight.device for m in linears]
            self._host[key] = [self._host_copy(m.weight, pin) for m in linears]
            for m in linears:
                m.weight.data = self._placeholder(m.weight.dtype)
        for kind, spec in specs.items():
            count = sum(1 for k in order if k[0] == kind)
            self._slots[kind] = _Slots(spec, min(self.slot_count, count), device)
        for i, key in enumerate(order):
            self._prev[key] = order[i - 1] if i else None
            self._next[key] = order[i + 1] if i + 1 < len(order) else None
        flux.to(device)  # what stays resident goes to the compute device (a no-op when it is there already)
        if device.type == "cuda":
            self._side = torch.cuda.Stream(device)
        self._bound = True

    def _host_copy(self, weight: Tensor, pin: bool) -> Tensor:
        w = weight.detach()
        if w.device == self.host_device and (not pin or w.is_pinned()):
            return w  # already in host memory: the slot is the copy
        host = _pinned_empty(w.shape, w.dtype) if pin else torch.empty(w.shape, dtype=w.dtype, device=self.host_device)
        host.copy_(w)
        return host

    def _placeholder(self, dtype: torch.dtype) -> Tensor:
        if dtype not in self._placeholders:
            self._placeholders[dtype] = torch.empty(0, dtype=dtype, device=self.compute_device)
        return self._placeholders[dtype]

    def describe(self) -> str:
        plan = self.plan
        where = "pinned host memory" if self._side is not None else f"host memory ({self.host_device})"
        text = (f"block swap: {plan.double} double + {plan.single} single blocks stream from {where} into "
                f"{self.slot_count} slots per block kind on {self.compute_device}")
        return text + (f" ({plan.note})" if plan.note else "")

    def release(self) -> None:
        """Every swapped weight back in an ordinary tensor on the device it had before `bind`; slots freed."""
        if self._released:
            return
        if self._side is not None:
            torch.cuda.current_stream(self.compute_device).wait_stream(self._side)
        self._slots.clear()  # each slot's memory goes as the last weight pointing at it is restored
        self._where.clear()
        for key, linears in self._linears.items():
            for m, host, origin in zip(linears, self._host[key], self._origin[key]):
                m.weight.data = host if host.device == origin else host.to(origin)
        self._host.clear()
        self._linears.clear()
        self._released = True

    # ---------------------------------------------------------------------------------------- running

    def __call__(self, kind: str, index: int, block: nn.Module, *args: Any) -> Any:
        key = (kind, index)
        if key not in self._linears:
            if self._released:
                raise RuntimeError("this block-swap runner was released; install another runner")
            if self.checkpointing and block.training and torch.is_grad_enabled():
                return checkpoint(block, *args, use_reentrant=False)
            return block(*args)
        self._ensure(key)
        self._load(self._next[key])
        if not torch.is_grad_enabled():
            return block(*args)

        def before_backward():
            self._ensure(key)
            self._load(self._prev[key])

        return recompute(_Job(block, self.compute_device, before_backward=before_backward), *args)

    def resident(self) -> list[tuple[str, int]]:
        """The swapped blocks whose weights are in device slots now (a copy may still be in flight)."""
        return sorted(self._where)

    def slot_pointers(self) -> set[int]:
        return {t.data_ptr() for slots in self._slots.values() for tensors in slots.tensors for t in tensors}

    def _ensure(self, key: tuple[str, int]) -> None:
        """`key`'s weights resident and (on CUDA) ready for the compute stream; it is not evicted until the next
        block is ensured: every kernel using the blocks before it has been queued by then."""
        self._running = key
        if key not in self._where:
            self._load(key)
        slots = self._slots[key[0]]
        slot = self._where[key]
        self._clock += 1
        slots.last_use[slot] = self._clock
        if slots.ready[slot] is not None:
            torch.cuda.current_stream(self.compute_device).wait_event(slots.ready[slot])
            slots.ready[slot] = None

    def _load(self, key: tuple[str, int] | None) -> None:
        if key is None or key in self._where:
            return
        slots = self._slots[key[0]]
        free = [s for s, owner in enumerate(slots.owner) if owner != self._running]
        if not free:
            return  # one slot, in use by the running block: no prefetch
        slot = min(free, key=lambda s: (slots.owner[s] is not None, slots.last_use[s]))
        old = slots.owner[slot]
        if old is not None:
            for m in self._linears[old]:
                m.weight.data = self._placeholder(m.weight.dtype)
            del self._where[old]
        with torch.no_grad():
            if self._side is not None:
                # the slot's previous contents were last read by kernels queued on the compute stream so far
                self._side.wait_stream(torch.cuda.current_stream(self.compute_device))
                with torch.cuda.stream(self._side):
                    for dst, src in zip(slots.tensors[slot], self._host[key]):
                        dst.copy_(src, non_blocking=True)
                    slots.ready[slot] = torch.cuda.Event()
                    slots.ready[slot].record(self._side)
            else:
                for dst, src in zip(slots.tensors[slot], self._host[key]):
                    dst.copy_(src)
        for m, dst in zip(self._linears[key], slots.tensors[slot]):
            m.weight.data = dst
        slots.owner[slot] = key
        self._where[key] = slot
        self._clock += 1
        slots.last_use[slot] = self._clock
        self.loads += 1
        self.bytes_streamed += sum(t.numel() * t.element_size() for t in slots.tensors[slot])
        self.max_resident = max(self.max_resident, len(self._where))
        by_kind = sum(1 for k in self._where if k[0] == key[0])
        self.max_resident_by_kind[key[0]] = max(self.max_resident_by_kind[key[0]], by_kind)
