"""Block runners: how the FLUX transformer runs each of its blocks.

`Flux.forward` hands every block to `flux.block_runner(kind, index, block, *args)`, so memory strategies plug in here
without editing the model: activation checkpointing, CPU-offloaded checkpointing, block swap (`block_swap.py`) and
per-block `torch.compile`. `runner_for` maps the training options to a runner, `install` puts it on a model, and
`setup_for_training` / `teardown` are what a training run calls.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Protocol

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torch.utils.weak import WeakTensorKeyDictionary

from .block_swap import BlockSwapRunner, _device_of, _Job, recompute, swap_plan
from .models.flux import Flux

__all__ = ["BlockRunner", "PlainRunner", "CheckpointedRunner", "OffloadedCheckpointRunner", "BlockSwapRunner",
           "CompiledRunner", "runner_for", "install", "setup_for_training", "teardown", "swap_plan"]


class BlockRunner(Protocol):
    def __call__(self, kind: str, index: int, block: nn.Module, *args: Any) -> Any:
        """Run `block(*args)`; kind is "double" or "single", index the block's position in its list."""


class PlainRunner:
    def __call__(self, kind: str, index: int, block: nn.Module, *args: Any) -> Any:
        return block(*args)


class CheckpointedRunner:
    """Keeps only each block's inputs and recomputes its activations in backward; plain when nothing will
    backpropagate (eval or no_grad), where checkpointing would only cost time."""

    def __call__(self, kind: str, index: int, block: nn.Module, *args: Any) -> Any:
        if block.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)


# ------------------------------------------------------------------------------------- offloaded checkpointing

class _HostCopy:
    """One saved input in host memory: copied out in the forward (asynchronously on a side stream on CUDA) and
    back to its device for the block's recomputation, prefetched while the block after it recomputes."""

    def __init__(self, t: Tensor, host: torch.device, side):
        self.device, self.version, self.side = t.device, t._version, side
        self.source = weakref.ref(t)
        self.host = torch.empty(t.shape, dtype=t.dtype, device=host, pin_memory=side is not None)
        self._back = self._ready = None
        with torch.no_grad():
            if side is None:
                self.host.copy_(t)
                self._copied = None
            else:
                side.wait_stream(torch.cuda.current_stream(t.device))  # t has been computed
                with torch.cuda.stream(side):
                    self.host.copy_(t, non_blocking=True)
                    self._copied = torch.cuda.Event()
                    self._copied.record(side)
                t.record_stream(side)  # t's memory is not reused before the copy has read it

    def prefetch(self) -> None:
        if self._back is not None or self.side is None:
            return
        with torch.no_grad(), torch.cuda.stream(self.side):  # after the copy out, on the same stream
            self._back = self.host.to(self.device, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record(self.side)

    def fetch(self) -> Tensor:
        """The input on its device again; each call hands out its own tensor (the block frees it after use)."""
        back, self._back = self._back, None
        with torch.no_grad():
            if back is None:
                if self.side is None:
                    return self.host.to(self.device, copy=True)
                current = torch.cuda.current_stream(self.device)
                current.wait_event(self._copied)
                return self.host.to(self.device, non_blocking=True)
            current = torch.cuda.current_stream(self.device)
            current.wait_event(self._ready)
            back.record_stream(current)
            return back


class _Packed:
    __slots__ = ("key", "items", "__weakref__")

    def __init__(self, key, items):
        self.key, self.items = key, items


class OffloadedCheckpointRunner:
    """Checkpointing whose kept inputs wait in host memory (pinned, copied on a side stream when computing on CUDA)
    instead of on the compute device; each block's inputs come back for its recomputation, the previous block's
    while this one recomputes. Inputs shared by every block (vec, pe) are copied once per forward. On the CPU the
    host copy is still a real copy: `bytes_offloaded` counts what was copied out."""

    def __init__(self, host_device="cpu"):
        self.host_device = torch.device(host_device)
        self.bytes_offloaded = 0
        self.tensors_offloaded = 0
        self._copies = WeakTensorKeyDictionary()  # device tensor -> its host copy (shared inputs)
        self._trail: list[weakref.ref] = []  # this forward's packs, in block order
        self._sides: dict[torch.device, Any] = {}

    def __call__(self, kind: str, index: int, block: nn.Module, *args: Any) -> Any:
        if not (block.training and torch.is_grad_enabled()):
            return block(*args)
        key = (kind, index)
        last = self._last()
        if key == ("double", 0) or (key == ("single", 0) and (last is None or last.key[0] == "single")):
            self._trail = []  # a new forward
        trail = self._trail
        position = len(trail)
        device = _device_of(args)

        def pack(values):
            packed = _Packed(key, [self._copy(v) if isinstance(v, Tensor) else v for v in values])
            trail.append(weakref.ref(packed))
            return packed

        def unpack(packed):
            return [v.fetch() if isinstance(v, _HostCopy) else v for v in packed.items]

        def before_backward():
            previous = trail[position - 1]() if position else None
            for v in previous.items if previous is not None else ():
                if isinstance(v, _HostCopy):
                    v.prefetch()

        return recompute(_Job(block, device, pack, unpack, before_backward), *args)

    def _last(self) -> _Packed | None:
        return self._trail[-1]() if self._trail else None

    def _copy(self, t: Tensor) -> _HostCopy:
        known = self._copies.get(t)
        if known is not None and known.version == t._version:
            return known
        side = None
        if t.device.type == "cuda":
            side = self._sides.get(t.device) or self._sides.setdefault(t.device, torch.cuda.Stream(t.device))
        copy = _HostCopy(t, self.host_device, side)
        self._copies[t] = copy
        self.bytes_offloaded += t.numel() * t.element_size()
        self.tensors_offloaded += 1
        return copy

    def stashes(self) -> list[tuple[tuple[str, int], list[Tensor]]]:
        """The host copies kept for the backward of the last forward, per block (for tests and diagnostics)."""
        live = [ref() for ref in self._trail]
        return [(p.key, [v.host for v in p.items if isinstance(v, _HostCopy)]) for p in live if p is not None]

    def describe(self) -> str:
        return f"CPU-offloaded checkpointing: each block's kept inputs wait in {self.host_device} memory"


# ------------------------------------------------------------------------------------------- torch.compile

class _CompiledBlock:
    """A block's compiled callable that still answers `training` like the block."""

    def __init__(self, block: nn.Module, compiled: Callable[..., Any]):
        self.block, self.compiled = block, compiled

    def __call__(self, *args):
        return self.compiled(*args)

    @property
    def training(self) -> bool:
        return self.block.training


class CompiledRunner:
    """sd-scripts' --torch_compile: each block wrapped once in `torch.compile(block, backend=...)`, then run by
    `inner` (plain, checkpointed, offloaded or swapped) like the block itself."""

    def __init__(self, inner: BlockRunner, backend: str = "inductor"):
        self.inner, self.backend = inner, backend
        self._compiled: dict[tuple[str, int], _CompiledBlock] = {}

    def __call__(self, kind: str, index: int, block: nn.Module, *args: Any) -> Any:
        entry = self._compiled.get((kind, index))
        if entry is None or entry.block is not block:
            entry = self._compiled[(kind, index)] = _CompiledBlock(block, torch.compile(block, backend=self.backend))
        return self.inner(kind, index, entry, *args)

    def bind(self, flux: Flux) -> None:
        if hasattr(self.inner, "bind"):
            self.inner.bind(flux)

    def release(self, device=None) -> torch.device | None:
        self._compiled.clear()
        if hasattr(self.inner, "release"):
            return self.inner.release(device) if device is not None else self.inner.release()
        return None

    def describe(self) -> str:
        inner = self.inner.describe() + "; " if hasattr(self.inner, "describe") else ""
        return f"{inner}each block compiled with torch.compile (backend {self.backend})"


# ------------------------------------------------------------------------------------------------ choosing

def compile_backend_refusal(backend: str | None, blocks_to_swap: int | None,
                            cpu_offload_checkpointing: bool) -> str | None:
    """Why `backend` cannot compile the blocks with these options, None if it can. CUDA graphs replay fixed device
    addresses, but a swapped block's weights are in one of several slots in turn and an offloaded block's inputs come
    back in fresh memory each step: a replay would read the wrong slot or freed memory."""
    if backend is None or str(backend).lower() != "cudagraphs":
        return None
    if blocks_to_swap:
        return ("dynamo_backend cudagraphs cannot be used with blocks_to_swap: a swapped block's weights change "
                "address from step to step (choose inductor, or no block swap)")
    if cpu_offload_checkpointing:
        return ("dynamo_backend cudagraphs cannot be used with cpu_offload_checkpointing: the inputs brought back "
                "for each recomputation change address (choose inductor, or no offloading)")
    return None


def runner_for(gradient_checkpointing: bool, cpu_offload_checkpointing: bool = False,
               blocks_to_swap: int | None = None, *, compute_device=None, host_device=None,
               compile_backend: str | None = None) -> BlockRunner:
    host = host_device if host_device is not None else "cpu"
    if cpu_offload_checkpointing and not gradient_checkpointing:
        raise ValueError("cpu_offload_checkpointing needs gradient checkpointing")
    if cpu_offload_checkpointing and blocks_to_swap:
        raise ValueError("blocks_to_swap and cpu_offload_checkpointing cannot be used together")
    refused = compile_backend_refusal(compile_backend, blocks_to_swap, cpu_offload_checkpointing)
    if refused:
        raise ValueError(refused)
    if blocks_to_swap:
        runner = BlockSwapRunner(blocks_to_swap, gradient_checkpointing, compute_device=compute_device,
                                 host_device=host)
    elif cpu_offload_checkpointing:
        runner = OffloadedCheckpointRunner(host)
    else:
        runner = CheckpointedRunner() if gradient_checkpointing else PlainRunner()
    return CompiledRunner(runner, compile_backend) if compile_backend else runner


def install(flux: Flux, runner: BlockRunner | None) -> None:
    """Make `runner` run every block of `flux`; None restores the model's own `gradient_checkpointing` switch. A
    runner with `bind(flux)` (block swap) is set up here; the runner replaced is released if it holds anything."""
    if isinstance(runner, nn.Module):
        # nn.Module.__setattr__ would register it as a submodule: saved in state_dict, moved by .to().
        raise TypeError(f"a block runner must not be an nn.Module (got {type(runner).__name__})")
    previous = flux.block_runner
    if previous is not None and previous is not runner and hasattr(previous, "release"):
        previous.release()
    flux.block_runner = None
    if runner is not None and runner is not previous and hasattr(runner, "bind"):
        runner.bind(flux)  # on failure the model is left with no runner, every weight in place
    flux.block_runner = runner


def setup_for_training(flux: Flux, memory, device: torch.device | str, emit: Callable[[str], None]) -> BlockRunner:
    """Build the runner the memory section asks for (gradient_checkpointing, cpu_offload_checkpointing, blocks_to_swap,
    torch_compile + dynamo_backend), install it on `flux` and say in one message what it does."""
    device = torch.device(device)
    backend = None
    if getattr(memory, "torch_compile", False):
        backend = str(getattr(memory, "dynamo_backend", None) or "inductor").lower()
        backend = "inductor" if backend == "no" else backend
    runner = runner_for(memory.gradient_checkpointing, memory.cpu_offload_checkpointing, memory.blocks_to_swap,
                        compute_device=device, host_device="cpu", compile_backend=backend)
    install(flux, runner)
    swapping_or_offloading = bool(memory.blocks_to_swap) or memory.cpu_offload_checkpointing
    if hasattr(runner, "describe"):
        text = runner.describe()
    else:
        text = ("gradient checkpointing: each block's activations are recomputed in backward"
                if memory.gradient_checkpointing else "blocks run plainly (no checkpointing, swap or offload)")
    if swapping_or_offloading and device.type == "cpu":
        text += "; training on the CPU, so this saves no memory (host and compute device are the same)"
    emit(text)
    return runner


def teardown(flux: Flux, device: torch.device | str | None = None) -> None:
    """Release what the installed runner holds and uninstall it: block swap waits for its side stream, gives back
    its slots and pinned host copies and leaves the whole model on one device (`device`, else the compute device,
    else the host when that has no room). A training run calls this in its `finally`, after a failed step too."""
    runner = flux.block_runner
    flux.block_runner = None
    if runner is not None and hasattr(runner, "release"):
        runner.release(device) if device is not None else runner.release()
