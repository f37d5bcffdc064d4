"""Every wrong file gets one clear message naming the file, what it holds and what was expected."""

import pickle

import pytest
import torch
from safetensors.torch import save_file

from trainer.models import ModelFileError, load_autoencoder, load_clip_l, load_flux, load_t5xxl
from trainer.models.tiny import clip_l_state_dict, t5_state_dict, write_flux


def sdxl_checkpoint(path):
    """Key layout of an SDXL checkpoint (tiny tensors: only the names matter for recognition)."""
    keys = ["model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.label_emb.0.0.weight",
            "model.diffusion_model.out.2.weight", "first_stage_model.encoder.down.0.block.0.conv1.weight",
            "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight",
            "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"]
    save_file({k: torch.zeros(1) for k in keys}, str(path))
    return path


def expect_error(load, path, *fragments):
    with pytest.raises(ModelFileError) as info:
        load(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_sdxl_checkpoint_given_as_flux(tmp_path):
    message = expect_error(load_flux, sdxl_checkpoint(tmp_path / "sd_xl_base_1.0.safetensors"), "SDXL UNet",
                           "expected a FLUX.1 transformer")
    assert "1.x/2.x" not in message  # the SDXL UNet also has SD1's anchor key; it is named once, as SDXL


def test_diffusers_flux_is_not_mistaken_for_sd3():
    from trainer.models.formats import find_components

    keys = ["transformer_blocks.0.attn.add_q_proj.weight", "single_transformer_blocks.0.attn.to_q.weight"]
    assert [c.kind for c in find_components(keys)] == ["flux_diffusers"]
    assert [c.kind for c in find_components(keys[:1])] == ["sd3_diffusers"]
    vision = ["vision_model.encoder.layers.0.mlp.fc1.weight", "text_model.encoder.layers.0.mlp.fc1.weight"]
    assert [(c.kind, c.prefix) for c in find_components(vision)] == [("clip", "text_model.")]


def test_t5_given_as_clip_and_clip_given_as_t5(tmp_path):
    t5 = tmp_path / "t5xxl_fp16.safetensors"
    save_file(t5_state_dict(), str(t5))
    expect_error(load_clip_l, t5, "holds a T5 encoder", "expected a CLIP-L text encoder")
    clip = tmp_path / "clip_l.safetensors"
    save_file(clip_l_state_dict(), str(clip))
    expect_error(load_t5xxl, clip, "holds a CLIP text encoder", "expected a T5-XXL text encoder")


def test_flux_given_as_autoencoder_and_autoencoder_as_flux(tmp_path, golden):
    expect_error(load_autoencoder, golden / "flux_tiny_weights.safetensors", "FLUX.1 transformer",
                 "expected the FLUX autoencoder")
    expect_error(load_flux, golden / "ae_tiny_weights.safetensors", "autoencoder", "expected a FLUX.1 transformer")


def test_sd_vae_given_as_flux_autoencoder(tmp_path):
    from trainer.models.autoencoder import AutoEncoderParams
    from trainer.models.tiny import write_ae

    path = write_ae(tmp_path / "sdxl_vae.safetensors",
                    AutoEncoderParams(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4))
    expect_error(load_autoencoder, path, "4 latent channels", "16")


def test_lora_given_as_model(golden):
    expect_error(load_flux, golden / "flux_tiny_lora.safetensors", "holds a LoRA")


class Tripwire:
    """Unpickling this would create a file: proof that a loader unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".safetensors"])
def test_pickles_are_refused_and_never_unpickled(tmp_path, suffix):
    tripwire = tmp_path / "unpickled"
    torch_zip = tmp_path / f"model{suffix}"
    torch.save({"weights": Tripwire(tripwire)}, torch_zip)
    expect_error(load_flux, torch_zip, "PyTorch checkpoint", "never opened")
    raw = tmp_path / f"raw{suffix}"
    raw.write_bytes(pickle.dumps(Tripwire(tripwire), protocol=4))
    expect_error(load_t5xxl, raw, "Python pickle")
    assert not tripwire.exists()


def test_truncated_file(tmp_path):
    whole = write_flux(tmp_path / "flux.safetensors")
    cut = tmp_path / "flux-partial.safetensors"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    expect_error(load_flux, cut, "truncated")


def test_folder_missing_empty_and_foreign_files(tmp_path):
    expect_error(load_flux, tmp_path, "is a folder")
    expect_error(load_flux, tmp_path / "nope.safetensors", "no such file")
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    expect_error(load_autoencoder, empty, "0 bytes")
    text = tmp_path / "notes.safetensors"
    text.write_text("these are not weights, just some text long enough")
    expect_error(load_clip_l, text, "not a safetensors file")
    gguf = tmp_path / "flux1-dev-Q4.gguf"
    gguf.write_bytes(b"GGUF" + bytes(64))
    expect_error(load_flux, gguf, "GGUF")


def test_damaged_header(tmp_path):
    path = tmp_path / "damaged.safetensors"
    header = b'{"a": {"dtype": "F32", "shape": [2]}}'
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    expect_error(load_flux, path, "damaged safetensors header")


def test_flux_file_with_a_missing_block_tensor(tmp_path):
    from safetensors.torch import load_file

    state = load_file(write_flux(tmp_path / "flux.safetensors"))
    del state["single_blocks.1.linear2.weight"]
    save_file(state, str(tmp_path / "broken.safetensors"))
    expect_error(load_flux, tmp_path / "broken.safetensors", "missing", "single_blocks.1.linear2.weight")


def test_flux_file_with_a_wrong_shape(tmp_path):
    from safetensors.torch import load_file

    state = load_file(write_flux(tmp_path / "flux.safetensors"))
    state["double_blocks.1.img_mlp.2.weight"] = torch.zeros(64, 100)
    save_file(state, str(tmp_path / "broken.safetensors"))
    expect_error(load_flux, tmp_path / "broken.safetensors",
                 "double_blocks.1.img_mlp.2.weight", "[64, 100]", "[64, 256]")
