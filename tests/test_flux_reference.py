"""The FLUX.1 transformer computes the reference function and has the reference's exact tensor layout."""

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from trainer.atomic import save_safetensors
from trainer.models import load_flux
from trainer.models.flux import Flux, FluxParams, default_axes_dim
from trainer.models.tiny import flux_state_dict

TOL = 1e-4


@pytest.fixture(scope="module")
def io(golden):
    return load_file(golden / "flux_tiny_io.safetensors")


@pytest.fixture(scope="module")
def tiny(golden):
    return load_flux(golden / "flux_tiny_weights.safetensors", dtype=torch.float32)


def run(model, io, mask=None, **overrides):
    args = dict(img=io["img"], img_ids=io["img_ids"], txt=io["txt"], txt_ids=io["txt_ids"],
                timesteps=io["timesteps"], y=io["y"], guidance=io["guidance"], txt_attention_mask=mask)
    args.update(overrides)
    with torch.no_grad():
        return model(**args)


def test_tiny_model_reproduces_reference_output(tiny, io):
    assert (run(tiny, io) - io["out"]).abs().max() < TOL


def test_tiny_model_reproduces_reference_output_with_t5_mask(tiny, io):
    out = run(tiny, io, mask=io["txt_attention_mask"])
    assert (out - io["out_masked"]).abs().max() < TOL
    assert (out - io["out"]).abs().max() > 100 * TOL  # the mask matters for these inputs


def test_masked_text_tokens_have_no_influence(tiny, io):
    mask = io["txt_attention_mask"]
    txt = io["txt"].clone()
    txt[mask == 0] = torch.randn(int((mask == 0).sum()), txt.shape[-1]) * 10
    assert torch.allclose(run(tiny, io, mask=mask, txt=txt), run(tiny, io, mask=mask), atol=1e-5)


def test_config_is_read_from_shapes(golden):
    model = load_flux(golden / "flux_tiny_weights.safetensors")
    from safetensors import safe_open

    with safe_open(str(golden / "flux_tiny_weights.safetensors"), "pt") as f:
        config = json.loads(f.metadata()["config"])
    p = model.params
    assert (p.hidden_size, p.num_heads, p.depth, p.depth_single_blocks) == (
        config["hidden_size"], config["num_heads"], config["depth"], config["depth_single_blocks"])
    assert (p.vec_in_dim, p.context_in_dim, p.in_channels) == (
        config["vec_in_dim"], config["context_in_dim"], config["in_channels"])
    assert p.mlp_hidden_dim == config["hidden_size"] * config["mlp_ratio"]
    assert list(p.axes_dim) == config["axes_dim"] and p.qkv_bias == config["qkv_bias"]
    assert p.guidance_embed == config["guidance_embed"]


@pytest.mark.parametrize("variant", ["flux1-dev", "flux1-schnell"])
def test_full_size_model_has_reference_names_and_shapes(golden, variant):
    manifest = json.loads((golden / "flux_key_manifest.json").read_text())[variant]
    params = FluxParams.from_shapes(manifest)
    assert params == (FluxParams.dev() if variant == "flux1-dev" else FluxParams.schnell())
    with torch.device("meta"):
        model = Flux(params)
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == manifest


def test_default_axes_dim_matches_flux_at_full_and_tiny_size():
    assert default_axes_dim(128) == (16, 56, 56)
    assert default_axes_dim(32) == (4, 14, 14)


@pytest.mark.parametrize("params", [
    FluxParams(in_channels=64, out_channels=64, vec_in_dim=24, context_in_dim=40, hidden_size=128,
               mlp_hidden_dim=384, num_heads=4, depth=3, depth_single_blocks=1, axes_dim=(4, 14, 14),
               qkv_bias=False, guidance_embed=False),
    FluxParams(in_channels=16, out_channels=16, vec_in_dim=8, context_in_dim=8, hidden_size=96,
               mlp_hidden_dim=96 * 4, num_heads=2, depth=1, depth_single_blocks=3, axes_dim=(6, 20, 22)),
], ids=["schnell-like-no-qkv-bias", "odd-sizes"])
def test_other_sizes_load_through_the_same_code(tmp_path, params):
    state = flux_state_dict(params, seed=3)
    save_safetensors(state, tmp_path / "m.safetensors",
                     metadata={"config": json.dumps({"axes_dim": list(params.axes_dim)})})
    model = load_flux(tmp_path / "m.safetensors")
    assert model.params == params
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_schnell_runs_without_guidance_and_dev_requires_it(golden, io, tmp_path):
    state = {k: v for k, v in load_file(golden / "flux_tiny_weights.safetensors").items() if "guidance_in" not in k}
    save_safetensors(state, tmp_path / "schnell.safetensors")
    schnell = load_flux(tmp_path / "schnell.safetensors")
    assert not schnell.params.guidance_embed
    out = run(schnell, io, guidance=None)
    assert torch.equal(out, run(schnell, io, guidance=io["guidance"] * 7))  # ignored: no guidance embedding
    dev = load_flux(golden / "flux_tiny_weights.safetensors")
    with pytest.raises(ValueError, match="guidance"):
        run(dev, io, guidance=None)


def test_gradient_checkpointing_gives_the_same_output_and_gradients(golden, io):
    def loss_and_grads(checkpointing: bool):
        model = load_flux(golden / "flux_tiny_weights.safetensors").train()
        model.gradient_checkpointing = checkpointing
        weight = model.double_blocks[0].img_attn.qkv.weight.requires_grad_(True)
        out = model(io["img"], io["img_ids"], io["txt"], io["txt_ids"], io["timesteps"], io["y"], io["guidance"])
        out.square().mean().backward()
        return out.detach(), weight.grad

    out_a, grad_a = loss_and_grads(False)
    out_b, grad_b = loss_and_grads(True)
    assert torch.equal(out_a, out_b) and torch.allclose(grad_a, grad_b, atol=1e-6)


def test_bfloat16_load_stays_close_to_float32(golden, io):
    model = load_flux(golden / "flux_tiny_weights.safetensors", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    out = run(model, io, img=io["img"].bfloat16(), txt=io["txt"].bfloat16())
    assert out.dtype == torch.bfloat16
    assert (out.float() - io["out"]).abs().max() < 0.1 * io["out"].abs().max()


def test_params_reject_inconsistent_sizes():
    with pytest.raises(ValueError, match="axes_dim"):
        replace(FluxParams(), axes_dim=(16, 56, 50))
    with pytest.raises(ValueError, match="num_heads"):
        replace(FluxParams(), num_heads=7)
