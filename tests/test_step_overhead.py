"""Per-step overhead (issue 18, item 6): the finite checks and --scale_weight_norms read the device once per step,
with multi-tensor norms, and give exactly what the per-tensor code gave (the old code is the oracle here).

A host read is what makes a CUDA device synchronise: `.item()`, `.tolist()`, `bool()`, `float()`, `int()` of a
tensor. On the CPU nothing synchronises, so the tests count those calls made from the trainer's own code."""

import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import trainer
from trainer.config import LoRAConfig
from trainer.events import SilentReporter, StepEnd
from trainer.loop import train
from trainer.lora import LoRANetwork
from trainer.lora.max_norm import scale_weight_norms
from trainer.models.flux import Flux
from trainer.models.tiny import TINY_FLUX
from trainer.step_checks import all_finite, gradient_norm, read_back

from trainspace import config, make_workspace

TRAINER = str(Path(trainer.__file__).parent)
READS = ("item", "tolist", "__bool__", "__float__", "__int__")


@contextmanager
def host_reads():
    """Every host read of a tensor made by a line of the trainer's code, as (method, file:line)."""
    reads, originals = [], {name: getattr(torch.Tensor, name) for name in READS}

    def counted(name, method):
        def read(self, *args, **kwargs):
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(TRAINER):
                reads.append((name, f"{Path(caller.f_code.co_filename).name}:{caller.f_lineno}"))
            return method(self, *args, **kwargs)
        return read

    for name, method in originals.items():
        setattr(torch.Tensor, name, counted(name, method))
    try:
        yield reads
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)


class ReadsPerStep(SilentReporter):
    def __init__(self, reads):
        super().__init__()
        self.reads, self.marks = reads, []

    def emit(self, event):
        super().emit(event)
        if isinstance(event, StepEnd):
            self.marks.append(len(self.reads))


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("ws"))


def test_a_step_reads_the_device_twice_whatever_the_checks(ws, tokenizer_dirs, tmp_path):
    """The losses and the gradients' finiteness in one read, the weights' finiteness and the max-norm figures of
    every LoRA part in the other: before, each micro-batch's loss, each check and each LoRA part read on its own
    (2 + 2 per LoRA part per step here, ~600-1,200 on FLUX.1)."""
    with host_reads() as reads:
        reporter = ReadsPerStep(reads)
        train(config(ws, tokenizer_dirs, tmp_path, max_train_steps=4, gradient_accumulation_steps=2,
                     scale_weight_norms=0.05, max_grad_norm=0.5), reporter)
    per_step = [b - a for a, b in zip(reporter.marks, reporter.marks[1:])]
    assert len(per_step) == 3 and per_step == [2, 2, 2], (per_step, reads[reporter.marks[0]:reporter.marks[1]])


@torch.no_grad()
def _reference_scale_weight_norms(network, max_norm):
    """The per-part code this replaces (two host reads per LoRA part)."""
    keys_scaled, norms = 0, []
    for lora in network.loras:
        down, up = lora.lora_down.weight, lora.lora_up.weight
        parts = list(zip(up.split(list(lora.splits), dim=0), down.split(lora.rank, dim=0))) if lora.splits \
            else [(up, down)]
        for part_up, part_down in parts:
            product = (part_up.float() @ part_down.float()) * lora.scale
            norm = product.norm().clamp(min=max_norm / 2)
            ratio = norm.clamp(max=max_norm) / norm
            if ratio != 1:
                keys_scaled += 1
                root = ratio.sqrt()
                part_up.mul_(root.to(part_up.dtype))
                part_down.mul_(root.to(part_down.dtype))
            norms.append((product.norm() * ratio).item())
    return keys_scaled, sum(norms) / len(norms), max(norms)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("split", [False, True])
def test_scale_weight_norms_is_bit_for_bit_the_per_part_code(split, dtype):
    def network():
        torch.manual_seed(0)
        net = LoRANetwork.create(LoRAConfig(network_dim=4, network_alpha=2, split_qkv=split), Flux(TINY_FLUX),
                                 dtype=dtype)
        with torch.no_grad():
            for i, lora in enumerate(net.loras):
                lora.lora_up.weight.normal_(std=0.5 if i % 3 else 0.001)
        return net

    ours, reference = network(), network()
    with host_reads() as reads:
        result = scale_weight_norms(ours, 0.5)
    assert len(reads) == 1  # one read for every part's figures
    keys, mean, largest = _reference_scale_weight_norms(reference, 0.5)
    assert (result.keys_scaled, result.average_norm, result.max_norm) == (keys, mean, largest) and keys > 0
    for a, b in zip(ours.parameters(), reference.parameters()):
        assert torch.equal(a, b)


def _grads(*values):
    params = [torch.nn.Parameter(torch.zeros(len(v))) for v in values]
    for p, v in zip(params, values):
        p.grad = torch.tensor(v)
    return torch.optim.SGD(params, lr=0.1), params


@pytest.mark.parametrize("bad", [None, float("nan"), float("inf"), -float("inf")])
def test_the_finite_checks_agree_with_the_per_tensor_sums(bad):
    rows = [[1.0, -2.0], [3.0, 4.0, 5.0], [0.5]]
    if bad is not None:
        rows[1][2] = bad
    optimizer, params = _grads(*rows)
    old = bool(torch.isfinite(torch.stack([p.grad.float().abs().sum() for p in params]).sum()))
    norm, = read_back([gradient_norm(optimizer)])
    assert (norm == norm and abs(norm) != float("inf")) == old == (bad is None)
    finite, = read_back([all_finite([p.grad for p in params])])
    assert bool(finite) == old
    assert read_back([all_finite([])]) == [None] and gradient_norm(torch.optim.SGD(params[:0] or [
        torch.nn.Parameter(torch.zeros(1))], lr=0.1)) is None


def test_clipping_with_the_checks_norm_is_bit_for_bit_clip_grad_norm():
    torch.manual_seed(1)
    rows = [torch.randn(7).tolist(), (torch.randn(3) * 40).tolist()]
    optimizer, ours = _grads(*rows)
    _, theirs = _grads(*rows)
    norm = gradient_norm(optimizer)
    torch.nn.utils.clip_grads_with_norm_(ours, 1.0, norm)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    assert torch.equal(norm, expected)
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(ours, theirs))
