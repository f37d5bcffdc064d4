"""CPU-offloaded checkpointing (memory.OffloadedCheckpointRunner): each checkpointed block's inputs wait in host
memory between forward and backward, and training computes exactly what plain checkpointing computes. On the CPU
the host copy is still a real copy, so what was offloaded can be counted and checked."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from test_block_swap import WIDE, Trainee, assert_same_training, make_inputs

from trainer import memory
from trainer.events import Message, SilentReporter
from trainer.models.tiny import flux_state_dict


@pytest.fixture(scope="module")
def state():
    return flux_state_dict(WIDE, seed=5)


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@pytest.mark.parametrize("mask", [False, True])
def test_training_with_offloaded_checkpointing_equals_plain_and_checkpointed(state, mask):
    runner = memory.runner_for(True, cpu_offload_checkpointing=True, host_device="cpu")
    assert isinstance(runner, memory.OffloadedCheckpointRunner)
    offloaded = Trainee(state, WIDE, runner)
    assert_same_training(Trainee(state, WIDE), offloaded, mask=mask)
    checkpointed = Trainee(state, WIDE, memory.CheckpointedRunner())
    offloaded_again = Trainee(state, WIDE, memory.OffloadedCheckpointRunner())
    assert_same_training(checkpointed, offloaded_again, steps=2, preview=False, mask=mask)

    # per forward: each block's own inputs once, the inputs every block shares (vec, pe, mask) once
    inputs = make_inputs(WIDE, 0, mask)
    batch, n_img, n_txt, hidden = 2, inputs["img"].shape[1], inputs["txt"].shape[1], WIDE.hidden_size
    stream = 4 * batch * hidden  # float32 bytes per token
    pe = 4 * batch * (n_txt + n_img) * WIDE.head_dim // 2 * 4
    shared = 4 * batch * hidden + pe + (batch * (n_txt + n_img) if mask else 0)
    per_forward = (WIDE.depth * (n_img + n_txt) * stream + WIDE.depth_single_blocks * (n_img + n_txt) * stream
                   + shared)
    assert runner.bytes_offloaded == per_forward * 3  # three training steps; previews offload nothing
    assert runner.tensors_offloaded == 3 * (2 * WIDE.depth + WIDE.depth_single_blocks + 2 + mask)


def test_saved_inputs_are_host_copies_not_aliases(state):
    runner = memory.OffloadedCheckpointRunner(host_device="cpu")
    trainee = Trainee(state, WIDE, runner)
    seen = {}

    def capture(kind, index):
        def hook(module, args):
            if (kind, index) not in seen:  # the forward's call, not the backward's recomputation
                seen[(kind, index)] = [a for a in args if isinstance(a, torch.Tensor)]
        return hook

    for kind, blocks in (("double", trainee.flux.double_blocks), ("single", trainee.flux.single_blocks)):
        for index, block in enumerate(blocks):
            block.register_forward_pre_hook(capture(kind, index))
    torch.manual_seed(0)
    out = trainee.flux(**make_inputs(WIDE, 0))
    stashes = dict(runner.stashes())
    assert stashes.keys() == seen.keys() and len(stashes) == WIDE.depth + WIDE.depth_single_blocks
    for key, copies in stashes.items():
        inputs = seen[key]
        assert len(copies) == len(inputs)
        for copy, source in zip(copies, inputs):
            assert copy.device == torch.device("cpu") and torch.equal(copy, source)
            assert copy.untyped_storage().data_ptr() != source.untyped_storage().data_ptr(), f"{key}: an alias"
            assert not copy.requires_grad and copy.grad_fn is None
    # shared inputs (vec, pe) are copied once and shared by every block's stash
    first, last = stashes[("double", 0)], stashes[("single", WIDE.depth_single_blocks - 1)]
    assert first[2] is stashes[("single", 0)][1] is last[1]
    out.square().mean().backward()
    assert all(p.grad is not None for p in trainee.network.parameters())


class StreamSpy:
    """Passes every block to `inner`, keeping weak references to the stream inputs the model hands it (img and txt
    of a double block, x of a single block: each block's own, not vec or pe)."""

    def __init__(self, inner):
        self.inner, self.refs = inner, []

    def __call__(self, kind, index, block, *args):
        self.refs += [weakref.ref(a) for a in args[:2 if kind == "double" else 1]]
        return self.inner(kind, index, block, *args)


@pytest.mark.parametrize("runner_type, kept", [(memory.CheckpointedRunner, True),
                                               (memory.OffloadedCheckpointRunner, False)])
def test_the_graph_does_not_keep_block_inputs_on_the_device(state, runner_type, kept):
    """Plain checkpointing keeps every block's inputs alive until backward; offloading keeps only host copies."""
    spy = StreamSpy(runner_type())
    trainee = Trainee(state, WIDE, spy)
    torch.manual_seed(0)
    loss = trainee.flux(**make_inputs(WIDE, 0)).square().mean()
    gc.collect()
    alive = [ref() is not None for ref in spy.refs]
    assert len(alive) == 2 * WIDE.depth + WIDE.depth_single_blocks
    assert all(alive) if kept else not any(alive)
    loss.backward()
    assert all(p.grad is not None for p in trainee.network.parameters())


def test_nothing_is_offloaded_when_nothing_will_backpropagate(state):
    runner = memory.OffloadedCheckpointRunner()
    trainee = Trainee(state, WIDE, runner)
    reference = Trainee(state, WIDE)
    assert torch.equal(trainee.preview(0), reference.preview(0))
    with torch.inference_mode():
        assert torch.equal(trainee.flux(**make_inputs(WIDE, 1)), reference.flux(**make_inputs(WIDE, 1)))
    assert runner.bytes_offloaded == 0


def test_train_with_offloaded_checkpointing_saves_the_same_lora(tokenizer_dirs, tmp_path_factory, tmp_path):
    """Through the real entry point (needs session.prepare to call memory.setup_for_training)."""
    from trainer.loop import train

    from trainspace import config, make_workspace

    ws = make_workspace(tmp_path_factory.mktemp("ws"))
    results = {}
    for name, options in (("checkpointing", {}), ("offloaded", dict(cpu_offload_checkpointing=True))):
        reporter = SilentReporter()
        results[name] = train(config(ws, tokenizer_dirs, tmp_path / name, max_train_steps=3,
                                     gradient_checkpointing=True, **options), reporter)
        said = [e.text for e in reporter.of(Message)]
        if name == "offloaded":
            assert any(t.startswith("CPU-offloaded checkpointing") for t in said), said
    reference, offloaded = results["checkpointing"], results["offloaded"]
    assert offloaded.losses == reference.losses
    assert reference.state_dict.keys() == offloaded.state_dict.keys()
    for key, value in reference.state_dict.items():
        assert torch.equal(value, offloaded.state_dict[key]), key
