"""The options accepted with "no effect" are the ones sd-scripts' FLUX path (flux_train_network.py, train_network.py,
flux_train_utils.py) does not act on either: given all together they leave the LoRA bit-identical. The one that does
act there, --ip_noise_gamma (with --ip_noise_gamma_random_strength), acts here with sd-scripts' formula."""

import pytest
import torch
from safetensors.torch import load_file

from trainer import step as step_module
from trainer.cli import main
from trainer.cli_options import CHOICES, NO_EFFECT
from trainer.data.dataset import Batch
from trainer.flow import FlowConfig, pack_latents
from trainer.lora import LoRANetwork

from trainspace import cli_args, make_workspace

RUN = ["--network_train_unet_only", "--network_dim", "4", "--max_train_steps", "2", "--seed", "5",
       "--cache_latents", "--cache_text_encoder_outputs", "--timestep_sampling", "flux_shift",
       "--model_prediction_type", "raw", "--guidance_scale", "1.0"]
SAMPLE_VALUES = {"int": "3", "float": "0.25", "str": "x"}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("ws"))


def _trained(ws, tokenizer_dirs, folder, *extra) -> dict:
    args = cli_args(ws, tokenizer_dirs, folder) + RUN + ["--output_name", "lora", *extra]
    assert main(args) == 0
    return load_file(folder / "lora.safetensors")


def _option_args(name: str, kind: str) -> list[str]:
    if kind == "flag":
        return [f"--{name}"]
    value = str(CHOICES[name][-1]) if name in CHOICES else SAMPLE_VALUES[kind]
    return [f"--{name}", value]


def test_every_no_effect_option_leaves_the_lora_identical(ws, tokenizer_dirs, tmp_path, capsys):
    baseline = _trained(ws, tokenizer_dirs, tmp_path / "plain")
    capsys.readouterr()
    extra = [arg for name, (kind, _) in NO_EFFECT.items() for arg in _option_args(name, kind)]
    given = _trained(ws, tokenizer_dirs, tmp_path / "given", *extra)
    captured = capsys.readouterr()
    warned = captured.err + captured.out
    assert given.keys() == baseline.keys()
    assert all(torch.equal(given[k], baseline[k]) for k in baseline)
    for name in NO_EFFECT:
        assert f"--{name} has no effect here" in warned, name


def test_masked_loss_acts_and_the_command_line_mask_folder_does_not():
    """sd-scripts' LoRA trainer reads mask folders from dataset-config subsets only (with --masked_loss); its
    --conditioning_data_dir serves the ControlNet trainers."""
    assert "masked_loss" not in NO_EFFECT and "conditioning_data_dir" in NO_EFFECT
    assert "[[datasets.subsets]]" in NO_EFFECT["conditioning_data_dir"][1]


def test_no_reason_names_a_sampler_sd_scripts_does_not_have():
    assert not any("qinglong" in why for _, why in NO_EFFECT.values())
    assert "ip_noise_gamma" not in NO_EFFECT and "ip_noise_gamma_random_strength" not in NO_EFFECT


def test_ip_noise_gamma_trains_another_lora(ws, tokenizer_dirs, tmp_path):
    baseline = _trained(ws, tokenizer_dirs, tmp_path / "plain")
    noisy = _trained(ws, tokenizer_dirs, tmp_path / "ip", "--ip_noise_gamma", "0.5")
    random = _trained(ws, tokenizer_dirs, tmp_path / "random", "--ip_noise_gamma", "0.5",
                      "--ip_noise_gamma_random_strength")
    ups = [k for k in baseline if k.endswith("lora_up.weight")]
    assert any(not torch.equal(noisy[k], baseline[k]) for k in ups)
    assert any(not torch.equal(random[k], noisy[k]) for k in ups)


class _InputRecorder(torch.nn.Module):
    """Stands in for the transformer: keeps the packed noisy latents it is given and predicts zero."""

    def __init__(self):
        super().__init__()
        self.inputs = []

    def forward(self, img, *args):
        self.inputs.append(img.detach().clone())
        return torch.zeros_like(img)


def _model_input_and_loss(gamma: float | None, sigma: float = 0.5) -> tuple[torch.Tensor, float]:
    flux = _InputRecorder()
    flow = FlowConfig(model_prediction_type="raw", ip_noise_gamma=gamma)
    ctx = step_module.StepContext(flux=flux, network=LoRANetwork([]), flow=flow, seed=9,
                                  weight_dtype=torch.float32, device=torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 16, 8, 8, generator=g)
    text = (torch.zeros(2, 8), torch.zeros(2, 4, 8), torch.ones(2, 4))
    batch = Batch(bucket=(64, 64), paths=[], captions=["a", "b"], loss_weights=torch.ones(2), network_multiplier=1.0,
                  latents=latents, text=text, positions=[0, 1])
    loss = step_module.loss(ctx, batch, step=4, sigma=sigma)
    return flux.inputs[0], loss.item()


def test_ip_noise_gamma_adds_sigma_gamma_xi_to_the_model_input_and_leaves_the_target():
    plain, plain_loss = _model_input_and_loss(None)
    small, small_loss = _model_input_and_loss(0.2)
    large, large_loss = _model_input_and_loss(0.4)
    # sd-scripts: input = (1 - s) x + s (noise + gamma xi), target = noise - x; at s = 0.5 the input moves 0.5 gamma xi
    xi = (small - plain) / (0.5 * 0.2)
    assert torch.allclose(large - plain, 0.5 * 0.4 * xi, atol=1e-5)
    assert xi.std().item() == pytest.approx(1.0, abs=0.1) and abs(xi.mean().item()) < 0.1
    # a zero prediction's loss is the target's mean square: the same, whatever the input noise
    assert small_loss == pytest.approx(plain_loss, rel=1e-6) and large_loss == pytest.approx(plain_loss, rel=1e-6)
    assert pack_latents(torch.zeros(2, 16, 8, 8)).shape == plain.shape
