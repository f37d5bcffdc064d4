"""train_t5xxl=True trains a LoRA on T5-XXL from the library and the command line (sd-scripts' lora_flux: the T5 layers
are saved as lora_te3_...), and the pre-flight plans the T5 layers from the file's header without loading T5."""

import pytest
import torch
from safetensors.torch import load_file

from trainer.cli import main
from trainer.config import TrainConfig
from trainer.errors import ConfigError, ModelFileError
from trainer.events import SilentReporter
from trainer.loop import train
from trainer.lora import LoRAConfig, LoRANetwork
from trainer.models import load_t5xxl, read_flux_params
from trainer.models.flux import Flux
from trainer.models.text_encoders import t5_encoder_on_meta
from trainer.preflight import check

from trainspace import cli_args, config, make_workspace

T5_LORA = LoRAConfig(network_dim=4, network_alpha=4, network_train_unet_only=False, train_t5xxl=True)
T5_LAYER = "lora_te3_encoder_block_0_layer_0_SelfAttention_q"


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("ws"))


def _t5_ups(weights: dict) -> dict:
    return {k: v for k, v in weights.items() if k.startswith("lora_te3_") and k.endswith("lora_up.weight")}


def test_the_meta_t5_has_the_loaded_t5s_linear_layers(ws, tokenizer_dirs):
    meta = t5_encoder_on_meta(ws["t5xxl"])
    loaded = load_t5xxl(ws["t5xxl"], tokenizer=tokenizer_dirs["t5xxl"]).model
    shapes = {n: tuple(m.weight.shape) for n, m in meta.named_modules() if isinstance(m, torch.nn.Linear)}
    assert shapes == {n: tuple(m.weight.shape) for n, m in loaded.named_modules() if isinstance(m, torch.nn.Linear)}
    assert all(p.is_meta for p in meta.parameters())


def test_the_meta_t5_names_a_file_that_holds_no_t5(ws):
    with pytest.raises(ModelFileError, match="T5-XXL"):
        t5_encoder_on_meta(ws["clip_l"])


def test_create_without_t5_is_a_config_error_naming_train_t5xxl(ws):
    with torch.device("meta"):
        flux = Flux(read_flux_params(ws["flux"]))
        with pytest.raises(ConfigError, match="train_t5xxl"):
            LoRANetwork.create(T5_LORA, flux)


def test_the_preflight_accepts_train_t5xxl(ws, tokenizer_dirs, tmp_path):
    check(config(ws, tokenizer_dirs, tmp_path, network=T5_LORA, cache_text_encoder_outputs=False))


def test_library_training_with_train_t5xxl_trains_t5_and_clip_layers(ws, tokenizer_dirs, tmp_path):
    cfg: TrainConfig = config(ws, tokenizer_dirs, tmp_path, network=T5_LORA, cache_text_encoder_outputs=False,
                              max_train_steps=3)
    weights = load_file(train(cfg, SilentReporter()).lora)
    ups = _t5_ups(weights)
    assert f"{T5_LAYER}.lora_up.weight" in ups and f"{T5_LAYER}.lora_down.weight" in weights
    assert all(v.abs().max() > 0 for v in ups.values())  # every T5 up starts at zero: all of them were trained
    assert any(k.startswith("lora_te1_") for k in weights) and any(k.startswith("lora_unet_") for k in weights)
    assert not any(k.startswith("lora_te2_") for k in weights)


def test_cli_training_with_train_t5xxl(ws, tokenizer_dirs, tmp_path, capsys):
    args = cli_args(ws, tokenizer_dirs, tmp_path) + ["--network_args", "train_t5xxl=True", "--network_dim", "4",
                                                     "--max_train_steps", "2", "--output_name", "t5"]
    assert main(args + ["--check_only"]) == 0
    assert main(args) == 0, capsys.readouterr().err
    ups = _t5_ups(load_file(tmp_path / "t5.safetensors"))
    assert ups and all(v.abs().max() > 0 for v in ups.values())


def test_text_encoder_caching_is_refused_when_t5_is_trained(ws, tokenizer_dirs, tmp_path, capsys):
    args = cli_args(ws, tokenizer_dirs, tmp_path) + ["--network_args", "train_t5xxl=True",
                                                     "--cache_text_encoder_outputs", "--check_only"]
    assert main(args) == 2
    assert "train_t5xxl" in capsys.readouterr().err


def test_the_network_nodes_train_t5xxl_passes_the_preflight(ws, tokenizer_dirs, tmp_path):
    from packimport import pack

    network = pack("nodes.translate").network_fields(network_dim=4, network_alpha=4, train_t5xxl=True).network
    assert network.train_t5xxl and not network.network_train_unet_only
    packed = pack("trainer.config").TrainConfig.from_flags(**{**config(ws, tokenizer_dirs, tmp_path).flags(),
                                                              "network": network, "cache_text_encoder_outputs": False})
    pack("trainer.preflight").check(packed)
