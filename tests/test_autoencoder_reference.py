"""The FLUX autoencoder computes the reference function, with FLUX's latent scale and shift."""

import json

import pytest
import torch
from safetensors.torch import load_file

from trainer.models import load_autoencoder
from trainer.models.autoencoder import SCALE_FACTOR, SHIFT_FACTOR, AutoEncoder, AutoEncoderParams

TOL = 1e-4


@pytest.fixture(scope="module")
def io(golden):
    return load_file(golden / "ae_tiny_io.safetensors")


@pytest.fixture(scope="module")
def ae(golden):
    return load_autoencoder(golden / "ae_tiny_weights.safetensors", dtype=torch.float32)


def test_encoder_reproduces_reference_moments(ae, io):
    with torch.no_grad():
        assert (ae.encoder(io["x"]) - io["encoder_moments"]).abs().max() < TOL


def test_decoder_reproduces_reference_output(ae, io):
    with torch.no_grad():
        assert (ae.decoder(io["z"]) - io["decoder_out"]).abs().max() < TOL


def test_encode_scales_and_shifts_the_posterior_mean(ae, io):
    mean = io["encoder_moments"][:, :16]
    with torch.no_grad():
        latents = ae.encode(io["x"], sample=False)
    assert (latents - 0.3611 * (mean - 0.1159)).abs().max() < TOL


def test_decode_inverts_the_latent_scaling(ae, io):
    latents = SCALE_FACTOR * (io["z"] - SHIFT_FACTOR)
    with torch.no_grad():
        assert (ae.decode(latents) - io["decoder_out"]).abs().max() < TOL


def test_sampled_encoding_follows_the_posterior(ae, io):
    mean, logvar = io["encoder_moments"].chunk(2, dim=1)
    with torch.no_grad():
        a = ae.encode(io["x"], generator=torch.Generator().manual_seed(5))
        b = ae.encode(io["x"], generator=torch.Generator().manual_seed(5))
        c = ae.encode(io["x"], generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    noise = (a / SCALE_FACTOR + SHIFT_FACTOR - mean) / torch.exp(0.5 * logvar)
    assert abs(noise.mean().item()) < 0.1 and abs(noise.std().item() - 1) < 0.1


def test_full_size_autoencoder_has_reference_names_and_shapes(golden):
    manifest = json.loads((golden / "flux_key_manifest.json").read_text())["ae"]
    params = AutoEncoderParams.from_shapes(manifest)
    assert params == AutoEncoderParams()
    with torch.device("meta"):
        model = AutoEncoder(params)
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == manifest


def test_config_is_read_from_shapes(golden):
    from safetensors import safe_open

    with safe_open(str(golden / "ae_tiny_weights.safetensors"), "pt") as f:
        config = json.loads(f.metadata()["config"])
    p = load_autoencoder(golden / "ae_tiny_weights.safetensors").params
    assert (p.ch, list(p.ch_mult), p.num_res_blocks, p.z_channels) == (
        config["ch"], config["ch_mult"], config["num_res_blocks"], config["z_channels"])
