"""Block swap (trainer/block_swap.py): the last blocks' frozen weights stream from host memory into a few device
slots, and training computes exactly what it computes without swapping. Host and compute device are both the CPU
here; the slots are still distinct memory, so residency is real and checked at every block call."""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch
from flux_inputs import random_inputs
from torch import nn

from trainer import memory
from trainer.block_swap import BlockSwapRunner, swap_plan
from trainer.events import Message, SilentReporter
from trainer.lora import LoRAConfig, LoRANetwork
from trainer.models.flux import Flux
from trainer.models.tiny import TINY_FLUX, flux_state_dict

# 4 double + 6 single blocks: room to swap several blocks of each kind through 2 slots
WIDE = dataclasses.replace(TINY_FLUX, depth=4, depth_single_blocks=6)
STEPS = 3


def make_inputs(params, step: int, mask: bool = False) -> dict:
    return random_inputs(params, 1000 + step, mask)


def to_fp8(flux: Flux, scaled: bool) -> None:
    """Block Linear weights stored in float8_e4m3fn (with a per-layer `weight_scale` when `scaled`)."""
    for block in [*flux.double_blocks, *flux.single_blocks]:
        for m in block.modules():
            if isinstance(m, nn.Linear):
                w = m.weight.detach()
                scale = w.abs().max() / torch.finfo(torch.float8_e4m3fn).max if scaled else None
                m.weight = nn.Parameter((w / scale if scaled else w).to(torch.float8_e4m3fn), requires_grad=False)
                if scaled:
                    m.weight_scale = scale.reshape(())


class Trainee:
    """A frozen tiny FLUX with a LoRA (dropout on, so random draws must replay) and AdamW, stepped in lockstep with
    others: every step reseeds the global RNG, so two trainees draw the same numbers."""

    def __init__(self, state, params, runner=None, fp8=None, lora=None):
        self.params = params
        self.flux = Flux(params)
        self.flux.load_state_dict(state)
        self.flux.requires_grad_(False)
        if fp8 is not None:
            to_fp8(self.flux, scaled=fp8 == "scaled")
        if runner is not None:
            memory.install(self.flux, runner)
        torch.manual_seed(7)  # the same LoRA initialisation for every trainee
        config = lora or LoRAConfig(network_dim=4, network_alpha=4, network_dropout=0.1, rank_dropout=0.1)
        self.network = LoRANetwork.create(config, self.flux).attach()
        self.optimizer = torch.optim.AdamW(self.network.parameters(), lr=1e-2)
        self.flux.train()
        self.network.train()

    def step(self, step: int, mask: bool = False):
        torch.manual_seed(step)
        loss = self.flux(**make_inputs(self.params, step, mask)).square().mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in self.network.named_parameters()}
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach(), grads

    @torch.no_grad()
    def preview(self, step: int):
        self.flux.eval()
        self.network.eval()
        try:
            return self.flux(**make_inputs(self.params, 100 + step))
        finally:
            self.flux.train()
            self.network.train()


def assert_same_training(reference: Trainee, other: Trainee, steps: int = STEPS, preview: bool = True,
                         mask: bool = False) -> None:
    for step in range(steps):
        loss, grads = reference.step(step, mask)
        other_loss, other_grads = other.step(step, mask)
        assert torch.equal(loss, other_loss), f"step {step}: loss {other_loss} != {loss}"
        assert grads.keys() == other_grads.keys()
        different = [n for n, g in grads.items() if not torch.equal(g, other_grads[n])]
        assert not different, f"step {step}: LoRA gradients differ for {different[:4]}"
        assert any(g.abs().sum() > 0 for g in grads.values())
        if preview:
            assert torch.equal(reference.preview(step), other.preview(step)), f"preview after step {step} differs"
    for (name, p), q in zip(reference.network.named_parameters(), other.network.parameters()):
        assert torch.equal(p, q), f"LoRA weight {name} differs after training"


def watch_residency(trainee: Trainee, runner: BlockSwapRunner) -> list:
    """At every call of every swapped Linear (forward and backward recomputation): its weight lives in a device slot,
    its block is resident, and no more blocks of a kind are resident than there are slots. Returns the call log."""
    calls = []
    slots = runner.slot_pointers()
    for kind, blocks in (("double", trainee.flux.double_blocks), ("single", trainee.flux.single_blocks)):
        for index, block in enumerate(blocks):
            for m in block.modules():
                if isinstance(m, nn.Linear) and m.weight.numel() == 0:
                    def check(module, args, key=(kind, index)):
                        resident = runner.resident()
                        assert key in resident, f"{key} ran while not resident ({resident})"
                        assert module.weight.data_ptr() in slots, f"{key} ran on weights outside the slots"
                        for k in ("double", "single"):
                            assert sum(r[0] == k for r in resident) <= runner.slot_count
                        calls.append(key)
                    m.register_forward_pre_hook(check)
    return calls


@pytest.fixture(scope="module")
def wide_state():
    return flux_state_dict(WIDE, seed=5)


@pytest.fixture(scope="module")
def tiny_state():
    return flux_state_dict(TINY_FLUX, seed=5)


# ------------------------------------------------------------------------------------------------ the plan

def counts(plan) -> tuple[int, int]:
    return plan.double, plan.single


def test_swap_plan_maps_the_count_as_sd_scripts_and_fits_small_models():
    assert counts(swap_plan(18, 19, 38)) == (9, 18) and swap_plan(18, 19, 38).note is None
    assert counts(swap_plan(35, 19, 38)) == (17, 36)
    assert counts(swap_plan(1, 19, 38)) == (0, 2)
    assert counts(swap_plan(0, 19, 38)) == (0, 0)
    # with two slots per kind, two more blocks of each kind stream: the device holds as much as in sd-scripts
    assert counts(swap_plan(18, 19, 38, slots=2)) == (11, 20)
    assert counts(swap_plan(1, 19, 38, slots=2)) == (0, 4)
    assert counts(swap_plan(35, 19, 38, slots=2)) == (18, 37) and swap_plan(35, 19, 38, slots=2).note is None
    small = swap_plan(2, 2, 2)
    assert counts(small) == (1, 1)
    assert "2 double and 2 single" in small.note and "1 double + 1 single are swapped" in small.note
    with pytest.raises(ValueError, match="0-35"):
        swap_plan(36, 19, 38)


# ------------------------------------------------------------------------------------------------ training

@pytest.mark.parametrize("params_name, blocks_to_swap, checkpointing, slots", [
    ("wide", 1, False, 2),
    ("wide", 3, True, 2),
    ("wide", 5, False, 2),
    ("wide", 9, True, 2),   # more than the model has: 3 double + 5 single
    ("wide", 9, False, 1),  # one slot per kind: no prefetch within a kind, still exact
    ("tiny", 2, False, 2),  # the most the 2 + 2 test model allows
    ("tiny", 35, True, 2),
])
def test_training_with_block_swap_equals_training_without(wide_state, tiny_state, params_name, blocks_to_swap,
                                                          checkpointing, slots):
    params, state = (WIDE, wide_state) if params_name == "wide" else (TINY_FLUX, tiny_state)
    runner = BlockSwapRunner(blocks_to_swap, checkpointing, compute_device="cpu", host_device="cpu", slots=slots)
    reference = Trainee(state, params, memory.runner_for(checkpointing))
    swapped = Trainee(state, params, runner)
    plan = swap_plan(blocks_to_swap, params.depth, params.depth_single_blocks, slots)
    assert runner.plan == plan
    swapped_keys = ([("double", i) for i in range(params.depth - plan.double, params.depth)]
                    + [("single", i) for i in range(params.depth_single_blocks - plan.single,
                                                     params.depth_single_blocks)])
    # every swapped block's weights are out of the model, only what fits in the slots comes back
    empty = {(k, i) for k, blocks in (("double", swapped.flux.double_blocks), ("single", swapped.flux.single_blocks))
             for i, b in enumerate(blocks) if any(m.weight.numel() == 0 for m in b.modules()
                                                   if isinstance(m, nn.Linear))}
    assert empty == set(swapped_keys)
    calls = watch_residency(swapped, runner)

    assert_same_training(reference, swapped)

    assert set(calls) == set(swapped_keys), "every swapped block ran through the slots"
    for kind, count in (("double", plan.double), ("single", plan.single)):
        assert runner.max_resident_by_kind[kind] <= min(slots, count)
        if count:
            assert runner.max_resident_by_kind[kind] >= 1
    assert 1 <= runner.max_resident <= 2 * slots
    assert len(runner.resident()) <= 2 * slots
    assert runner.loads >= len(swapped_keys) and runner.bytes_streamed > 0
    # the LoRA parameters never moved: still in the network, still the optimizer's
    opt_params = {id(p) for g in swapped.optimizer.param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in swapped.network.parameters()}
    assert all(p.data_ptr() not in runner.slot_pointers() for p in swapped.network.parameters())


@pytest.mark.parametrize("fp8", ["plain", "scaled"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_block_swap_streams_fp8_weights_as_stored(wide_state, fp8, checkpointing):
    runner = BlockSwapRunner(5, checkpointing, compute_device="cpu", host_device="cpu")
    reference = Trainee(wide_state, WIDE, memory.runner_for(checkpointing), fp8=fp8)
    swapped = Trainee(wide_state, WIDE, runner, fp8=fp8)
    slots = runner._slots["single"].tensors[0]
    assert {t.dtype for t in slots} == {torch.float8_e4m3fn}
    last = swapped.flux.single_blocks[-1].linear1
    assert (last.weight_scale is not None) == (fp8 == "scaled")
    watch_residency(swapped, runner)
    assert_same_training(reference, swapped, steps=2)


def test_attention_masks_pass_through_swapped_blocks(wide_state):
    reference = Trainee(wide_state, WIDE)
    swapped = Trainee(wide_state, WIDE, BlockSwapRunner(4, True, compute_device="cpu"))
    assert_same_training(reference, swapped, steps=2, mask=True)


def test_lora_on_the_input_layers_trains_the_same(wide_state):
    """in_dims puts LoRAs before the blocks, so the blocks' inputs (vec among them) need gradients too."""
    lora = LoRAConfig(network_dim=4, network_alpha=4, in_dims=(4, 4, 4, 4, 4))
    reference = Trainee(wide_state, WIDE, lora=lora)
    swapped = Trainee(wide_state, WIDE, BlockSwapRunner(3, False, compute_device="cpu"), lora=lora)
    loss, grads = reference.step(0)
    other_loss, other_grads = swapped.step(0)
    assert torch.equal(loss, other_loss)
    for name, g in grads.items():
        # the blocks' share of vec's gradient arrives per block instead of per layer: a different summation order
        torch.testing.assert_close(other_grads[name], g, rtol=1e-5, atol=1e-7, msg=name)


# ------------------------------------------------------------------------------------------------ lifecycle

def test_teardown_gives_back_the_original_model(wide_state):
    trainee = Trainee(wide_state, WIDE, BlockSwapRunner(9, True, compute_device="cpu"))
    runner = trainee.flux.block_runner
    trainee.step(0)
    trainee.network.detach()  # compare base weights only
    memory.teardown(trainee.flux)
    assert trainee.flux.block_runner is None
    after = trainee.flux.state_dict()
    assert after.keys() == wide_state.keys()
    for name, value in wide_state.items():
        assert after[name].device == value.device and torch.equal(after[name], value), name
    with pytest.raises(RuntimeError, match="released"):
        runner("double", 0, trainee.flux.double_blocks[0])
    plain = Flux(WIDE)
    plain.load_state_dict(wide_state)
    inputs = make_inputs(WIDE, 0)
    with torch.no_grad():
        assert torch.equal(trainee.flux(**inputs), plain(**inputs))


def test_installing_another_runner_releases_the_swap(wide_state):
    flux = Flux(WIDE)
    flux.load_state_dict(wide_state)
    flux.requires_grad_(False)
    memory.install(flux, BlockSwapRunner(3, compute_device="cpu"))
    assert flux.single_blocks[-1].linear1.weight.numel() == 0
    memory.install(flux, memory.PlainRunner())
    assert torch.equal(flux.single_blocks[-1].linear1.weight, wide_state["single_blocks.5.linear1.weight"])


def test_block_swap_refuses_trainable_base_weights_and_changes_nothing(wide_state):
    flux = Flux(WIDE)
    flux.load_state_dict(wide_state)
    flux.requires_grad_(False)
    flux.single_blocks[-1].linear2.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="frozen weights only: single block 5"):
        memory.install(flux, BlockSwapRunner(9, compute_device="cpu"))
    assert flux.block_runner is None
    assert all(torch.equal(v, wide_state[k]) for k, v in flux.state_dict().items())


def test_inference_mode_forward_between_training_steps(wide_state):
    reference = Trainee(wide_state, WIDE)
    swapped = Trainee(wide_state, WIDE, BlockSwapRunner(5, True, compute_device="cpu"))
    for step in range(2):
        assert_same_training(reference, swapped, steps=1, preview=False)
        with torch.inference_mode():
            inputs = make_inputs(WIDE, 50 + step)
            outputs = []
            for trainee in (reference, swapped):
                torch.manual_seed(step)  # still in training mode: LoRA dropout draws
                outputs.append(trainee.flux(**inputs))
            assert torch.equal(*outputs)


# ------------------------------------------------------------------------------------------------ torch.compile

@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_blocks_train_like_plain_blocks(tiny_state, checkpointing, monkeypatch):
    compiled = []
    original = torch.compile

    def spy(model, **kwargs):
        compiled.append((model, kwargs.get("backend")))
        return original(model, **kwargs)

    monkeypatch.setattr(torch, "compile", spy)
    runner = memory.runner_for(checkpointing, compile_backend="eager")
    assert isinstance(runner, memory.CompiledRunner)
    reference = Trainee(tiny_state, TINY_FLUX, lora=LoRAConfig(network_dim=4, network_alpha=4))
    other = Trainee(tiny_state, TINY_FLUX, runner, lora=LoRAConfig(network_dim=4, network_alpha=4))
    assert_same_training(reference, other, steps=2)
    blocks = [*other.flux.double_blocks, *other.flux.single_blocks]
    assert [m for m, _ in compiled] == blocks and {b for _, b in compiled} == {"eager"}  # once per block


# ------------------------------------------------------------------------------------------------ wiring

def test_runner_for_builds_each_runner():
    assert type(memory.runner_for(False)) is memory.PlainRunner
    assert type(memory.runner_for(True, blocks_to_swap=0)) is memory.CheckpointedRunner
    assert type(memory.runner_for(True, True)) is memory.OffloadedCheckpointRunner
    swap = memory.runner_for(False, blocks_to_swap=4, compute_device="cpu", host_device="cpu")
    assert type(swap) is BlockSwapRunner and not swap.checkpointing and swap.blocks_to_swap == 4
    compiled = memory.runner_for(True, blocks_to_swap=4, compile_backend="eager")
    assert type(compiled.inner) is BlockSwapRunner and compiled.inner.checkpointing
    with pytest.raises(ValueError, match="needs gradient checkpointing"):
        memory.runner_for(False, True)
    with pytest.raises(ValueError, match="together"):
        memory.runner_for(True, True, 4)


def _config(**overrides):
    base = dict(gradient_checkpointing=False, cpu_offload_checkpointing=False, blocks_to_swap=None,
                torch_compile=False, dynamo_backend=None)
    return types.SimpleNamespace(**{**base, **overrides})


@pytest.mark.parametrize("overrides, expected, runner_type", [
    (dict(blocks_to_swap=2), "block swap: 1 double + 1 single blocks", BlockSwapRunner),
    (dict(gradient_checkpointing=True, cpu_offload_checkpointing=True), "CPU-offloaded checkpointing",
     memory.OffloadedCheckpointRunner),
    (dict(gradient_checkpointing=True), "gradient checkpointing", memory.CheckpointedRunner),
    (dict(), "plainly", memory.PlainRunner),
    (dict(torch_compile=True, dynamo_backend="EAGER"), "backend eager", memory.CompiledRunner),
])
def test_setup_for_training_installs_and_says_what_it_did(tiny_state, overrides, expected, runner_type):
    flux = Flux(TINY_FLUX)
    flux.load_state_dict(tiny_state)
    flux.requires_grad_(False)
    said = []
    runner = memory.setup_for_training(flux, _config(**overrides), torch.device("cpu"), said.append)
    assert type(runner) is runner_type and flux.block_runner is runner
    assert len(said) == 1 and expected in said[0]
    moving = overrides.get("blocks_to_swap") or overrides.get("cpu_offload_checkpointing")
    assert ("saves no memory" in said[0]) == bool(moving)
    if overrides.get("blocks_to_swap"):
        assert "one of each stays on the compute device" in said[0]
    memory.teardown(flux)
    assert flux.block_runner is None


# ------------------------------------------------------------------------------------------------ integration

@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from trainspace import make_workspace

    return make_workspace(tmp_path_factory.mktemp("ws"))


def test_train_with_block_swap_saves_the_same_lora(ws, tokenizer_dirs, tmp_path, monkeypatch):
    """Through the real entry point (needs session.prepare to call memory.setup_for_training and the loop's cleanup
    to call memory.teardown)."""
    from trainer.loop import train

    from trainspace import config

    loads = []
    original = BlockSwapRunner._load

    def counting(self, key):
        loads.append(key)
        return original(self, key)

    monkeypatch.setattr(BlockSwapRunner, "_load", counting)
    results = {}
    for name, options in (("plain", {}), ("swap", dict(blocks_to_swap=2)),
                          ("swap+checkpointing", dict(blocks_to_swap=2, gradient_checkpointing=True))):
        reporter = SilentReporter()
        results[name] = train(config(ws, tokenizer_dirs, tmp_path / name, max_train_steps=3, **options), reporter)
        if name != "plain":
            said = [e.text for e in reporter.of(Message)]
            assert any(t.startswith("block swap: 1 double + 1 single") for t in said), said
    assert {k for k in loads if k is not None} == {("double", 1), ("single", 1)}, "block swap never ran"
    reference = results["plain"]
    for name in ("swap", "swap+checkpointing"):
        assert results[name].losses == reference.losses, name
        assert reference.state_dict.keys() == results[name].state_dict.keys()
        for key, value in reference.state_dict.items():
            assert torch.equal(value, results[name].state_dict[key]), f"{name}: {key}"
