"""Test-only ComfyUI node pack: loaders for tiny FLUX-shaped model files that build ComfyUI's OWN models.

ComfyUI's stock UNETLoader / DualCLIPLoader / VAELoader detect a model from its tensor names and then hard-code
the full FLUX.1 widths (comfy/model_detection.py: hidden 3072, 24 heads, context 4096; comfy/sd.py: the 16-channel
VAE at ch=128; CLIP-L and T5-XXL from their JSON configs), so the tiny files of trainer/models/tiny.py can't go
through them. These three nodes take the same widgets from the same folder lists, read every size from the file's
tensor shapes, build ComfyUI's own classes at those sizes (model_base.Flux in a ModelPatcher, comfy.sd.CLIP with
FluxClipModel/FluxTokenizer, comfy.sd.VAE with the ldm Encoder/Decoder) and load the file's weights into them. What
they return is what the stock loaders return (a ModelPatcher over model_base.Flux, a comfy.sd.CLIP, a comfy.sd.VAE),
so stock nodes work on it (tested: CLIPTextEncode, CLIPTextEncodeFlux, FluxGuidance, KSampler, VAEDecode).
Checked once against trainer/models (same files): the Flux forward and VAE encode/decode agree to 1e-6, T5 to
1e-6, CLIP-L to ~1e-2 (ComfyUI keeps text encoders in fp16 on the CPU, comfy/model_management.py:894).

Tokenizers: ComfyUI's own (CLIP BPE, ids < 49408; T5 sentencepiece, ids < 32100). The tiny CLIP-L and T5 files keep
the real vocabulary sizes (49408 / 32128 embedding rows, trainer/models/tiny.py CLIP_VOCAB / T5_VOCAB), so every id
the real tokenizers emit indexes a row: nothing needs remapping.

Loaded by tests/comfyui_server.py, which links this folder into the server's custom_nodes/. V3 API only.
"""

from __future__ import annotations

import re

import comfy.model_detection
import comfy.model_management as mm
import comfy.model_patcher
import comfy.sd
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import ComfyExtension, io
from typing_extensions import override

import nodes

PREFIX = "FluxTrainerTest"


def _stock_options(node: str, section: str, name: str) -> list:
    """The options of a stock node's combo widget, so that a tiny loader takes the same widget values."""
    spec = nodes.NODE_CLASS_MAPPINGS[node].INPUT_TYPES()[section][name]
    return list(spec[0])


def _count(keys, pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def _shape(sd: dict, key: str, what: str) -> torch.Size:
    if key not in sd:
        raise ValueError(f"{what}: tensor '{key}' is missing; the file does not hold a {what} in the expected layout")
    return sd[key].shape


# ---------------------------------------------------------------------------------------------------------- FLUX


def flux_unet_config(sd: dict) -> dict:
    """ComfyUI's own Flux detection (names, depths, guidance) with the widths it hard-codes read from the shapes."""
    config = comfy.model_detection.detect_unet_config(sd, "")
    if not config or config.get("image_model") != "flux":
        raise ValueError("not a FLUX transformer (BFL or ComfyUI layout expected)")
    hidden, packed_in = _shape(sd, "img_in.weight", "FLUX transformer")
    head_dim = _shape(sd, "double_blocks.0.img_attn.norm.query_norm.scale", "FLUX transformer")[0]
    patch = config["patch_size"]
    first = 2 * round(head_dim / 16)  # FLUX's rotary split 1/8 : 7/16 : 7/16 ([16, 56, 56] at head size 128)
    second = 2 * ((head_dim - first) // 4)
    config.update(
        in_channels=packed_in // (patch * patch),
        out_channels=_shape(sd, "final_layer.linear.weight", "FLUX transformer")[0] // (patch * patch),
        context_in_dim=_shape(sd, "txt_in.weight", "FLUX transformer")[1],
        hidden_size=hidden,
        mlp_ratio=_shape(sd, "double_blocks.0.img_mlp.0.weight", "FLUX transformer")[0] / hidden,
        num_heads=hidden // head_dim,
        axes_dim=[first, second, head_dim - first - second],
        qkv_bias="double_blocks.0.img_attn.qkv.bias" in sd,
    )
    return config


def load_tiny_flux(path: str, weight_dtype: str = "default") -> comfy.model_patcher.ModelPatcher:
    """comfy.sd.load_diffusion_model_state_dict (comfy/sd.py) with the detected config corrected for tiny widths."""
    sd = comfy.utils.load_torch_file(path)
    prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
    stripped = comfy.utils.state_dict_prefix_replace(sd, {prefix: ""}, filter_keys=True)
    if stripped:
        sd = stripped
    model_config = comfy.model_detection.model_config_from_unet_config(flux_unet_config(sd), sd)
    if model_config is None:
        raise ValueError(f"ComfyUI has no model class for the FLUX transformer in {path}")
    dtype = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e4m3fn_fast": torch.float8_e4m3fn,
             "fp8_e5m2": torch.float8_e5m2}.get(weight_dtype)
    load_device = mm.get_torch_device()
    offload_device = mm.unet_offload_device()
    if dtype is None:
        dtype = mm.unet_dtype(model_params=comfy.utils.calculate_parameters(sd),
                              supported_dtypes=list(model_config.supported_inference_dtypes),
                              weight_dtype=comfy.utils.weight_dtype(sd))
    manual_cast = mm.unet_manual_cast(dtype, load_device, model_config.supported_inference_dtypes)
    model_config.set_inference_dtype(dtype, manual_cast)
    if weight_dtype == "fp8_e4m3fn_fast":
        model_config.optimizations["fp8"] = True
    model = model_config.get_model(sd, "").to(offload_device)
    expected = set(model.diffusion_model.state_dict())
    missing = sorted(expected - set(sd))
    if missing:
        raise ValueError(f"{path}: the FLUX transformer lacks {len(missing)} tensors, e.g. {missing[:3]}")
    model.load_model_weights(sd, "")
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


# ------------------------------------------------------------------------------------------------ CLIP-L and T5


def clip_l_config(sd: dict) -> dict:
    """Overrides of comfy/sd1_clip_config.json (CLIP-L) for the sizes in a text_model.* state dict."""
    hidden = _shape(sd, "text_model.embeddings.token_embedding.weight", "CLIP-L")[1]
    config = {
        "hidden_size": hidden,
        "num_attention_heads": max(1, hidden // 64),  # CLIP-L: 64 per head (768 / 12); not visible in shapes
        "intermediate_size": _shape(sd, "text_model.encoder.layers.0.mlp.fc1.weight", "CLIP-L")[0],
        "num_hidden_layers": _count(sd, r"text_model\.encoder\.layers\.(\d+)\."),
        "max_position_embeddings": _shape(sd, "text_model.embeddings.position_embedding.weight", "CLIP-L")[0],
        "vocab_size": sd["text_model.embeddings.token_embedding.weight"].shape[0],
    }
    if "text_projection.weight" in sd:
        config["projection_dim"] = sd["text_projection.weight"].shape[0]
    return config


def t5_config(sd: dict) -> dict:
    """Overrides of comfy/text_encoders/t5_config_xxl.json for the sizes in a T5 encoder state dict."""
    shared = _shape(sd, "shared.weight", "T5 encoder")
    attn = "encoder.block.0.layer.0.SelfAttention."
    buckets, heads = _shape(sd, attn + "relative_attention_bias.weight", "T5 encoder")
    return {
        "d_model": shared[1],
        "vocab_size": shared[0],
        "num_heads": heads,
        "d_kv": _shape(sd, attn + "q.weight", "T5 encoder")[0] // heads,
        "d_ff": _shape(sd, "encoder.block.0.layer.1.DenseReluDense.wi_0.weight", "T5 encoder (gated, v1.1)")[0],
        "num_layers": _count(sd, r"encoder\.block\.(\d+)\."),
        "relative_attention_num_buckets": buckets,
    }


def load_tiny_flux_clip(paths: list[str], device: str = "default") -> comfy.sd.CLIP:
    """comfy.sd.load_text_encoder_state_dicts with CLIPType.FLUX, as DualCLIPLoader does; only the two JSON configs
    are overridden, through model_options["<name>_model_config"] (read by SDClipModel, comfy/sd1_clip.py:106)."""
    state_dicts = [comfy.utils.load_torch_file(p, safe_load=True) for p in paths]
    clip_sd = [sd for sd in state_dicts if "text_model.embeddings.token_embedding.weight" in sd]
    t5_sd = [sd for sd in state_dicts if "shared.weight" in sd]
    if len(clip_sd) != 1 or len(t5_sd) != 1:
        raise ValueError(f"type flux takes one CLIP-L (text_model.*) and one T5 (shared.weight, encoder.*) file; "
                         f"got {len(clip_sd)} CLIP-L and {len(t5_sd)} T5 among {paths}")
    clip_l = clip_l_config(clip_sd[0])
    if clip_l["num_hidden_layers"] < 2:  # FluxClipModel.load_sd tells CLIP-L from T5 by layer 1 (text_encoders/flux.py)
        raise ValueError("a CLIP-L with fewer than 2 layers can't be loaded by ComfyUI's FLUX text encoder")
    # "model_config" too: comfy/text_encoders/long_clipl.py:23 replaces clip_l_model_config with
    # model_options["model_config"] (+ max_position_embeddings) whenever a CLIP-L state dict is loaded.
    model_options = {"clip_l_model_config": clip_l, "model_config": dict(clip_l),
                     "t5xxl_model_config": t5_config(t5_sd[0])}
    if device == "cpu":
        model_options["load_device"] = model_options["offload_device"] = torch.device("cpu")
    wanted = {f"clip_l.transformer.{k}" for k in clip_sd[0]} | {f"t5xxl.transformer.{k}" for k in t5_sd[0]}
    clip = comfy.sd.load_text_encoder_state_dicts(
        state_dicts, embedding_directory=folder_paths.get_folder_paths("embeddings"),
        clip_type=comfy.sd.CLIPType.FLUX, model_options=model_options)
    have = set(clip.cond_stage_model.state_dict())
    missing = sorted(k for k in have - wanted if ".transformer." in k and not k.endswith("position_ids"))
    if missing:
        raise ValueError(f"the text encoder files lack {len(missing)} tensors, e.g. {missing[:3]}")
    return clip


# ------------------------------------------------------------------------------------------------------- VAE


def ae_ddconfig(sd: dict) -> dict:
    """The ldm Encoder/Decoder config (comfy/ldm/modules/diffusionmodules/model.py) of a BFL/ldm autoencoder."""
    ch, in_channels = _shape(sd, "encoder.conv_in.weight", "autoencoder")[:2]
    levels = _count(sd, r"encoder\.down\.(\d+)\.")
    ch_mult = [_shape(sd, f"encoder.down.{i}.block.0.conv2.weight", "autoencoder")[0] // ch for i in range(levels)]
    if any(".attn." in k for k in sd if k.startswith("encoder.down.")):
        raise ValueError("autoencoders with attention in the down blocks are not supported here")
    z_channels = _shape(sd, "decoder.conv_in.weight", "autoencoder")[1]
    return {"double_z": _shape(sd, "encoder.conv_out.weight", "autoencoder")[0] == 2 * z_channels,
            "z_channels": z_channels, "resolution": 256, "in_channels": in_channels,
            "out_ch": _shape(sd, "decoder.conv_out.weight", "autoencoder")[0], "ch": ch, "ch_mult": ch_mult,
            "num_res_blocks": _count(sd, r"encoder\.down\.0\.block\.(\d+)\."), "attn_resolutions": [], "dropout": 0.0}


def load_tiny_vae(path: str) -> comfy.sd.VAE:
    """comfy.sd.VAE built through its `config` branch (comfy/sd.py: AutoencoderKL(**config["params"])).

    That class is the FLUX VAE's Encoder/Decoder plus 1x1 quant_conv / post_quant_conv, which the FLUX VAE lacks
    (comfy.sd.VAE picks AutoencodingEngine for it, with ch=128 hard-coded): identity 1x1 convs are added, so the
    model computes exactly the FLUX VAE."""
    sd = comfy.utils.load_torch_file(path)
    if "decoder.up_blocks.0.resnets.0.norm1.weight" in sd:
        raise ValueError(f"{path}: diffusers-layout VAEs are not supported by this test loader")
    ddconfig = ae_ddconfig(sd)
    z = ddconfig["z_channels"]
    moments = (1 + ddconfig["double_z"]) * z
    dtype = sd["decoder.conv_in.weight"].dtype
    sd.setdefault("quant_conv.weight", torch.eye(moments, dtype=dtype)[:, :, None, None])
    sd.setdefault("quant_conv.bias", torch.zeros(moments, dtype=dtype))
    sd.setdefault("post_quant_conv.weight", torch.eye(z, dtype=dtype)[:, :, None, None])
    sd.setdefault("post_quant_conv.bias", torch.zeros(z, dtype=dtype))
    vae = comfy.sd.VAE(sd=sd, config={"params": {"ddconfig": ddconfig, "embed_dim": z}})
    vae.latent_channels = z
    vae.downscale_ratio = vae.upscale_ratio = 2 ** (len(ddconfig["ch_mult"]) - 1)
    missing = sorted(set(vae.first_stage_model.state_dict()) - set(sd))
    if missing:
        raise ValueError(f"{path}: the autoencoder lacks {len(missing)} tensors, e.g. {missing[:3]}")
    return vae


# ----------------------------------------------------------------------------------------------------- nodes


class TinyUNETLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}UNETLoader",
            display_name="Load Tiny Diffusion Model (test)",
            category="testing/flux_trainer",
            description="UNETLoader for tiny FLUX files: ComfyUI's own Flux at the widths read from the file.",
            inputs=[
                io.Combo.Input("unet_name", options=folder_paths.get_filename_list("diffusion_models")),
                io.Combo.Input("weight_dtype", options=_stock_options("UNETLoader", "required", "weight_dtype")),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, unet_name, weight_dtype) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("diffusion_models", unet_name)
        return io.NodeOutput(load_tiny_flux(path, weight_dtype))


class TinyDualCLIPLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        encoders = folder_paths.get_filename_list("text_encoders")
        return io.Schema(
            node_id=f"{PREFIX}DualCLIPLoader",
            display_name="Load Tiny Dual CLIP (test)",
            category="testing/flux_trainer",
            description="DualCLIPLoader for tiny CLIP-L + T5 files (type flux only): ComfyUI's own FLUX text "
                        "encoders and tokenizers at the sizes read from the files.",
            inputs=[
                io.Combo.Input("clip_name1", options=encoders),
                io.Combo.Input("clip_name2", options=encoders),
                io.Combo.Input("type", options=_stock_options("DualCLIPLoader", "required", "type")),
                io.Combo.Input("device", options=_stock_options("DualCLIPLoader", "optional", "device"),
                               optional=True),
            ],
            outputs=[io.Clip.Output()],
        )

    @classmethod
    def execute(cls, clip_name1, clip_name2, type, device="default") -> io.NodeOutput:
        if type != "flux":
            raise ValueError(f"{PREFIX}DualCLIPLoader builds FLUX text encoders only (type flux), not {type!r}")
        paths = [folder_paths.get_full_path_or_raise("text_encoders", n) for n in (clip_name1, clip_name2)]
        return io.NodeOutput(load_tiny_flux_clip(paths, device))


class TinyVAELoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}VAELoader",
            display_name="Load Tiny VAE (test)",
            category="testing/flux_trainer",
            description="VAELoader for tiny FLUX autoencoder files: ComfyUI's own VAE at the sizes in the file.",
            inputs=[io.Combo.Input("vae_name", options=folder_paths.get_filename_list("vae"))],
            outputs=[io.Vae.Output()],
        )

    @classmethod
    def execute(cls, vae_name) -> io.NodeOutput:
        return io.NodeOutput(load_tiny_vae(folder_paths.get_full_path_or_raise("vae", vae_name)))


class TinyNodes(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [TinyUNETLoader, TinyDualCLIPLoader, TinyVAELoader]


async def comfy_entrypoint() -> TinyNodes:
    return TinyNodes()
