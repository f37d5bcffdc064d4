"""Block swap: the frozen weights of the last transformer blocks live in host memory and stream to the compute device
just before each of those blocks runs.

Layout. The Linear `weight`s of a swapped block (over 99.9% of its bytes) have one host buffer per block (one
page-aligned allocation, registered with CUDA once when computing on CUDA), each weight at a fixed offset; biases,
norm scales and small buffers such as an fp8 `weight_scale` stay on the compute device. The compute device holds a
fixed number of slots per block kind (2 by default: double buffering); a slot is one flat buffer with the same
layout. Loading a block is one copy of its host buffer into a free or least recently used slot (on a side CUDA
stream, overlapping compute), and the block's `weight` parameters become views into the slot (weights of one dtype
lie back to back, so fp8.py upcasts a swapped block in one cast, as a packed resident one); an evicted block's
weights point at an empty placeholder, so running it outside this runner fails loudly instead of reading stale
memory. Nothing is ever copied back: the weights are frozen. LoRA parameters are not part of the blocks (the LoRA
modules live in the network and only hook the Linears' forward), so they are never moved.

Order. Forward: before block i runs it is made resident and the next swapped block is prefetched. Backward runs
the blocks in reverse: before block i is recomputed, the previous swapped block is prefetched.

Backward correctness. A swapped block always runs as a recomputation (`_Recompute`, below), with or without
gradient checkpointing: the forward keeps only the block's inputs, and the block's backward re-runs it, with its
weights loaded, and backpropagates through that recomputation inside its own backward call. Every use of a slot's
weights therefore ends before the runner moves to another block, whatever order the autograd engine picks, and
autograd never holds a slot's memory (or, with fp8 weights, an upcast copy of it) across blocks. Without gradient
checkpointing this costs one extra forward of the swapped blocks only; with it, the same work as checkpointing.

Lifetime. `bind` is all or nothing; `release` waits for the side stream, unpins, and leaves the whole model on one
device; `memory.teardown` calls it, and a run must call that in its `finally` (a runner merely dropped leaves its
slots and pinned pages to the garbage collector while a copy may still be in flight).
"""

from __future__ import annotations

import mmap
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .config.swap_split import freed_blocks


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
    freed_double, freed_single = freed_blocks(blocks_to_swap)
    wanted_double = freed_double + slots if freed_double else 0
    wanted_single = freed_single + slots if freed_single else 0
    double, single = min(wanted_double, max(depth - 1, 0)), min(wanted_single, max(depth_single - 1, 0))
    note = None
    if double < freed_double or single < freed_single:  # the model is too small for the memory asked to be freed
        note = (f"blocks_to_swap {blocks_to_swap} asks for {wanted_double} double + {wanted_single} single blocks "
                f"streamed, but this model has {depth} double and {depth_single} single blocks and one of each stays "
                f"on the compute device: {double} double + {single} single are swapped")
    return SwapPlan(double, single, note)


PAGE = mmap.PAGESIZE
CUDA_HOST_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable: pinned for every CUDA context, not just the current one


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def _cudart():
    """torch's CUDA runtime binding, None without one (a CPU build, or no driver)."""
    try:
        return torch.cuda.cudart()
    except (AssertionError, AttributeError, RuntimeError, TypeError):
        return None


def _clear_cuda_error(cudart) -> None:
    """Reset CUDA's last error after a runtime call failed, so the next kernel launch does not report it. torch's
    binding has no cudaGetLastError (a fake in the tests may); a kernel launch reads and clears it as well."""
    get_last_error = getattr(cudart, "cudaGetLastError", None)
    if get_last_error is not None:
        get_last_error()
        return
    try:
        torch.empty(1, device="cuda").fill_(0)
    except RuntimeError:
        pass  # the stale error, raised once and thereby cleared


def _register_host(ptr: int, size: int) -> bool:
    """Page-lock `size` bytes at `ptr` for CUDA; False (CUDA's error cleared) when the runtime refuses."""
    cudart = _cudart()
    if cudart is None:
        return False
    try:
        code = int(cudart.cudaHostRegister(ptr, size, CUDA_HOST_REGISTER_PORTABLE))
    except (AttributeError, RuntimeError, TypeError):
        return False
    if code != 0:
        _clear_cuda_error(cudart)
        return False
    return True


def _unregister_host(ptr: int, side) -> None:
    if side is not None:
        side.synchronize()  # no copy still reading these pages
    cudart = _cudart()
    if cudart is not None and int(cudart.cudaHostUnregister(ptr)) != 0:
        _clear_cuda_error(cudart)


def _torch_pinned(nbytes: int) -> Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


class _HostBuffer:
    """One swapped block's weights in host memory, as bytes. Pinned: one page-aligned allocation whose whole pages
    are registered with CUDA once (so no page is shared with another registration, the commonest refusal), given
    back by `unregister` or when the buffer goes; if CUDA refuses, torch's pinned allocator instead (which rounds
    sizes up to a power of two)."""

    def __init__(self, nbytes: int, pin: bool, side=None, device: torch.device | str = "cpu"):
        self.registered = self.torch_pinned = False
        self._finalizer = None
        if not pin:
            self.bytes = torch.empty(nbytes, dtype=torch.uint8, device=device)
            return
        span = _round_up(max(nbytes, 1), PAGE)
        raw = torch.empty(span + PAGE, dtype=torch.uint8)
        start = (-raw.data_ptr()) % PAGE
        if _register_host(raw.data_ptr() + start, span):
            self.bytes = raw[start:start + nbytes]
            self.registered = True
            self._finalizer = weakref.finalize(self, _unregister_host, raw.data_ptr() + start, side)
        else:
            self.bytes = _torch_pinned(nbytes)
            self.torch_pinned = True

    def unregister(self) -> None:
        """Unpin now (the bytes stay valid as ordinary memory while anything still views them)."""
        if self._finalizer is not None:
            self._finalizer()
        self.registered = False


@dataclass(frozen=True)
class _Layout:
    """Where each swapped Linear weight of a block kind lives inside one flat buffer (bytes)."""

    shapes: tuple[torch.Size, ...]
    dtypes: tuple[torch.dtype, ...]
    offsets: tuple[int, ...]
    nbytes: int

    @staticmethod
    def of(weights: list[Tensor]) -> "_Layout":
        # weights of one dtype lie back to back, so the block's buffer is also one tensor of that dtype (fp8.py
        # upcasts it in one cast); mixed dtypes start every weight on a 16-byte boundary
        align = weights[0].element_size() if len({w.dtype for w in weights}) == 1 else 16
        offsets, at = [], 0
        for w in weights:
            at = _round_up(at, align)
            offsets.append(at)
            at += w.numel() * w.element_size()
        return _Layout(tuple(w.shape for w in weights), tuple(w.dtype for w in weights), tuple(offsets), at)

    def views(self, flat: Tensor) -> list[Tensor]:
        out = []
        for shape, dtype, at in zip(self.shapes, self.dtypes, self.offsets):
            size = shape.numel() * torch.empty((), dtype=dtype).element_size()
            out.append(flat[at:at + size].view(dtype).view(shape))
        return out


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
    """`count` device-side buffers of one block kind's streamed weights: one flat allocation per slot, the weights
    views into it at the layout's offsets, so loading a block is one copy."""

    def __init__(self, layout: _Layout, count: int, device: torch.device):
        self.flat = [torch.empty(layout.nbytes, dtype=torch.uint8, device=device) for _ in range(count)]
        self.tensors = [layout.views(flat) for flat in self.flat]
        self.owner: list[tuple[str, int] | None] = [None] * count
        self.last_use = [0] * count
        self.ready: list[Any] = [None] * count  # CUDA event: the copy into the slot is done


class BlockSwapRunner:
    """Streams the frozen weights of the last `blocks_to_swap` blocks (sd-scripts' count) from `host_device` into
    `slots` device-side slots per block kind on `compute_device` (see the module docstring). Resident blocks run
    plainly, or checkpointed with `checkpointing`. `bind(flux)` (called by `memory.install`) sets it up, all or
    nothing; `release()` puts every weight back into an ordinary tensor, the whole model on one device.
    `pin_host`: page-lock the host copies (default: when computing on CUDA from CPU memory)."""

    def __init__(self, blocks_to_swap: int, checkpointing: bool = False, *, compute_device=None,
                 host_device="cpu", slots: int = 2, pin_host: bool | None = None):
        if slots < 1:
            raise ValueError(f"block swap needs at least one slot per block kind, not {slots}")
        self.blocks_to_swap = blocks_to_swap
        self.checkpointing = checkpointing
        self.compute_device = torch.device(compute_device) if compute_device is not None else None
        self.host_device = torch.device(host_device)
        self.slot_count = slots
        self.pin_host = pin_host
        self.plan: SwapPlan | None = None
        self.loads = 0
        self.bytes_streamed = 0
        self.max_resident = 0
        self.max_resident_by_kind = {"double": 0, "single": 0}
        self._flux: weakref.ref | None = None
        self._linears: dict[tuple[str, int], list[nn.Linear]] = {}
        self._layouts: dict[str, _Layout] = {}
        self._host: dict[tuple[str, int], _HostBuffer] = {}
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
        """Take the swapped blocks' weights out of `flux` and move the rest to the compute device. All or nothing:
        the slots are allocated before any weight changes, and a failure (out of memory in the slots or the move)
        leaves every parameter and buffer where and what it was, nothing pinned."""
        if self._bound:
            raise RuntimeError("this block-swap runner is already bound to a model")
        device = self.compute_device or flux.img_in.weight.device
        plan = swap_plan(self.blocks_to_swap, len(flux.double_blocks), len(flux.single_blocks), self.slot_count)
        linears, layouts = self._swapped_linears(flux, plan)
        pin = self.pin_host if self.pin_host is not None else (device.type == "cuda" and self.host_device.type == "cpu")
        undo: list[Callable[[], None]] = []
        host: dict[tuple[str, int], _HostBuffer] = {}
        try:
            side = torch.cuda.Stream(device) if device.type == "cuda" else None
            slots = {kind: _Slots(layout, min(self.slot_count, sum(1 for k in linears if k[0] == kind)), device)
                     for kind, layout in layouts.items()}
            for key, block_linears in linears.items():
                host[key] = self._host_copy(block_linears, layouts[key[0]], pin, side)
            for block_linears in linears.values():
                for m in block_linears:
                    _set_parameter(m, "weight", self._placeholder(m.weight.dtype, device), undo)
            _move_module(flux, device, undo)
        except BaseException:
            for step in reversed(undo):
                step()
            for buffer in host.values():
                buffer.unregister()
            self._placeholders.clear()
            raise
        self.compute_device, self.plan, self._side = device, plan, side
        self._linears, self._layouts, self._host, self._slots = linears, layouts, host, slots
        order = list(linears)
        for i, key in enumerate(order):
            self._prev[key] = order[i - 1] if i else None
            self._next[key] = order[i + 1] if i + 1 < len(order) else None
        self._flux = weakref.ref(flux)
        self._bound = True

    def _swapped_linears(self, flux: nn.Module, plan: SwapPlan):
        """The Linears of every swapped block, checked before anything changes, and one layout per block kind."""
        linears: dict[tuple[str, int], list[nn.Linear]] = {}
        layouts: dict[str, _Layout] = {}
        for kind, blocks, count in (("double", flux.double_blocks, plan.double),
                                    ("single", flux.single_blocks, plan.single)):
            for index in range(len(blocks) - count, len(blocks)):
                named = [(n, m) for n, m in blocks[index].named_modules() if isinstance(m, nn.Linear)]
                trainable = [n for n, m in named if m.weight.requires_grad]
                if trainable:
                    raise ValueError(f"block swap streams frozen weights only: {kind} block {index} has trainable "
                                     f"Linear weights ({', '.join(trainable[:3])}); call requires_grad_(False)")
                layout = _Layout.of([m.weight for _, m in named])
                if layouts.setdefault(kind, layout) != layout:
                    raise ValueError(f"{kind} block {index}: its weights differ in shape or dtype from the other "
                                     f"swapped {kind} blocks; slots need one layout per kind")
                linears[(kind, index)] = [m for _, m in named]
        return linears, layouts

    def _host_copy(self, linears: list[nn.Linear], layout: _Layout, pin: bool, side) -> _HostBuffer:
        """The block's weights copied into one host buffer. Weights already in host memory are pointed at their copy
        at once (same values, same device; a rollback leaves them there), so host memory never holds two copies of
        more than one block; weights elsewhere are restored by `undo` if `bind` fails."""
        buffer = _HostBuffer(layout.nbytes, pin, side, self.host_device)
        with torch.no_grad():
            for m, view in zip(linears, layout.views(buffer.bytes)):
                view.copy_(m.weight.detach())
                if m.weight.device == self.host_device:
                    m.weight.data = view
        return buffer

    def _placeholder(self, dtype: torch.dtype, device: torch.device | None = None) -> Tensor:
        if dtype not in self._placeholders:
            self._placeholders[dtype] = torch.empty(0, dtype=dtype, device=device or self.compute_device)
        return self._placeholders[dtype]

    def describe(self) -> str:
        plan = self.plan
        where = "pinned host memory" if self._side is not None else f"host memory ({self.host_device})"
        text = (f"block swap: {plan.double} double + {plan.single} single blocks stream from {where} into "
                f"{self.slot_count} slots per block kind on {self.compute_device}")
        return text + (f" ({plan.note})" if plan.note else "")

    def pinned_bytes(self) -> int:
        """Host memory page-locked for the swapped blocks now."""
        return sum(b.bytes.numel() for b in self._host.values() if b.registered or b.torch_pinned)

    def release(self, device=None) -> torch.device | None:
        """Every swapped weight back in an ordinary tensor and the whole model on one device: `device`, else the
        compute device, else (when that runs out of memory) the host device. Waits for the side stream first, so no
        copy is in flight when the slots and host buffers go. Returns the model's device (None if never bound)."""
        if self._released or not self._bound:
            return None
        self._released = True
        if self._side is not None:
            self._side.synchronize()
        self._slots.clear()  # each slot's memory goes as the last weight pointing at it is restored
        self._where.clear()
        flux = self._flux() if self._flux is not None else None
        target = torch.device(device) if device is not None else self.compute_device
        try:
            self._restore_weights(target)
            if flux is not None:
                flux.to(target)
        except torch.OutOfMemoryError:
            if device is not None or target == self.host_device:
                raise
            target = self.host_device
            self._restore_weights(target)
            if flux is not None:
                flux.to(target)
        for buffer in self._host.values():
            buffer.unregister()
        self._host.clear()
        self._linears.clear()
        return target

    def _restore_weights(self, target: torch.device) -> None:
        for key, linears in self._linears.items():
            buffer = self._host[key]
            # a host buffer of our own becomes ordinary memory once unregistered: the weights may keep viewing it;
            # one from torch's pinned allocator would stay pinned, so the weights are copied out of it
            keep = target == buffer.bytes.device and not buffer.torch_pinned
            for m, view in zip(linears, self._layouts[key[0]].views(buffer.bytes)):
                _set_parameter(m, "weight", view if keep else view.to(target, copy=True))

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
            self._wait_for_copy(slots.ready[slot])
            slots.ready[slot] = None

    def _wait_for_copy(self, ready) -> None:
        """The compute stream waits for a slot's copy (bench/gpu_check.py's negative control leaves this out)."""
        torch.cuda.current_stream(self.compute_device).wait_event(ready)

    def _copy_after_compute(self) -> None:
        """The side stream waits for every kernel queued on the compute stream so far: they may still read the slot
        about to be overwritten (bench/gpu_check.py's negative control leaves this out)."""
        self._side.wait_stream(torch.cuda.current_stream(self.compute_device))

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
        host = self._host[key].bytes
        with torch.no_grad():
            if self._side is not None:
                self._copy_after_compute()
                with torch.cuda.stream(self._side):
                    slots.flat[slot].copy_(host, non_blocking=True)
                    slots.ready[slot] = torch.cuda.Event()
                    slots.ready[slot].record(self._side)
                slots.flat[slot].record_stream(self._side)  # freed mid-copy (a failed step), it is not reused early
            else:
                slots.flat[slot].copy_(host)
        for m, dst in zip(self._linears[key], slots.tensors[slot]):
            m.weight.data = dst
        slots.owner[slot] = key
        self._where[key] = slot
        self._clock += 1
        slots.last_use[slot] = self._clock
        self.loads += 1
        self.bytes_streamed += slots.flat[slot].numel()
        self.max_resident = max(self.max_resident, len(self._where))
        by_kind = sum(1 for k in self._where if k[0] == key[0])
        self.max_resident_by_kind[key[0]] = max(self.max_resident_by_kind[key[0]], by_kind)


def _restorer(param: Tensor, data: Tensor) -> Callable[[], None]:
    def restore():
        param.data = data
    return restore


def _set_parameter(module: nn.Module, name: str, data: Tensor, undo: list | None = None) -> None:
    """`module.<name>` now holds `data`, as `Module.to` does it: the same Parameter object when the tensor types
    allow (CPU and CUDA do), else a new one; recorded in `undo` for a rollback."""
    param = module._parameters[name]
    if torch._has_compatible_shallow_copy_type(param, data):
        if undo is not None:
            undo.append(_restorer(param, param.data))
        param.data = data
        return
    if undo is not None:
        undo.append(lambda: module._parameters.__setitem__(name, param))
    module._parameters[name] = nn.Parameter(data, requires_grad=param.requires_grad)


def _move_module(module: nn.Module, device: torch.device, undo: list) -> None:
    """`module.to(device)` for parameters and buffers, each change recorded in `undo` so that a failure halfway
    (out of memory) can be rolled back."""
    for owner in module.modules():
        for name, param in list(owner._parameters.items()):
            if param is not None and param.device != device:
                _set_parameter(owner, name, param.data.to(device), undo)
        for name, buffer in list(owner._buffers.items()):
            if buffer is not None and buffer.device != device:
                moved = buffer.to(device)
                undo.append(lambda owner=owner, name=name, buffer=buffer: owner._buffers.__setitem__(name, buffer))
                owner._buffers[name] = moved
