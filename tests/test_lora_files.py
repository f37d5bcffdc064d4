"""LoRA files: bit-exact round trips, sd-scripts' metadata and hashes, split_qkv saved so loaders reproduce it,
the diffusion_model lora_A/lora_B layout, atomic writes; training-side options reach the optimizer."""

import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from trainer.lora import (
    LoRAConfig,
    LoRANetwork,
    LoRAWeightsError,
    apply_lora,
    lora_metadata,
    read_lora,
    remove_loras,
    save_lora,
)
from trainer.models import load_clip_l, load_flux, load_t5xxl


@pytest.fixture
def flux(golden):
    return load_flux(golden / "flux_tiny_weights.safetensors", dtype=torch.float32)


@pytest.fixture(scope="module")
def io(golden):
    return load_file(golden / "flux_tiny_io.safetensors")


def run(model, io):
    with torch.no_grad():
        return model(io["img"], io["img_ids"], io["txt"], io["txt_ids"], io["timesteps"], io["y"], io["guidance"])


def trained(network, seed=0, scale=0.05):
    """Stand-in for training: random non-zero up weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in network.loras:
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * scale)
    return network


def test_save_load_round_trip_is_bit_exact_with_metadata(flux, tmp_path):
    cfg = LoRAConfig(network_dim=4, network_alpha=2, in_dims=(2, 2, 2, 2, 2), img_mlp_dim=3)
    network = trained(LoRANetwork.create(cfg, flux))
    meta = lora_metadata(cfg, "dev", title="my lora", training={"ss_max_train_steps": "100", "epoch": 3})
    path = save_lora(network, tmp_path / "out" / "my_lora.safetensors", meta)
    weights, read_meta = read_lora(path)
    assert weights.keys() == network.kohya_state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in network.kohya_state_dict().items())
    assert {k: v for k, v in read_meta.items() if not k.startswith("sshs_")} == meta
    again = LoRANetwork.from_weights(weights, flux=flux)
    assert all(torch.equal(again.kohya_state_dict()[k], v) for k, v in weights.items())


def test_metadata_has_sd_scripts_keys(flux):
    cfg = LoRAConfig.from_network_args(["in_dims=[4,4,4,4,4]", "split_qkv=True"], network_dim=16, network_alpha=8)
    meta = lora_metadata(cfg, "schnell", resolution=(768, 512), training={"steps": 10})
    assert meta["ss_network_module"] == "networks.lora_flux" and meta["ss_base_model_version"] == "flux1"
    assert meta["ss_network_dim"] == "16" and meta["ss_network_alpha"] == "8.0"
    assert json.loads(meta["ss_network_args"]) == {"in_dims": "[4,4,4,4,4]", "split_qkv": "True"}
    assert meta["modelspec.architecture"] == "flux-1-schnell/lora" and meta["modelspec.resolution"] == "768x512"
    assert meta["modelspec.implementation"] == "https://github.com/black-forest-labs/flux"
    assert meta["ss_steps"] == "10" and "modelspec.date" in meta and "modelspec.title" in meta


def test_hashes_are_sd_scripts_addnet_hashes(flux, tmp_path):
    network = trained(LoRANetwork.create(LoRAConfig(), flux))
    meta = lora_metadata(LoRAConfig(), title="x")
    path = save_lora(network, tmp_path / "l.safetensors", meta)
    with safe_open(str(path), "pt") as f:
        written = f.metadata()
    data = path.read_bytes()
    header = int.from_bytes(data[:8], "little")
    assert written["sshs_model_hash"] == hashlib.sha256(data[8 + header:]).hexdigest()
    assert len(written["sshs_legacy_hash"]) == 8


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_save_precision(flux, tmp_path, dtype):
    network = trained(LoRANetwork.create(LoRAConfig(), flux))
    weights = load_file(save_lora(network, tmp_path / "l.safetensors", dtype=dtype))
    assert {v.dtype for v in weights.values()} == {dtype}


def test_a_failed_write_leaves_the_old_file_and_no_temp(flux, tmp_path, monkeypatch):
    network = trained(LoRANetwork.create(LoRAConfig(), flux))
    path = save_lora(network, tmp_path / "l.safetensors")
    before = path.read_bytes()
    import safetensors.torch

    def broken(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_lora(trained(network, seed=1), path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["l.safetensors"]


def test_split_qkv_is_saved_so_loaders_reproduce_the_trained_effect(flux, io, tmp_path):
    cfg = LoRAConfig(network_dim=2, network_alpha=1, split_qkv=True)
    network = trained(LoRANetwork.create(cfg, flux)).attach()
    trained_output = run(flux, io)
    path = save_lora(network, tmp_path / "split.safetensors")
    network.detach()

    weights = load_file(path)
    h, m = flux.params.hidden_size, flux.params.mlp_hidden_dim
    assert weights["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (3 * 2, h)
    up = weights["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"]
    assert up.shape == (3 * h, 3 * 2) and torch.count_nonzero(up[:h, 2:]) == 0  # block diagonal
    assert weights["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (3 * h + m, 4 * 2)
    assert float(weights["lora_unet_double_blocks_0_img_attn_qkv.alpha"]) == 3.0
    assert float(weights["lora_unet_single_blocks_0_linear1.alpha"]) == 4.0
    assert float(weights["lora_unet_double_blocks_0_img_attn_proj.alpha"]) == 1.0

    # a plain kohya loader: W + alpha / rank * up @ down, rank = rows of down
    plain = {k: v.clone() for k, v in flux.state_dict().items()}
    for key in weights:
        if key.endswith(".lora_down.weight"):
            name = key.removesuffix(".lora_down.weight")
            down, up, alpha = weights[key], weights[f"{name}.lora_up.weight"], weights[f"{name}.alpha"]
            target = name.removeprefix("lora_unet_")
            module = next(p for p in plain if p.replace(".", "_") == target + "_weight")
            plain[module] += float(alpha) / down.shape[0] * up @ down
    flux.load_state_dict(plain)
    assert (run(flux, io) - trained_output).abs().max() < 1e-5

    # and our own continue-training path splits it back exactly
    again = LoRANetwork.create(cfg, flux)
    again.load_kohya(weights)
    assert all(torch.equal(again.kohya_state_dict()[k], v) for k, v in weights.items())


def test_peft_layout_with_diffusion_model_prefix_loads_like_kohya(flux, io, tmp_path, golden):
    kohya = load_file(golden / "flux_tiny_lora.safetensors")
    peft = {}
    for key, value in kohya.items():
        name, _, rest = key.partition(".")
        path = next(n for n, _ in flux.named_modules() if "lora_unet_" + n.replace(".", "_") == name)
        suffix = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight", "alpha": "alpha"}[rest]
        peft[f"diffusion_model.{path}.{suffix}"] = value
    save_file(peft, str(tmp_path / "peft.safetensors"))
    apply_lora(flux, golden / "flux_tiny_lora.safetensors")
    expected = run(flux, io)
    remove_loras(flux)
    apply_lora(flux, tmp_path / "peft.safetensors")
    assert torch.equal(run(flux, io), expected)


def test_lora_for_another_architecture_is_refused(flux):
    sdxl_lora = {"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(4, 8),
                 "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(8, 4)}
    with pytest.raises(LoRAWeightsError, match="lora_unet_input_blocks_4_1_proj_in"):
        apply_lora(flux, sdxl_lora)


def test_text_encoder_layers_are_skipped_for_flux_and_applied_to_clip(flux, tiny_files, tokenizer_dirs, tmp_path):
    clip = load_clip_l(tiny_files["clip_l"], dtype=torch.float32, tokenizer=tokenizer_dirs["clip_l"])
    network = trained(LoRANetwork.create(LoRAConfig(), flux, clip))
    path = save_lora(network, tmp_path / "with_te.safetensors")
    apply_lora(flux, path)
    with torch.no_grad():
        before = clip.encode("a cat")
        apply_lora(clip, path)
        after = clip.encode("a cat")
    assert not torch.allclose(before, after)


def test_t5_lora_changes_t5(flux, tiny_files, tokenizer_dirs, tmp_path):
    t5 = load_t5xxl(tiny_files["t5xxl"], dtype=torch.float32, tokenizer=tokenizer_dirs["t5xxl"], max_length=16)
    network = trained(LoRANetwork.create(LoRAConfig(train_t5xxl=True, network_train_unet_only=False), flux, None, t5))
    assert any(m.lora_name.startswith("lora_te3_") for m in network.loras)
    with torch.no_grad():
        before, _ = t5.encode("a cat")
        network.attach()
        after, _ = t5.encode("a cat")
    assert not torch.allclose(before, after)


def test_merged_and_unmerged_agree(flux, io, tmp_path):
    network = trained(LoRANetwork.create(LoRAConfig(in_dims=(2, 2, 2, 2, 2)), flux))
    path = save_lora(network, tmp_path / "l.safetensors")
    apply_lora(flux, path, multiplier=0.7)
    unmerged = run(flux, io)
    remove_loras(flux)
    apply_lora(flux, path, multiplier=0.7, merge=True)
    assert (run(flux, io) - unmerged).abs().max() < 1e-5


def test_continue_training_and_dim_from_weights(flux, tmp_path):
    cfg = LoRAConfig(network_dim=3, network_alpha=1.5, txt_mlp_dim=0)
    saved = save_lora(trained(LoRANetwork.create(cfg, flux)), tmp_path / "l.safetensors")
    weights, _ = read_lora(saved)
    same_shape = LoRANetwork.create(cfg, flux)
    same_shape.load_kohya(weights)  # --network_weights
    from_file = LoRANetwork.from_weights(weights, flux=flux)  # --dim_from_weights
    for net in (same_shape, from_file):
        assert all(torch.equal(net.kohya_state_dict()[k], v) for k, v in weights.items())
    with pytest.raises(LoRAWeightsError, match="do not match the network"):
        LoRANetwork.create(LoRAConfig(network_dim=3), flux).load_kohya(weights)


def test_param_groups_learning_rates_and_loraplus(flux, tiny_files):
    clip = load_clip_l(tiny_files["clip_l"], dtype=torch.float32)
    t5 = load_t5xxl(tiny_files["t5xxl"], dtype=torch.float32)
    cfg = LoRAConfig(train_t5xxl=True, loraplus_unet_lr_ratio=4, loraplus_lr_ratio=2,
                     network_reg_lrs=(("double_blocks_0_", 5e-5),))
    network = LoRANetwork.create(cfg, flux, clip, t5)
    groups = {g["name"]: g for g in network.param_groups(1e-4, unet_lr=3e-4, text_encoder_lr=[1e-5, 2e-5])}
    assert groups["lora_unet"]["lr"] == 3e-4 and groups["lora_unet plus"]["lr"] == pytest.approx(12e-4)
    assert groups["lora_unet reg_lr_0"]["lr"] == 5e-5 and groups["lora_unet reg_lr_0 plus"]["lr"] == pytest.approx(2e-4)
    assert groups["lora_te1"]["lr"] == 1e-5 and groups["lora_te1 plus"]["lr"] == pytest.approx(2e-5)
    assert groups["lora_te3"]["lr"] == 2e-5
    ups = {id(m.lora_up.weight) for m in network.loras}
    assert all(id(p) in ups for g in groups.values() if g["name"].endswith("plus") for p in g["params"])
    counted = sum(len(g["params"]) for g in groups.values())
    assert counted == 2 * len(network.loras)
    one_value = {g["name"]: g["lr"] for g in network.param_groups(1e-4, text_encoder_lr=7e-6)}
    assert one_value["lora_te1"] == one_value["lora_te3"] == 7e-6 and one_value["lora_unet"] == 1e-4
    frozen_te = {g["name"] for g in network.param_groups(1e-4, text_encoder_lr=0)}
    assert not any(n.startswith("lora_te") for n in frozen_te)


def test_dropouts_act_only_in_training(flux, io):
    cfg = LoRAConfig(network_dropout=0.5, rank_dropout=0.5, module_dropout=0.5)
    network = trained(LoRANetwork.create(cfg, flux), scale=0.5).attach()
    flux.eval(), network.eval()
    assert torch.equal(run(flux, io), run(flux, io))
    network.train()
    torch.manual_seed(0)
    a = run(flux, io)
    b = run(flux, io)
    assert not torch.equal(a, b)
