"""The LoRA math and file format agree with the reference: the golden kohya LoRA reproduces its outputs."""

import pytest
import torch
from safetensors.torch import load_file

from trainer.lora import LoRAConfig, LoRANetwork, apply_lora, remove_loras
from trainer.models import load_flux

TOL = 1e-4


@pytest.fixture(scope="module")
def io(golden):
    return load_file(golden / "flux_tiny_io.safetensors")


@pytest.fixture(scope="module")
def expected(golden):
    return load_file(golden / "flux_tiny_lora_io.safetensors")


@pytest.fixture
def model(golden):
    return load_flux(golden / "flux_tiny_weights.safetensors", dtype=torch.float32)


def run(model, io):
    with torch.no_grad():
        return model(io["img"], io["img_ids"], io["txt"], io["txt_ids"], io["timesteps"], io["y"], io["guidance"])


@pytest.mark.parametrize("multiplier,key", [(1.0, "out_lora_multiplier_1"), (0.5, "out_lora_multiplier_0_5")])
def test_golden_lora_reproduces_reference(model, io, expected, golden, multiplier, key):
    apply_lora(model, golden / "flux_tiny_lora.safetensors", multiplier=multiplier)
    assert (run(model, io) - expected[key]).abs().max() < TOL


@pytest.mark.parametrize("multiplier,key", [(1.0, "out_lora_multiplier_1"), (0.5, "out_lora_multiplier_0_5")])
def test_merged_golden_lora_reproduces_reference(model, io, expected, golden, multiplier, key):
    apply_lora(model, golden / "flux_tiny_lora.safetensors", multiplier=multiplier, merge=True)
    assert not model.double_blocks[0].img_attn.qkv.__dict__.get("forward")  # no hook left behind
    assert (run(model, io) - expected[key]).abs().max() < TOL


def test_removing_the_lora_restores_the_model(model, io, golden):
    apply_lora(model, golden / "flux_tiny_lora.safetensors")
    remove_loras(model)
    assert (run(model, io) - io["out"]).abs().max() < TOL
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_golden_lora_loads_as_a_network_with_its_ranks_and_in_dims(model, golden):
    network = LoRANetwork.from_weights(load_file(golden / "flux_tiny_lora.safetensors"), flux=model)
    assert len(network.loras) == 2 * 10 + 2 * 3 + 8  # blocks, plus img_in, txt_in and three two-layer embedders
    assert {m.rank for m in network.loras} == {4} and {float(m.alpha) for m in network.loras} == {2.0}
    assert "lora_unet_guidance_in_out_layer" in network.by_name


def test_fresh_network_changes_nothing(model, io):
    network = LoRANetwork.create(LoRAConfig(network_dim=8, in_dims=(4, 4, 4, 4, 4)), model).attach()
    assert torch.equal(run(model, io), run_without(model, io, network))


def run_without(model, io, network):
    network.detach()
    try:
        return run(model, io)
    finally:
        network.attach()


def test_applying_the_same_lora_again_sets_its_strength(model, io, expected, golden):
    apply_lora(model, golden / "flux_tiny_lora.safetensors", multiplier=1.0)
    apply_lora(model, golden / "flux_tiny_lora.safetensors", multiplier=0.5)
    assert (run(model, io) - expected["out_lora_multiplier_0_5"]).abs().max() < TOL
    apply_lora(model, load_file(golden / "flux_tiny_lora.safetensors"), multiplier=1.0)  # same tensors, as a dict
    assert (run(model, io) - expected["out_lora_multiplier_1"]).abs().max() < TOL
    assert len(model.__dict__["_lora_networks"]) == 1
