"""The same model saved in every supported layout loads to the same function."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from trainer.models import load_autoencoder, load_clip_l, load_flux, load_t5xxl
from trainer.models.flux import FP8_DTYPES
from trainer.models.flux_diffusers import to_diffusers
from trainer.models.tiny import (
    TINY_FLUX,
    ae_state_dict,
    clip_l_state_dict,
    flux_state_dict,
    fp8_rounded,
    t5_state_dict,
    write_comfy_checkpoint,
    write_flux,
)


@pytest.fixture(scope="module")
def io(golden):
    return load_file(golden / "flux_tiny_io.safetensors")


def tiny_inputs(seed=0, batch=2, tokens=24, text=5):
    g = torch.Generator().manual_seed(seed)
    from trainer.flow import image_ids, text_ids
    return dict(img=torch.randn(batch, tokens, 64, generator=g), img_ids=image_ids(batch, 8, 12),
                txt=torch.randn(batch, text, TINY_FLUX.context_in_dim, generator=g), txt_ids=text_ids(batch, text),
                timesteps=torch.rand(batch, generator=g), y=torch.randn(batch, TINY_FLUX.vec_in_dim, generator=g),
                guidance=torch.full((batch,), 3.5))


def predict(model, inputs):
    with torch.no_grad():
        return model(**inputs)


@pytest.fixture(scope="module")
def bfl_reference(tmp_path_factory):
    path = write_flux(tmp_path_factory.mktemp("bfl") / "flux.safetensors")
    return predict(load_flux(path), tiny_inputs())


@pytest.mark.parametrize("layout", ["bfl", "comfy", "diffusers"])
def test_every_layout_gives_the_same_model(tmp_path, layout, bfl_reference):
    path = write_flux(tmp_path / f"{layout}.safetensors", layout=layout)
    model = load_flux(path)
    assert model.params == TINY_FLUX
    assert torch.equal(predict(model, tiny_inputs()), bfl_reference)


def test_comfy_layout_really_is_prefixed_and_diffusers_really_is_split(tmp_path):
    comfy = load_file(write_flux(tmp_path / "c.safetensors", layout="comfy"))
    assert all(k.startswith("model.diffusion_model.") for k in comfy)
    diffusers = load_file(write_flux(tmp_path / "d.safetensors", layout="diffusers"))
    assert "transformer_blocks.0.attn.to_q.weight" in diffusers and not any("double_blocks" in k for k in diffusers)


@pytest.mark.parametrize("fp8", FP8_DTYPES, ids=["e4m3fn", "e5m2"])
@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "scaled"])
def test_fp8_files_load_cast_or_kept_in_fp8(tmp_path, fp8, scaled):
    path = write_flux(tmp_path / "fp8.safetensors", fp8=fp8, scaled=scaled)
    save_file(fp8_rounded(flux_state_dict(), fp8, scaled), str(tmp_path / "rounded.safetensors"))
    expected = predict(load_flux(tmp_path / "rounded.safetensors"), tiny_inputs())

    default = load_flux(path)
    assert default.double_blocks[0].img_attn.qkv.weight.dtype == torch.bfloat16  # fp8 files compute in bf16

    cast = load_flux(path, dtype=torch.float32)
    assert {p.dtype for p in cast.parameters()} == {torch.float32}
    assert torch.allclose(predict(cast, tiny_inputs()), expected, atol=1e-5)

    kept = load_flux(path, dtype=torch.float32, fp8=True)
    weight = kept.single_blocks[1].linear1.weight
    assert weight.dtype == fp8
    assert kept.img_in.weight.dtype == torch.float32 and kept.single_blocks[1].linear1.bias.dtype == torch.float32
    assert torch.allclose(predict(kept, tiny_inputs()), expected, atol=1e-5)


def test_a_bf16_file_can_be_kept_in_fp8_for_memory(tmp_path, bfl_reference):
    path = write_flux(tmp_path / "bf16.safetensors", dtype=torch.bfloat16)
    model = load_flux(path, dtype=torch.float32, fp8=torch.float8_e4m3fn)
    assert model.double_blocks[1].txt_mlp[2].weight.dtype == torch.float8_e4m3fn
    out = predict(model, tiny_inputs())
    assert (out - bfl_reference).abs().max() < 0.1 * bfl_reference.abs().max()


def test_fp8_weights_work_under_autocast(tmp_path):
    path = write_flux(tmp_path / "fp8.safetensors", fp8=torch.float8_e4m3fn)
    model = load_flux(path, dtype=torch.float32, fp8=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = predict(model, tiny_inputs())
    reference = predict(load_flux(path, dtype=torch.float32), tiny_inputs())
    assert out.dtype == torch.bfloat16
    assert (out.float() - reference).abs().max() < 0.05 * reference.abs().max()


def test_diffusers_layout_agrees_with_the_diffusers_library(tmp_path, golden, io):
    """diffusers' own FluxTransformer2DModel is an implementation nobody here wrote: its state dict, loaded here,
    must compute what it computes; and the golden weights converted to its layout must compute the golden output."""
    diffusers = pytest.importorskip("diffusers")
    reference = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=32, num_attention_heads=2,
        joint_attention_dim=48, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 14, 14))

    def diffusers_forward():
        with torch.no_grad():
            return reference(hidden_states=io["img"], encoder_hidden_states=io["txt"], pooled_projections=io["y"],
                             timestep=io["timesteps"], img_ids=io["img_ids"][0], txt_ids=io["txt_ids"][0],
                             guidance=io["guidance"]).sample

    golden_state = load_file(golden / "flux_tiny_weights.safetensors")
    reference.load_state_dict(to_diffusers(golden_state, 64), strict=True)
    assert (diffusers_forward() - io["out"]).abs().max() < 1e-4

    g = torch.Generator().manual_seed(1)
    for p in reference.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.2
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(tmp_path / "diffusers.safetensors"))
    ours = load_flux(tmp_path / "diffusers.safetensors")
    out = predict(ours, dict(img=io["img"], img_ids=io["img_ids"], txt=io["txt"], txt_ids=io["txt_ids"],
                             timesteps=io["timesteps"], y=io["y"], guidance=io["guidance"]))
    assert (out - diffusers_forward()).abs().max() < 1e-4


def test_comfyui_full_checkpoint_yields_all_four_models(tmp_path):
    path = write_comfy_checkpoint(tmp_path / "flux1-dev-tiny.safetensors", seed=10)
    flux = load_flux(path)
    assert all(torch.equal(flux.state_dict()[k], v) for k, v in flux_state_dict(seed=10).items())
    ae = load_autoencoder(path)
    assert all(torch.equal(ae.state_dict()[k], v) for k, v in ae_state_dict(seed=11).items())
    clip = load_clip_l(path)
    clip_state = {k.removeprefix("text_model."): v for k, v in clip_l_state_dict(seed=12).items()}
    assert all(torch.equal(v, clip_state[k]) for k, v in clip.model.state_dict().items() if k in clip_state)
    t5 = load_t5xxl(path)
    expected_t5 = t5_state_dict(seed=13)
    assert all(torch.equal(t5.model.state_dict()[k], v) for k, v in expected_t5.items())
    assert t5.model.encoder.embed_tokens.weight is t5.model.shared.weight


def test_loading_assigns_tensors_without_a_second_copy(tmp_path):
    """Parameters are the tensors read from the file (converted once), not copies into a preallocated model."""
    path = write_flux(tmp_path / "flux.safetensors")
    model = load_flux(path)
    assert not any(p.is_meta for p in model.parameters())
    pointers = [p.data_ptr() for p in model.parameters()]
    assert len(set(pointers)) == len(pointers)
    assert all(not p.requires_grad for p in model.parameters()) and not model.training
