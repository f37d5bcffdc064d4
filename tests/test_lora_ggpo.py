"""GGPO (network_args ggpo_sigma / ggpo_beta), as sd-scripts' lora_flux applies it: after each optimizer step's
gradients are final, the row norms of the LoRA's weight and gradient are kept, and every later training forward adds
x · Pᵀ, P standard normal with row i scaled by (sigma ‖W_i‖ + beta ‖G_i‖²) / √out. Checked against the formula worked
out here from the tensors themselves."""

import math

import pytest
import torch
from safetensors.torch import load_file

from trainer.cli import main
from trainer.errors import ConfigError
from trainer.lora import LoRAConfig, LoRANetwork
from trainer.lora.module import LoRAModule
from trainer.lora.targets import UNET, Target

from trainspace import cli_args, make_workspace

SIGMA, BETA = 0.03, 0.5


def _layer(ggpo=(SIGMA, BETA), seed: int = 0) -> tuple[torch.nn.Linear, LoRAModule]:
    torch.manual_seed(seed)
    base = torch.nn.Linear(6, 5)
    lora = LoRAModule("lora_unet_x", base, rank=2, alpha=1.0, ggpo=ggpo)
    with torch.no_grad():
        lora.lora_up.weight.normal_()
    lora.attach()
    return base, lora


def _step_gradients(base: torch.nn.Linear, lora: LoRAModule) -> torch.Tensor:
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    base(x).pow(2).sum().backward()
    return x


def test_the_norms_follow_sd_scripts_formula():
    base, lora = _layer()
    _step_gradients(base, lora)
    lora.update_ggpo_norms()
    down, up = lora.lora_down.weight, lora.lora_up.weight
    mean_row_norm = sum(math.sqrt(sum(v * v for v in row)) for row in base.weight.tolist()) / 5
    product = up @ down  # sd-scripts leaves the product unscaled
    expected_w = torch.sqrt(mean_row_norm**2 + product.pow(2).sum(dim=1, keepdim=True))
    expected_g = (0.5 * (up @ down.grad + up.grad @ down)).norm(dim=1, keepdim=True)  # scale = alpha / rank = 0.5
    assert torch.allclose(lora.ggpo_weight_norms, expected_w, atol=1e-5)
    assert torch.allclose(lora.ggpo_grad_norms, expected_g, atol=1e-6)


def test_a_training_forward_adds_x_times_the_scaled_random_matrix():
    base, lora = _layer()
    _step_gradients(base, lora)
    lora.update_ggpo_norms()
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(123)
    with torch.no_grad():
        out = base(x)
    torch.manual_seed(123)
    p = torch.randn(5, 6)
    rows = (SIGMA * lora.ggpo_weight_norms + BETA * lora.ggpo_grad_norms**2) / math.sqrt(5)
    with torch.no_grad():
        plain = torch.nn.functional.linear(x, base.weight, base.bias)
        lora_term = 0.5 * (x @ lora.lora_down.weight.T @ lora.lora_up.weight.T)
    assert torch.allclose(out, plain + lora_term + x @ (p * rows).T, atol=1e-5)
    assert not torch.allclose(out, plain + lora_term, atol=1e-4)


def test_no_perturbation_before_the_first_step_outside_training_or_without_both_values():
    base, lora = _layer()
    x = torch.randn(4, 6)
    with torch.no_grad():
        first = base(x)
        lora.detach()
        plain = base(x)
        lora.attach()
        lora_term = 0.5 * (x @ lora.lora_down.weight.T @ lora.lora_up.weight.T)
    assert torch.allclose(first, plain + lora_term, atol=1e-6)
    _step_gradients(base, lora)
    lora.update_ggpo_norms()
    lora.eval()
    with torch.no_grad():
        assert torch.allclose(base(x), plain + lora_term, atol=1e-6)
    lora.update_ggpo_norms()  # outside training nothing is read
    assert lora.ggpo_grad_norms is not None
    off_base, off = _layer(ggpo=None)
    _step_gradients(off_base, off)
    off.update_ggpo_norms()
    assert off.ggpo_grad_norms is None and off.ggpo_weight_norms is None


def test_split_qkv_with_ggpo_is_refused():
    flux_layer = torch.nn.Linear(6, 9)
    config = LoRAConfig(network_dim=2, split_qkv=True)
    object.__setattr__(config, "ggpo_sigma", SIGMA)
    object.__setattr__(config, "ggpo_beta", BETA)
    target = Target("lora_unet_double_blocks_0_img_attn_qkv", "double_blocks.0.img_attn.qkv", flux_layer, UNET, 2,
                    1.0, (3, 3, 3))
    with pytest.raises(ConfigError, match="ggpo_sigma/ggpo_beta cannot be combined with split_qkv"):
        LoRANetwork([target], config)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("ws"))


def _trained(ws, tokenizer_dirs, folder, steps: int, *network_args) -> dict:
    args = cli_args(ws, tokenizer_dirs, folder) + [
        "--network_train_unet_only", "--network_dim", "4", "--max_train_steps", str(steps), "--seed", "5",
        "--cache_latents", "--cache_text_encoder_outputs", "--timestep_sampling", "flux_shift",
        "--model_prediction_type", "raw", "--guidance_scale", "1.0", "--output_name", "lora", "--learning_rate",
        "1e-2"]
    if network_args:
        args += ["--network_args", *network_args]
    assert main(args) == 0
    return load_file(folder / "lora.safetensors")


def test_ggpo_acts_from_the_second_step_of_a_training_run(ws, tokenizer_dirs, tmp_path, capsys):
    ggpo = (f"ggpo_sigma={SIGMA}", f"ggpo_beta={BETA}")
    one_plain = _trained(ws, tokenizer_dirs, tmp_path / "p1", 1)
    one_ggpo = _trained(ws, tokenizer_dirs, tmp_path / "g1", 1, *ggpo)
    assert all(torch.equal(one_plain[k], one_ggpo[k]) for k in one_plain)  # no norms before the first step
    assert "ggpo" not in capsys.readouterr().err.lower()  # applied, not warned about
    three_plain = _trained(ws, tokenizer_dirs, tmp_path / "p3", 3)
    three_ggpo = _trained(ws, tokenizer_dirs, tmp_path / "g3", 3, *ggpo)
    assert any(not torch.equal(three_plain[k], three_ggpo[k]) for k in three_plain if k.endswith("up.weight"))
