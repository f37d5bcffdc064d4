"""--base_weights / --base_weights_multiplier: LoRA files merged into the transformer (and text encoders) before
training. Training on top of them equals training on a transformer file that has them merged already."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from trainer.config import LoRAConfig
from trainer.errors import ConfigError
from trainer.events import Message, SilentReporter
from trainer.loop import train
from trainer.lora import LoRANetwork, apply_lora, save_lora
from trainer.models import load_flux

from trainspace import config, make_workspace


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("ws"))


def a_lora(ws, path):
    torch.manual_seed(4)
    network = LoRANetwork.create(LoRAConfig(network_dim=2, network_alpha=2), load_flux(ws["flux"]))
    with torch.no_grad():
        for lora in network.loras:
            lora.lora_up.weight.normal_(std=0.05)
    save_lora(network, path)
    return path


def test_base_weights_equal_a_premerged_transformer(ws, tokenizer_dirs, tmp_path):
    base = a_lora(ws, tmp_path / "base.safetensors")
    merged = load_flux(ws["flux"])
    apply_lora(merged, base, 0.5, merge=True)
    premerged = tmp_path / "merged_flux.safetensors"
    save_file({k: v.contiguous() for k, v in merged.state_dict().items()}, str(premerged))

    reporter = SilentReporter()
    on_top = train(config(ws, tokenizer_dirs, tmp_path / "a", max_train_steps=3, base_weights=(str(base),),
                          base_weights_multiplier=(0.5,)), reporter).lora
    reference = train(config(ws, tokenizer_dirs, tmp_path / "b", max_train_steps=3,
                             pretrained_model_name_or_path=str(premerged)), SilentReporter()).lora
    plain = train(config(ws, tokenizer_dirs, tmp_path / "c", max_train_steps=3), SilentReporter()).lora
    a, b, c = load_file(str(on_top)), load_file(str(reference)), load_file(str(plain))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the merge changed what was trained
    assert any(isinstance(e, Message) and "base_weights: merged" in e.text and "transformer" in e.text
               for e in reporter.events)


def test_base_weights_are_checked_before_loading(ws, tokenizer_dirs, tmp_path):
    with pytest.raises(ConfigError, match="base_weights_multiplier: 2 values for 1"):
        config(ws, tokenizer_dirs, tmp_path, base_weights=("x.safetensors",), base_weights_multiplier=(1.0, 2.0))
    with pytest.raises(ConfigError, match="fp8_base"):
        config(ws, tokenizer_dirs, tmp_path, base_weights=("x.safetensors",), fp8_base=True, mixed_precision="bf16")
    from trainer.errors import TrainerError

    with pytest.raises(TrainerError, match="missing.safetensors"):
        train(config(ws, tokenizer_dirs, tmp_path, base_weights=(str(tmp_path / "missing.safetensors"),)),
              SilentReporter())
