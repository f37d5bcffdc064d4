"""Block swap's host buffers, slots and lifetime (trainer/block_swap.py) without a GPU: the CUDA runtime calls are
faked (torch.cuda.cudart() replaced by a recorder), failures are injected, and a 'meta' compute device stands in for
a second device where the placement of every tensor is what is checked."""

from __future__ import annotations

import pytest
import torch
from test_block_swap import WIDE, Trainee, assert_same_training, to_fp8
from torch import nn
from torch.overrides import TorchFunctionMode

from trainer import block_swap, fp8, memory
from trainer.block_swap import PAGE, BlockSwapRunner
from trainer.models.flux import FP8_DTYPES, Flux
from trainer.models.tiny import flux_state_dict

ALREADY_REGISTERED = 712  # cudaErrorHostMemoryAlreadyRegistered


class FakeCudart:
    """Records cudaHostRegister / cudaHostUnregister / cudaGetLastError; `refuse` makes registration fail."""

    def __init__(self, refuse: bool = False):
        self.refuse = refuse
        self.registered: list[tuple[int, int, int]] = []
        self.unregistered: list[int] = []
        self.last_error_reads = 0
        self.last_error = 0

    def cudaHostRegister(self, ptr, size, flags):  # noqa: N802 (the runtime's names)
        if self.refuse:
            self.last_error = ALREADY_REGISTERED
            return ALREADY_REGISTERED
        self.registered.append((ptr, size, flags))
        return 0

    def cudaHostUnregister(self, ptr):  # noqa: N802
        self.unregistered.append(ptr)
        return 0

    def cudaGetLastError(self):  # noqa: N802
        self.last_error_reads += 1
        error, self.last_error = self.last_error, 0
        return error

    def still_registered(self) -> set[int]:
        return {ptr for ptr, _, _ in self.registered} - set(self.unregistered)


@pytest.fixture
def cudart(monkeypatch):
    fake = FakeCudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    return fake


@pytest.fixture(scope="module")
def wide_state():
    return flux_state_dict(WIDE, seed=5)


def frozen_flux(state) -> Flux:
    flux = Flux(WIDE)
    flux.load_state_dict(state)
    flux.requires_grad_(False)
    return flux


def swapped_keys(runner: BlockSwapRunner) -> list[tuple[str, int]]:
    return list(runner._linears)


def devices_of(flux: nn.Module) -> set[torch.device]:
    return {t.device for t in [*flux.parameters(), *flux.buffers()]}


def assert_weights_equal(flux: nn.Module, state: dict) -> None:
    after = flux.state_dict()
    assert after.keys() == state.keys()
    for name, value in state.items():
        assert after[name].device == value.device and torch.equal(after[name], value), name


# ------------------------------------------------------------------------------------------------ registration

def test_a_refused_registration_clears_the_cuda_error_and_falls_back(monkeypatch, cudart):
    cudart.refuse = True
    fallback = []
    monkeypatch.setattr(block_swap, "_torch_pinned", lambda n: fallback.append(n) or torch.empty(n, dtype=torch.uint8))
    buffer = block_swap._HostBuffer(3000, pin=True)
    assert cudart.last_error_reads == 1 and cudart.last_error == 0, "the refusal's error is left for the next kernel"
    assert fallback == [3000] and buffer.bytes.numel() == 3000
    assert buffer.torch_pinned and not buffer.registered


def test_one_portable_registration_per_swapped_block_on_whole_pages(wide_state, cudart):
    runner = BlockSwapRunner(5, True, compute_device="cpu", host_device="cpu", pin_host=True)
    reference = Trainee(wide_state, WIDE, memory.runner_for(True))
    swapped = Trainee(wide_state, WIDE, runner)
    keys = swapped_keys(runner)
    assert len(cudart.registered) == len(keys) == runner.plan.double + runner.plan.single
    for (ptr, size, flags), key in zip(cudart.registered, keys):
        assert flags == block_swap.CUDA_HOST_REGISTER_PORTABLE
        assert ptr % PAGE == 0 and size % PAGE == 0
        assert runner._host[key].bytes.data_ptr() == ptr
        assert size - PAGE < runner._layouts[key[0]].nbytes <= size
    assert runner.pinned_bytes() == sum(runner._layouts[k[0]].nbytes for k in keys)
    assert_same_training(reference, swapped, steps=2)
    swapped.network.detach()
    memory.teardown(swapped.flux)
    assert cudart.still_registered() == set() and len(cudart.unregistered) == len(keys)
    assert devices_of(swapped.flux) == {torch.device("cpu")}
    reference.network.detach()
    assert_weights_equal(swapped.flux, wide_state)


# ------------------------------------------------------------------------------------------------ flat slots

class CopyCounter(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.copies = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.copy_:
            self.copies += 1
        return func(*args, **(kwargs or {}))


def test_each_block_is_one_buffer_and_one_copy(wide_state):
    runner = BlockSwapRunner(5, False, compute_device="cpu")
    trainee = Trainee(wide_state, WIDE, runner)
    for key in swapped_keys(runner):
        linears = runner._linears[key]
        host = runner._host[key].bytes
        assert all(m.weight.numel() == 0 for m in linears)
        views = runner._layouts[key[0]].views(host)
        assert [v.shape for v in views] == [tuple(wide_state[n].shape) for n in weight_names(trainee.flux, linears)]
    for slots in runner._slots.values():
        for flat, views in zip(slots.flat, slots.tensors):
            assert {v.untyped_storage().data_ptr() for v in views} == {flat.untyped_storage().data_ptr()}
    counter = CopyCounter()
    loads = runner.loads
    with counter:  # a forward (a mode does not see what the autograd engine runs)
        trainee.preview(0)
    assert runner.loads - loads == len(runner._linears) and counter.copies == runner.loads - loads


def weight_names(flux: nn.Module, linears: list[nn.Module]) -> list[str]:
    names = {id(m): n for n, m in flux.named_modules()}
    return [names[id(m)] + ".weight" for m in linears]


# ------------------------------------------------------------------------------------------------ fp8

class CastCounter(TorchFunctionMode):
    """Sizes of the fp8 tensors cast to a wider dtype."""

    def __init__(self):
        super().__init__()
        self.sizes: list[int] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.to and isinstance(args[0], torch.Tensor) and args[0].dtype in FP8_DTYPES:
            target = kwargs.get("dtype") if kwargs else None
            target = target or next((a for a in args[1:] if isinstance(a, torch.dtype)), None)
            if target is not None and target not in FP8_DTYPES:
                self.sizes.append(args[0].numel())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "scaled"])
def test_swapped_fp8_blocks_upcast_in_one_cast(wide_state, scaled, monkeypatch):
    runner = BlockSwapRunner(5, True, compute_device="cpu")
    reference = Trainee(wide_state, WIDE, memory.runner_for(True), fp8="scaled" if scaled else "plain")
    swapped = Trainee(wide_state, WIDE, runner, fp8="scaled" if scaled else "plain")
    assert fp8.enable(reference.flux) == fp8.enable(swapped.flux) == WIDE.depth + WIDE.depth_single_blocks
    block_sizes = [sum(m.weight.numel() for m in b.modules() if isinstance(m, nn.Linear))
                   for b in [*reference.flux.double_blocks, *reference.flux.single_blocks]]
    runs, real_run = [], fp8._flat_run
    monkeypatch.setattr(fp8, "_flat_run", lambda weights: runs.append(real_run(weights)) or runs[-1])
    counter = CastCounter()
    with counter:  # sees the forward only (a mode does not see what the autograd engine runs)
        swapped.step(0)
    blocks = WIDE.depth + WIDE.depth_single_blocks
    assert sorted(counter.sizes) == sorted(block_sizes[b] for b in range(blocks)), "one cast per block in forward"
    # forward, recomputation and the Linears' backward: each upcast of a block is one cast of one flat run
    assert len(runs) == 3 * blocks and all(r is not None for r in runs)
    assert runner.plan.double and runner.plan.single
    reference.step(0)
    assert_same_training(reference, swapped, steps=2, preview=False)


# ------------------------------------------------------------------------------------------------ bind

@pytest.mark.parametrize("failing", ["slots", "host buffer", "device move"])
def test_bind_is_all_or_nothing(wide_state, monkeypatch, cudart, failing):
    flux = frozen_flux(wide_state)
    tensors = {n: (t, t.data_ptr()) for n, t in [*flux.named_parameters(), *flux.named_buffers()]}
    if failing == "slots":
        def refuse(*args, **kwargs):
            raise torch.OutOfMemoryError("injected: no room for the slots")
        monkeypatch.setattr(block_swap._Slots, "__init__", refuse)
    elif failing == "host buffer":
        made, real = [], block_swap._HostBuffer

        def third_fails(*args):
            if len(made) == 2:
                raise RuntimeError("injected: host allocation failed")
            made.append(real(*args))
            return made[-1]
        monkeypatch.setattr(block_swap, "_HostBuffer", third_fails)
    else:
        real_move = block_swap._move_module

        def move_then_fail(module, device, undo):
            real_move(module, torch.device("meta"), undo)  # every tensor moved, then the device is full
            raise torch.OutOfMemoryError("injected: out of memory in the move")
        monkeypatch.setattr(block_swap, "_move_module", move_then_fail)
    runner = BlockSwapRunner(9, compute_device="cpu", pin_host=True)
    with pytest.raises((torch.OutOfMemoryError, RuntimeError), match="injected"):
        memory.install(flux, runner)
    assert flux.block_runner is None
    assert_weights_equal(flux, wide_state)
    now = dict([*flux.named_parameters(), *flux.named_buffers()])
    assert all(now[n] is t for n, (t, _) in tensors.items()), "parameters and buffers are the same objects"
    plan = block_swap.swap_plan(9, WIDE.depth, WIDE.depth_single_blocks, 2)
    swapped = tuple(f"double_blocks.{i}." for i in range(WIDE.depth - plan.double, WIDE.depth)) + tuple(
        f"single_blocks.{i}." for i in range(WIDE.depth_single_blocks - plan.single, WIDE.depth_single_blocks))
    # the swapped blocks' weights may stay in their host copy (same values, same device); nothing else changed
    moved = [n for n, (t, ptr) in tensors.items() if t.data_ptr() != ptr and not n.startswith(swapped)]
    assert not moved, f"resident tensors were replaced: {moved[:3]}"
    assert cudart.still_registered() == set()
    if failing == "host buffer":
        assert len(cudart.registered) == 2


# ------------------------------------------------------------------------------------------------ release

def test_release_leaves_the_whole_model_on_the_compute_device(wide_state):
    flux = frozen_flux(wide_state)
    runner = BlockSwapRunner(9, compute_device="meta")
    memory.install(flux, runner)
    assert devices_of(flux) == {torch.device("meta")}
    assert runner.release() == torch.device("meta")
    assert devices_of(flux) == {torch.device("meta")}
    shapes = {n: t.shape for n, t in flux.state_dict().items()}
    assert shapes == {n: t.shape for n, t in wide_state.items()}


def test_release_moves_everything_to_the_host_when_the_device_is_full(wide_state, monkeypatch):
    """Here the host is 'meta' (no data: only placement is checked) and the compute device the CPU."""
    flux = frozen_flux(wide_state)
    runner = BlockSwapRunner(9, compute_device="cpu", host_device="meta")
    memory.install(flux, runner)
    real = runner._restore_weights

    def full(target):
        if target.type == "cpu":
            raise torch.OutOfMemoryError("injected: no room for the swapped weights")
        real(target)

    monkeypatch.setattr(runner, "_restore_weights", full)
    assert runner.release() == torch.device("meta")
    assert devices_of(flux) == {torch.device("meta")}


def test_teardown_to_a_chosen_device(wide_state):
    flux = frozen_flux(wide_state)
    memory.install(flux, BlockSwapRunner(9, compute_device="cpu"))
    memory.teardown(flux, device="meta")
    assert flux.block_runner is None
    assert devices_of(flux) == {torch.device("meta")}


class FakeSideStream:
    def __init__(self, runner):
        self.runner, self.slots_when_synchronized = runner, []

    def synchronize(self):
        self.slots_when_synchronized.append(len(self.runner._slots))


def test_release_waits_for_the_side_stream_before_freeing(wide_state):
    flux = frozen_flux(wide_state)
    runner = BlockSwapRunner(9, compute_device="cpu")
    memory.install(flux, runner)
    side = runner._side = FakeSideStream(runner)
    memory.teardown(flux)
    assert side.slots_when_synchronized and side.slots_when_synchronized[0] > 0, "slots freed before the wait"
    assert_weights_equal(flux, wide_state)


# ------------------------------------------------------------------------------------------------ cudagraphs

@pytest.mark.parametrize("options", [dict(blocks_to_swap=4), dict(cpu_offload_checkpointing=True)])
def test_cudagraphs_is_refused_with_swap_or_offload(options):
    with pytest.raises(ValueError, match="cudagraphs cannot be used with"):
        memory.runner_for(True, compile_backend="cudagraphs", **options)
    assert isinstance(memory.runner_for(True, compile_backend="cudagraphs"), memory.CompiledRunner)
    assert memory.compile_backend_refusal("inductor", 4, False) is None


def test_fp8_to_bf16_upcast_of_swapped_fp8_weights_is_exact(wide_state):
    """The flat layout keeps every fp8 byte where the per-weight copy put it (guard for the views' offsets)."""
    flux = frozen_flux(wide_state)
    to_fp8(flux, scaled=False)
    before = {n: t.clone() for n, t in flux.state_dict().items()}
    runner = BlockSwapRunner(9, compute_device="cpu")
    memory.install(flux, runner)
    for key in swapped_keys(runner):
        runner._ensure(key)
        for name, m in zip(weight_names(flux, runner._linears[key]), runner._linears[key]):
            assert m.weight.dtype == torch.float8_e4m3fn
            assert torch.equal(m.weight.view(torch.uint8), before[name].view(torch.uint8)), name


@pytest.mark.parametrize("options", [{"blocks_to_swap": 4}, {"cpu_offload_checkpointing": True,
                                                              "gradient_checkpointing": True}])
def test_cudagraphs_with_swap_or_offload_is_refused_before_anything_loads(options):
    from trainer.config import ConfigError, TrainConfig

    files = dict(pretrained_model_name_or_path="f", clip_l="c", t5xxl="t", ae="a", train_data_dir="d")
    with pytest.raises(ConfigError, match="dynamo_backend cudagraphs cannot be used with blocks_to_swap"):
        TrainConfig.from_flags(**files, torch_compile=True, dynamo_backend="cudagraphs", **options)
    TrainConfig.from_flags(**files, torch_compile=True, dynamo_backend="inductor", **options)
