"""Which layers get a LoRA, with which rank, for each option: expected tables are derived from the rules of
sd-scripts' lora_flux, written out here independently of the implementation."""

import re

import pytest
import torch

from trainer.lora import LoRAConfig, LoRAConfigError, LoRANetwork
from trainer.models import load_clip_l, load_flux, load_t5xxl
from trainer.models.flux import Flux, FluxParams

DOUBLE_LAYERS = {  # layer -> (per-type option, in features, out features) for hidden h, mlp m
    "img_attn_qkv": ("img_attn_dim", "h", "3h"), "img_attn_proj": ("img_attn_dim", "h", "h"),
    "img_mlp_0": ("img_mlp_dim", "h", "m"), "img_mlp_2": ("img_mlp_dim", "m", "h"),
    "img_mod_lin": ("img_mod_dim", "h", "6h"),
    "txt_attn_qkv": ("txt_attn_dim", "h", "3h"), "txt_attn_proj": ("txt_attn_dim", "h", "h"),
    "txt_mlp_0": ("txt_mlp_dim", "h", "m"), "txt_mlp_2": ("txt_mlp_dim", "m", "h"),
    "txt_mod_lin": ("txt_mod_dim", "h", "6h"),
}
SINGLE_LAYERS = {"linear1": ("single_dim", "h", "3h+m"), "linear2": ("single_dim", "h+m", "h"),
                 "modulation_lin": ("single_mod_dim", "h", "3h")}
SIZES = {"h": lambda h, m: h, "3h": lambda h, m: 3 * h, "6h": lambda h, m: 6 * h, "m": lambda h, m: m,
         "3h+m": lambda h, m: 3 * h + m, "h+m": lambda h, m: h + m}


def size(expr, p: FluxParams):
    return SIZES[expr](p.hidden_size, p.mlp_hidden_dim)


def expected_table(p: FluxParams, cfg: LoRAConfig, double=None, single=None):
    """name -> (rank, down shape, up shape) by the documented rules."""
    table = {}
    for kind, count, layers, chosen in (("double", p.depth, DOUBLE_LAYERS, double),
                                        ("single", p.depth_single_blocks, SINGLE_LAYERS, single)):
        if cfg.train_blocks not in ("all", kind):
            continue
        for i in range(count):
            for layer, (option, fan_in, fan_out) in layers.items():
                rank = getattr(cfg, option)
                rank = cfg.network_dim if rank is None else rank
                if chosen is not None and i not in chosen:
                    rank = 0
                if rank:
                    table[f"lora_unet_{kind}_blocks_{i}_{layer}"] = (rank, (rank, size(fan_in, p)),
                                                                     (size(fan_out, p), rank))
    return table


def actual_table(network):
    state = network.kohya_state_dict()
    return {m.lora_name: (m.rank, tuple(state[f"{m.lora_name}.lora_down.weight"].shape),
                          tuple(state[f"{m.lora_name}.lora_up.weight"].shape)) for m in network.loras}


@pytest.fixture(scope="module")
def flux(golden):
    return load_flux(golden / "flux_tiny_weights.safetensors")


def test_size_helper():
    p = FluxParams()
    assert size("3h+m", p) == 3 * 3072 + 12288 and size("h", p) == 3072 and size("6h", p) == 6 * 3072


def test_default_targets_every_block_linear_at_rank_4(flux):
    cfg = LoRAConfig()
    network = LoRANetwork.create(cfg, flux)
    assert actual_table(network) == expected_table(flux.params, cfg)
    assert {float(m.alpha) for m in network.loras} == {1.0} and {m.scale for m in network.loras} == {0.25}


def test_full_size_dev_has_304_block_targets():
    with torch.device("meta"):
        model = Flux(FluxParams.dev())
    network = LoRANetwork.create(LoRAConfig(network_dim=16), model)
    assert len(network.loras) == 304
    assert actual_table(network) == expected_table(FluxParams.dev(), LoRAConfig(network_dim=16))


@pytest.mark.parametrize("option", ["img_attn_dim", "txt_attn_dim", "img_mlp_dim", "txt_mlp_dim", "img_mod_dim",
                                    "txt_mod_dim", "single_dim", "single_mod_dim"])
@pytest.mark.parametrize("value", [0, 2])
def test_per_type_ranks(flux, option, value):
    cfg = LoRAConfig(network_dim=4, network_alpha=3, **{option: value})
    network = LoRANetwork.create(cfg, flux)
    assert actual_table(network) == expected_table(flux.params, cfg)
    assert {float(m.alpha) for m in network.loras} == {3.0}  # alpha stays network_alpha


def test_in_dims_add_the_embedders(flux):
    cfg = LoRAConfig(in_dims=(2, 0, 3, 0, 5))
    names = {m.lora_name: m.rank for m in LoRANetwork.create(cfg, flux).loras}
    extra = {k: v for k, v in names.items() if "_blocks_" not in k}
    assert extra == {"lora_unet_img_in": 2, "lora_unet_vector_in_in_layer": 3, "lora_unet_vector_in_out_layer": 3,
                     "lora_unet_txt_in": 5}


@pytest.mark.parametrize("double,single", [("0", "1"), ("all", "none"), ("none", "0-1"), ("1", None), (" 0 , 1 ", "")])
def test_block_selection(flux, double, single):
    cfg = LoRAConfig(train_double_block_indices=double, train_single_block_indices=single)

    def parse(text, count):
        if text is None or text.strip() == "all":
            return None if text is None else set(range(count))
        if text.strip() in ("none", ""):
            return set()
        out = set()
        for part in text.split(","):
            a, _, b = part.strip().partition("-")
            out.update(range(int(a), int(b or a) + 1))
        return out

    expected = expected_table(flux.params, cfg, parse(double, 2), parse(single, 2))
    assert actual_table(LoRANetwork.create(cfg, flux)) == expected


@pytest.mark.parametrize("value,message", [("2", "out of range; this model's blocks are 0-1"),
                                           ("0,x", "not an index"), ("1-0", "backwards"), ("0;1", "not an index")])
def test_block_selection_errors_name_the_option(flux, value, message):
    with pytest.raises(LoRAConfigError, match=re.escape(message)) as info:
        LoRANetwork.create(LoRAConfig(train_double_block_indices=value), flux)
    assert "train_double_block_indices" in str(info.value)


def test_full_size_block_ranges_are_0_18_and_0_37():
    with torch.device("meta"):
        model = Flux(FluxParams.dev())
    LoRANetwork.create(LoRAConfig(train_double_block_indices="18", train_single_block_indices="37"), model)
    with pytest.raises(LoRAConfigError, match="0-18"):
        LoRANetwork.create(LoRAConfig(train_double_block_indices="19"), model)
    with pytest.raises(LoRAConfigError, match="0-37"):
        LoRANetwork.create(LoRAConfig(train_single_block_indices="0,38"), model)


@pytest.mark.parametrize("train_blocks", ["single", "double"])
def test_train_blocks(flux, train_blocks):
    cfg = LoRAConfig(train_blocks=train_blocks)
    table = actual_table(LoRANetwork.create(cfg, flux))
    assert table == expected_table(flux.params, cfg)
    assert all(f"_{train_blocks}_blocks_" in name for name in table)


def test_text_encoders_targets(flux, tiny_files):
    clip = load_clip_l(tiny_files["clip_l"], dtype=torch.float32)
    t5 = load_t5xxl(tiny_files["t5xxl"], dtype=torch.float32)
    layers = 2
    clip_names = {f"lora_te1_text_model_encoder_layers_{i}_{n}" for i in range(layers)
                  for n in ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj",
                            "mlp_fc1", "mlp_fc2")}
    t5_names = {f"lora_te3_encoder_block_{i}_{n}" for i in range(layers)
                for n in ("layer_0_SelfAttention_q", "layer_0_SelfAttention_k", "layer_0_SelfAttention_v",
                          "layer_0_SelfAttention_o", "layer_1_DenseReluDense_wi_0", "layer_1_DenseReluDense_wi_1",
                          "layer_1_DenseReluDense_wo")}

    def te_names(cfg):
        return {m.lora_name for m in LoRANetwork.create(cfg, flux, clip, t5).loras
                if not m.lora_name.startswith("lora_unet")}

    assert te_names(LoRAConfig()) == clip_names
    assert te_names(LoRAConfig(train_t5xxl=True)) == clip_names | t5_names
    assert te_names(LoRAConfig(network_train_unet_only=True, train_t5xxl=True)) == set()


def test_regex_ranks_override_first_match_wins(flux):
    cfg = LoRAConfig(network_dim=4, network_reg_dims=(("double_blocks_0_.*qkv", 8), ("qkv", 2), ("single_blocks_1", 0)))
    ranks = {m.lora_name: m.rank for m in LoRANetwork.create(cfg, flux).loras}
    assert ranks["lora_unet_double_blocks_0_img_attn_qkv"] == 8 and ranks["lora_unet_double_blocks_1_txt_attn_qkv"] == 2
    assert not any("single_blocks_1" in n for n in ranks) and ranks["lora_unet_single_blocks_0_linear1"] == 4


def test_network_args_parse_like_sd_scripts():
    cfg = LoRAConfig.from_network_args(
        ["img_attn_dim=8", "in_dims=[4,0,0,0,4]", "train_double_block_indices=0,1,8-12,18", "split_qkv=True",
         "train_t5xxl=False", "loraplus_lr_ratio=4", "rank_dropout=0.1", "network_reg_lrs=qkv=1e-4,proj=2e-4"],
        network_dim=16, network_alpha=None)
    assert cfg.network_dim == 16 and cfg.network_alpha == 1.0 and cfg.img_attn_dim == 8
    assert cfg.in_dims == (4, 0, 0, 0, 4) and cfg.split_qkv and cfg.loraplus_lr_ratio == 4.0
    assert cfg.network_reg_lrs == (("qkv", 1e-4), ("proj", 2e-4))
    assert LoRAConfig(network_dim=8, network_alpha=0).network_alpha == 8.0  # alpha 0 means alpha = dim


@pytest.mark.parametrize("args,message", [
    (["in_dims=[4,4,4]"], "in_dims: expected exactly five"),
    (["in_dims=[a,b]"], "in_dims"),
    (["img_attn_dim=-1"], "img_attn_dim"),
    (["bogus=1"], "unknown key 'bogus'"),
    (["train_blocks=both"], "train_blocks: expected one of all, single, double"),
    (["rank_dropout=1.5"], "rank_dropout"),
    (["split_qkv=yes"], "split_qkv"),
    (["novalue"], "key=value"),
])
def test_bad_network_args_name_the_option(args, message):
    with pytest.raises(LoRAConfigError, match=re.escape(message)):
        LoRAConfig.from_network_args(args)
