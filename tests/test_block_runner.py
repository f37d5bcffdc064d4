"""Block runners (trainer/memory.py) change how the transformer's blocks are run, never what they compute."""

import pytest
import torch
from flux_inputs import random_inputs
from torch import nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from trainer import memory
from trainer.models import flux as flux_module
from trainer.models.flux import Flux
from trainer.models.tiny import TINY_FLUX, flux_state_dict

ALL_BLOCKS = ([("double", i) for i in range(TINY_FLUX.depth)]
              + [("single", i) for i in range(TINY_FLUX.depth_single_blocks)])


@pytest.fixture(scope="module")
def state():
    return flux_state_dict(TINY_FLUX, seed=5)


@pytest.fixture(scope="module")
def inputs():
    return random_inputs(TINY_FLUX, 0)


def model(state, runner=None, gradient_checkpointing=False) -> Flux:
    m = Flux(TINY_FLUX)
    m.load_state_dict(state)
    m.gradient_checkpointing = gradient_checkpointing
    if runner is not None:
        memory.install(m, runner)
    return m.train()


def output_and_grads(m: Flux, inputs):
    out = m(**inputs)
    out.square().mean().backward()
    return out.detach(), {name: p.grad for name, p in m.named_parameters()}


@pytest.fixture
def checkpoint_calls(monkeypatch):
    """Spy on the torch.utils.checkpoint.checkpoint that memory.py and flux.py call; counts calls per module."""
    calls = {"memory": 0, "flux": 0}

    def spy(where):
        def checkpoint(*args, **kwargs):
            calls[where] += 1
            return torch_checkpoint(*args, **kwargs)
        return checkpoint

    monkeypatch.setattr(memory, "checkpoint", spy("memory"))
    monkeypatch.setattr(flux_module, "checkpoint", spy("flux"))
    return calls


class Recorder:
    def __init__(self):
        self.seen = []

    def __call__(self, kind, index, block, *args):
        self.seen.append((kind, index, block))
        return block(*args)


def test_checkpointed_runner_is_bit_identical_to_plain_and_to_no_runner(state, inputs, checkpoint_calls):
    reference_out, reference_grads = output_and_grads(model(state), inputs)
    assert checkpoint_calls == {"memory": 0, "flux": 0}
    assert len(reference_grads) == len(state) and all(g is not None for g in reference_grads.values())

    variants = {
        "plain": model(state, memory.PlainRunner()),
        "checkpointed": model(state, memory.CheckpointedRunner()),
        "legacy flag": model(state, gradient_checkpointing=True),
    }
    for name, m in variants.items():
        out, grads = output_and_grads(m, inputs)
        assert torch.equal(out, reference_out), name
        assert grads.keys() == reference_grads.keys(), name
        different = [k for k, g in grads.items() if not torch.equal(g, reference_grads[k])]
        assert not different, f"{name}: gradients differ for {different}"
    # every block was really checkpointed, once by the runner and once by the legacy flag
    assert checkpoint_calls == {"memory": len(ALL_BLOCKS), "flux": len(ALL_BLOCKS)}


def test_runner_sees_every_block_once_per_forward_in_order(state, inputs):
    recorder = Recorder()
    m = model(state, recorder)
    expected = [(kind, i, getattr(m, f"{kind}_blocks")[i]) for kind, i in ALL_BLOCKS]
    with torch.no_grad():
        out = m(**inputs)
        assert recorder.seen == expected
        m(**inputs)
        assert recorder.seen == expected + expected
        assert torch.equal(out, model(state)(**inputs))


@pytest.mark.parametrize("mode", ["no_grad", "eval", "inference_mode"])
def test_checkpointed_runner_runs_plainly_when_nothing_will_backpropagate(state, inputs, checkpoint_calls, mode):
    m = model(state, memory.CheckpointedRunner())
    plain = model(state)
    if mode == "eval":
        m.eval(), plain.eval()
        out, expected = m(**inputs), plain(**inputs)
        assert out.requires_grad
    else:
        with torch.no_grad() if mode == "no_grad" else torch.inference_mode():
            out, expected = m(**inputs), plain(**inputs)
    assert checkpoint_calls["memory"] == 0
    assert torch.equal(out, expected)


def test_installed_runner_takes_over_from_the_legacy_flag(state, inputs, checkpoint_calls):
    m = model(state, memory.PlainRunner(), gradient_checkpointing=True)
    m(**inputs).sum().backward()
    assert checkpoint_calls == {"memory": 0, "flux": 0}
    memory.install(m, None)
    m(**inputs).sum().backward()
    assert checkpoint_calls == {"memory": 0, "flux": len(ALL_BLOCKS)}


def test_runner_is_a_plain_attribute_not_part_of_the_model(state):
    m = model(state)
    keys = set(m.state_dict())
    modules = [name for name, _ in m.named_modules()]
    runner = memory.CheckpointedRunner()
    memory.install(m, runner)
    assert m.block_runner is runner
    assert set(m.state_dict()) == keys and [name for name, _ in m.named_modules()] == modules
    with pytest.raises(TypeError, match="nn.Module"):
        memory.install(m, nn.Identity())
    assert m.block_runner is runner


def test_runner_for_maps_options_to_runners():
    assert type(memory.runner_for(False)) is memory.PlainRunner
    assert type(memory.runner_for(True)) is memory.CheckpointedRunner
    assert type(memory.runner_for(True, blocks_to_swap=0)) is memory.CheckpointedRunner
    assert type(memory.runner_for(False, False, None)) is memory.PlainRunner
    # offloading, swapping and compiling runners: tests/test_block_swap.py, tests/test_offload_checkpointing.py
