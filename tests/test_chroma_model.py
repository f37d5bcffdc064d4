"""Chroma (trainer/models/chroma.py): read from its real file layout, detected apart from FLUX, computing what
sd-scripts' Chroma computes, and trainable with FLUX's machinery (block runners, block swap, LoRA targets, fp8)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from trainer import memory
from trainer.block_swap import BlockSwapRunner
from trainer.errors import ModelFileError
from trainer.flow import image_ids, text_ids
from trainer.lora import LoRAConfig, LoRANetwork
from trainer.lora.targets import plan_flux
from trainer.models import load_flux, read_flux_params
from trainer.models.chroma import Chroma, ChromaParams, NoClipL, text_key_mask
from trainer.models.flux import FP8_DTYPES, Flux, FluxParams
from trainer.models.formats import describe, find_components
from trainer.models.loading import build_transformer, check_transformer_type, model_type_of
from trainer.models.tiny import write_flux
from trainer.models.tiny_chroma import TINY_CHROMA, chroma_state_dict, write_chroma

# keys every Chroma checkpoint has (Chroma1-Base's names), and FLUX's that it has not
CHROMA_KEYS = ("img_in.weight", "txt_in.weight", "distilled_guidance_layer.in_proj.weight",
               "distilled_guidance_layer.layers.0.in_layer.weight", "distilled_guidance_layer.layers.0.out_layer.bias",
               "distilled_guidance_layer.norms.0.scale", "distilled_guidance_layer.out_proj.weight",
               "double_blocks.0.img_attn.qkv.weight", "double_blocks.0.txt_mlp.2.bias",
               "double_blocks.0.img_attn.norm.key_norm.scale", "single_blocks.0.linear1.weight",
               "single_blocks.0.norm.query_norm.scale", "final_layer.linear.weight")
FLUX_ONLY = ("time_in.", "vector_in.", "guidance_in.", "_mod.", ".modulation.", "adaLN_modulation")


def inputs(params, seed=0, batch=2, text=6, lengths=(2, 6)):
    g = torch.Generator().manual_seed(seed)
    return dict(img=torch.randn(batch, 24, params.in_channels, generator=g), img_ids=image_ids(batch, 8, 12),
                txt=torch.randn(batch, text, params.context_in_dim, generator=g), txt_ids=text_ids(batch, text),
                timesteps=torch.rand(batch, generator=g), guidance=torch.zeros(batch),
                txt_attention_mask=torch.arange(text)[None] < torch.tensor(lengths)[:, None])


def tiny_chroma(params=TINY_CHROMA, seed=3) -> Chroma:
    model = Chroma(params)
    model.load_state_dict(chroma_state_dict(params, seed))
    return model.requires_grad_(False).eval()


# ----------------------------------------------------------------------------------------------- loading

@pytest.mark.parametrize("layout", ["bfl", "comfy"])
def test_a_chroma_file_loads_as_chroma_with_its_sizes_read_off_the_file(tmp_path, layout):
    other = dataclasses.replace(TINY_CHROMA, hidden_size=96, num_heads=3, mlp_hidden_dim=192, depth=3,
                                depth_single_blocks=1, approximator_hidden_dim=40, approximator_layers=3,
                                context_in_dim=24, approximator_in_dim=32, axes_dim=(4, 14, 14))
    for params in (TINY_CHROMA, other):
        path = write_chroma(tmp_path / f"{layout}.safetensors", params, layout=layout, seed=1)
        assert read_flux_params(path) == params
        model = load_flux(path)
        assert type(model) is Chroma and model.params == params
        assert model_type_of(model.params) == "chroma"
        expected = {k: v for k, v in chroma_state_dict(params, seed=1).items()}
        assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())


def test_the_model_holds_exactly_chromas_keys():
    keys = set(Chroma(TINY_CHROMA).state_dict())
    assert set(CHROMA_KEYS) <= keys
    assert not [k for k in keys if any(f in k for f in FLUX_ONLY)]
    assert len([k for k in keys if k.startswith("distilled_guidance_layer.norms.")]) == TINY_CHROMA.approximator_layers


def test_flux_files_still_load_as_flux_and_chroma_is_told_apart(tmp_path):
    flux = load_flux(write_flux(tmp_path / "flux.safetensors"))
    assert type(flux) is Flux and isinstance(flux.params, FluxParams) and model_type_of(flux.params) == "flux"
    chroma_keys = list(chroma_state_dict())
    assert [(c.kind, c.prefix) for c in find_components(chroma_keys)] == [("chroma", "")]
    comfy = ["model.diffusion_model." + k for k in chroma_keys]
    assert [(c.kind, c.prefix) for c in find_components(comfy)] == [("chroma", "model.diffusion_model.")]
    assert describe(chroma_keys) == "a Chroma transformer"


def test_chroma_radiance_is_refused_naming_what_it_is(tmp_path):
    from trainer.atomic import save_safetensors

    state = {k: v for k, v in chroma_state_dict().items() if not k.startswith("img_in.")}
    state["nerf_blocks.0.norm.scale"] = torch.ones(4)
    path = save_safetensors(state, tmp_path / "radiance.safetensors")
    with pytest.raises(ModelFileError, match="holds a Chroma Radiance transformer .pixel space.; expected a FLUX.1"):
        load_flux(path)


def test_params_build_their_own_transformer():
    from trainer.models.tiny import TINY_FLUX

    assert type(build_transformer(TINY_CHROMA)) is Chroma and type(build_transformer(TINY_FLUX)) is Flux


def test_model_type_must_match_the_file():
    check_transformer_type("x.safetensors", TINY_CHROMA, "chroma")
    check_transformer_type("x.safetensors", FluxParams(), "flux")
    with pytest.raises(ModelFileError, match="holds a Chroma transformer, but --model_type is 'flux'; set "
                                             "--model_type chroma"):
        check_transformer_type("x.safetensors", TINY_CHROMA, "flux")
    with pytest.raises(ModelFileError, match="holds a FLUX.1 transformer, but --model_type is 'chroma'"):
        check_transformer_type("x.safetensors", FluxParams(), "chroma")


def test_fp8_keeps_the_block_weights_in_fp8_and_computes_nearly_the_same(tmp_path):
    path = write_chroma(tmp_path / "c.safetensors")
    full, fp8 = load_flux(path), load_flux(path, fp8=True)
    assert fp8.double_blocks[0].img_attn.qkv.weight.dtype in FP8_DTYPES
    assert fp8.single_blocks[0].linear2.weight.dtype in FP8_DTYPES
    assert fp8.distilled_guidance_layer.in_proj.weight.dtype == torch.float32
    with torch.no_grad():
        a, b = full(**inputs(TINY_CHROMA)), fp8(**inputs(TINY_CHROMA))
    assert 0 < (a - b).abs().max() < 0.1 * a.abs().max()


# ------------------------------------------------------------------------------------------------ forward

def test_each_consumer_gets_the_vectors_chroma_assigns_it():
    """Chroma's order (sd-scripts' distribute_modulations, ComfyUI's get_modulations) at 2 double + 2 single blocks:
    singles 0-5, double images 6-17, double texts 18-29, last layer 30-31."""
    model = tiny_chroma()
    x = inputs(TINY_CHROMA)
    vectors = model.modulation_vectors(x["timesteps"], x["guidance"])
    assert vectors.shape == (2, 32, TINY_CHROMA.hidden_size)
    seen = {}
    for kind, blocks in (("double", model.double_blocks), ("single", model.single_blocks)):
        for i, block in enumerate(blocks):
            position = 2 if kind == "double" else 1
            block.register_forward_pre_hook(lambda m, args, key=(kind, i), at=position: seen.update({key: args[at]}))
    model.final_layer.register_forward_pre_hook(lambda m, args: seen.update({"final": args[1]}))
    with torch.no_grad():
        model(**x)
    expected = {("single", 0): [0, 1, 2], ("single", 1): [3, 4, 5],
                ("double", 0): [*range(6, 12), *range(18, 24)], ("double", 1): [*range(12, 18), *range(24, 30)],
                "final": [30, 31]}
    for key, rows in expected.items():
        assert torch.equal(seen[key], vectors[:, rows]), key


def test_the_approximator_sees_timestep_guidance_and_index_embeddings():
    model = tiny_chroma()
    t, g = torch.tensor([0.25, 0.9]), torch.tensor([0.0, 4.0])
    captured = {}
    model.distilled_guidance_layer.register_forward_pre_hook(lambda m, args: captured.update(x=args[0]))
    model.modulation_vectors(t, g)
    x = captured["x"]
    assert x.shape == (2, 32, 64)
    half = torch.exp(-torch.log(torch.tensor(10_000.0)) * torch.arange(8) / 8)
    t_embedding = torch.cat([torch.cos(1000 * t[:, None] * half), torch.sin(1000 * t[:, None] * half)], -1)
    assert torch.allclose(x[:, 5, :16], t_embedding, atol=1e-5)
    assert torch.equal(x[0, :, 16:32], x[0, :1, 16:32].expand(32, -1)) and torch.all(x[0, :, 16] == 1)  # cos(0)
    index = torch.exp(-torch.log(torch.tensor(10_000.0)) * torch.arange(16) / 16)
    assert torch.allclose(x[1, 7, 32:], torch.cat([torch.cos(7000 * index), torch.sin(7000 * index)]), atol=1e-3)


def test_a_masked_batch_is_each_sample_alone_with_its_caption_and_one_padding_token():
    """sd-scripts' Chroma trims each sample's text to its length + 1: padding beyond that changes nothing."""
    model = tiny_chroma()
    x = inputs(TINY_CHROMA, lengths=(2, 6))
    with torch.no_grad():
        batch = model(**x)
        for i, kept in enumerate((3, 6)):
            alone = {k: v[i:i + 1] for k, v in x.items() if k != "txt_attention_mask"}
            alone["txt"], alone["txt_ids"] = alone["txt"][:, :kept], alone["txt_ids"][:, :kept]
            assert torch.allclose(batch[i:i + 1], model(**alone), atol=1e-5)
        garbage = dict(x, txt=x["txt"].clone())
        garbage["txt"][0, 3:] = 100.0
        assert torch.allclose(model(**garbage)[0], batch[0], atol=1e-5)
        unmasked = dict(x, txt_attention_mask=None)
        assert not torch.allclose(model(**unmasked)[0], batch[0], atol=1e-3)


def test_text_key_mask_adds_one_token_and_stops_at_the_end():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    assert text_key_mask(mask).tolist() == [[True, True, True, False], [True] * 4, [True, False, False, False]]
    assert text_key_mask(mask, extra=0).tolist() == mask.bool().tolist()


def test_guidance_defaults_to_zero_and_the_pooled_vector_is_ignored():
    model = tiny_chroma()
    x = inputs(TINY_CHROMA)
    with torch.no_grad():
        reference = model(**x)
        assert torch.equal(model(**dict(x, guidance=None)), reference)
        assert torch.equal(model(**x, y=torch.randn(2, 768)), reference)
        assert not torch.allclose(model(**dict(x, guidance=torch.full((2,), 4.0))), reference)


# ------------------------------------------------------------------------------------------- training seams

def test_lora_targets_are_sd_scripts_chroma_modules():
    """sd-scripts' lora_flux takes every Linear inside DoubleStreamBlock/SingleStreamBlock; Chroma's blocks have no
    modulation Linears. in_dims reach img_in and txt_in only (Chroma has no time/vector/guidance embedders)."""
    model = Chroma(TINY_CHROMA)
    names = {t.name for t in plan_flux(model, LoRAConfig(network_dim=4, in_dims=(2, 2, 2, 2, 2)))}
    per_double = ["img_attn_qkv", "img_attn_proj", "img_mlp_0", "img_mlp_2",
                  "txt_attn_qkv", "txt_attn_proj", "txt_mlp_0", "txt_mlp_2"]
    expected = {f"lora_unet_double_blocks_{i}_{n}" for i in range(2) for n in per_double}
    expected |= {f"lora_unet_single_blocks_{i}_linear{j}" for i in range(2) for j in (1, 2)}
    assert names == expected | {"lora_unet_img_in", "lora_unet_txt_in"}


def train(model: Chroma, steps=2):
    torch.manual_seed(0)
    network = LoRANetwork.create(LoRAConfig(network_dim=4, network_alpha=4), model).attach()
    with torch.no_grad():
        for m in network.loras:
            m.lora_up.weight.normal_(0, 0.1)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    model.train()
    losses = []
    for step in range(steps):
        loss = model(**inputs(TINY_CHROMA, seed=10 + step)).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return torch.stack(losses), [p.detach().clone() for p in network.parameters()]


@pytest.mark.parametrize("runner", [memory.CheckpointedRunner, memory.OffloadedCheckpointRunner,
                                    lambda: BlockSwapRunner(2, True, compute_device="cpu")],
                         ids=["checkpointed", "offloaded_checkpointing", "block_swap"])
def test_block_runners_train_chroma_as_plain_calls_do(runner):
    plain_losses, plain_weights = train(tiny_chroma())
    model, calls = tiny_chroma(), []
    for kind, blocks in (("double", model.double_blocks), ("single", model.single_blocks)):
        for i, block in enumerate(blocks):
            block.register_forward_pre_hook(lambda m, args, key=(kind, i): calls.append(key))
    memory.install(model, runner())
    if isinstance(model.block_runner, BlockSwapRunner):  # the last double and single block stream from host memory
        for block in (model.double_blocks[-1], model.single_blocks[-1]):
            assert all(m.weight.numel() == 0 for m in block.modules() if isinstance(m, nn.Linear))
    losses, weights = train(model)
    assert calls[:4] == [("double", 0), ("double", 1), ("single", 0), ("single", 1)]
    assert torch.equal(losses, plain_losses)
    assert all(torch.equal(a, b) for a, b in zip(weights, plain_weights))


def test_parameter_counts_are_the_models_and_chroma1_is_8_9_billion():
    model = Chroma(TINY_CHROMA)
    double, single, other = TINY_CHROMA.parameter_counts()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert double == count(model.double_blocks[0]) and single == count(model.single_blocks[0])
    assert double * 2 + single * 2 + other == count(model)
    real = ChromaParams()
    double, single, other = real.parameter_counts()
    assert 8.85e9 < 19 * double + 38 * single + other < 8.95e9
    with torch.device("meta"):
        assert count(Chroma(real)) == 19 * double + 38 * single + other


def test_no_block_holds_a_modulation_linear():
    model = Chroma(TINY_CHROMA)
    for block in [*model.double_blocks, *model.single_blocks, model.final_layer]:
        linears = [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]
        assert not [n for n in linears if "mod" in n]


def test_no_clip_l_stands_in_with_an_empty_pooled_vector_chroma_ignores():
    assert NoClipL().encode(["a", "b"]).shape == (2, 0) and NoClipL().encode("a").shape == (1, 0)
    model, x = tiny_chroma(), inputs(TINY_CHROMA)
    with torch.no_grad():
        assert torch.equal(model(**x, y=NoClipL().encode(["a", "b"])), model(**x))
