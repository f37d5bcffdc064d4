"""Tiny FLUX-shaped models written in the real file layouts, for tests and the embedded demo.

Every file here is what a user's file looks like, only small: the BFL transformer (also ComfyUI-prefixed,
diffusers and fp8 variants), the BFL autoencoder, CLIP-L as `clip_l.safetensors` (keys under `text_model.`) and
T5 as `t5xxl_fp16.safetensors`, both with the real tokenizer vocabulary sizes so the real tokenizers fit them.
"""

from __future__ import annotations

import math
import os
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from ..atomic import save_safetensors
from . import flux_diffusers
from .autoencoder import AutoEncoder, AutoEncoderParams
from .flux import FP8_DTYPES, Flux, FluxParams

CLIP_VOCAB = 49408
T5_VOCAB = 32128

TINY_CLIP = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=77)
TINY_T5 = dict(d_model=32, d_kv=16, num_heads=2, d_ff=64, num_layers=2, relative_attention_num_buckets=32)
TINY_FLUX = FluxParams(
    in_channels=64, out_channels=64, vec_in_dim=TINY_CLIP["hidden_size"], context_in_dim=TINY_T5["d_model"],
    hidden_size=64, mlp_hidden_dim=256, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=(4, 14, 14),
)
TINY_AE = AutoEncoderParams(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1)

LAYOUT_PREFIXES = {"bfl": "", "comfy": "model.diffusion_model."}


def _randomize(module: torch.nn.Module, seed: int) -> dict[str, Tensor]:
    """Deterministic weights of sensible scale: fan-in scaled normals, small biases, norm scales near one."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in module.state_dict().items():
        if not p.is_floating_point():
            out[name] = p.clone()
        elif p.ndim == 1 and "norm" in name and name.endswith(("weight", "scale")):
            out[name] = 1 + 0.1 * torch.randn(p.shape, generator=g)
        elif p.ndim == 1:
            out[name] = 0.02 * torch.randn(p.shape, generator=g)
        else:
            fan_in = math.prod(p.shape[1:]) if p.ndim > 1 else p.shape[0]
            out[name] = torch.randn(p.shape, generator=g) / math.sqrt(fan_in)
    return out


def flux_state_dict(params: FluxParams = TINY_FLUX, seed: int = 0) -> dict[str, Tensor]:
    with torch.device("meta"):
        model = Flux(params)
    return _randomize(model, seed)


def ae_state_dict(params: AutoEncoderParams = TINY_AE, seed: int = 0) -> dict[str, Tensor]:
    with torch.device("meta"):
        model = AutoEncoder(params)
    return _randomize(model, seed)


def to_fp8(state: dict[str, Tensor], fp8: torch.dtype, scaled: bool = False) -> dict[str, Tensor]:
    """What fp8 checkpoints hold: Linear weights of the blocks in fp8 (with a per-layer `scale_weight` when
    `scaled`, plus the `scaled_fp8` marker), everything else as it was."""
    if fp8 not in FP8_DTYPES:
        raise ValueError(f"not an fp8 dtype: {fp8}")
    out: dict[str, Tensor] = {}
    for name, t in state.items():
        if name.endswith(".weight") and t.ndim == 2 and "blocks." in name:
            if scaled:
                scale = t.abs().max().float() / torch.finfo(fp8).max
                out[name] = (t.float() / scale).to(fp8)
                out[name[: -len("weight")] + "scale_weight"] = scale.reshape(())
            else:
                out[name] = t.to(fp8)
        else:
            out[name] = t
    if scaled:
        out["scaled_fp8"] = torch.zeros(0, dtype=fp8)
    return out


def fp8_rounded(state: dict[str, Tensor], fp8: torch.dtype, scaled: bool = False) -> dict[str, Tensor]:
    """The float32 weights an fp8 file made by `to_fp8` stands for: its fp8 values (times their scale) in float32,
    what a model computes once those weights are upcast; everything else as it was."""
    quantized = to_fp8(state, fp8, scaled)
    out = {}
    for k, v in state.items():
        if quantized[k].dtype in FP8_DTYPES:
            scale = quantized[k[: -len("weight")] + "scale_weight"] if scaled else torch.tensor(1.0)
            out[k] = quantized[k].float() * scale
        else:
            out[k] = v
    return out


def write_flux(path: str | os.PathLike, params: FluxParams = TINY_FLUX, layout: str = "bfl", seed: int = 0,
               dtype: torch.dtype = torch.float32, fp8: torch.dtype | None = None, scaled: bool = False) -> Path:
    """layout: bfl | comfy (model.diffusion_model. prefix) | diffusers."""
    state = {k: v.to(dtype) for k, v in flux_state_dict(params, seed).items()}
    if fp8 is not None:
        state = to_fp8(state, fp8, scaled)
    if layout == "diffusers":
        state = flux_diffusers.to_diffusers(state, params.hidden_size)
    elif layout in LAYOUT_PREFIXES:
        state = {LAYOUT_PREFIXES[layout] + k: v for k, v in state.items()}
    else:
        raise ValueError(f"layout must be one of bfl, comfy, diffusers; got {layout!r}")
    return save_safetensors(state, path)


def write_ae(path: str | os.PathLike, params: AutoEncoderParams = TINY_AE, seed: int = 0,
             dtype: torch.dtype = torch.float32, prefix: str = "") -> Path:
    return save_safetensors({prefix + k: v.to(dtype) for k, v in ae_state_dict(params, seed).items()}, path)


def clip_l_state_dict(seed: int = 0, **sizes) -> dict[str, Tensor]:
    """A CLIP-L text encoder in the layout of the distributed `clip_l.safetensors` (keys under `text_model.`)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=CLIP_VOCAB, hidden_act="quick_gelu",
                         num_attention_heads=max(1, {**TINY_CLIP, **sizes}["hidden_size"] // 64),
                         **{**TINY_CLIP, **sizes})
    with torch.device("meta"):
        model = CLIPTextModel(cfg)
    state = _randomize(model, seed)
    state.pop("embeddings.position_ids", None)
    state = {("" if k.startswith("text_model.") else "text_model.") + k: v for k, v in state.items()}
    hidden = cfg.hidden_size
    state["text_projection.weight"] = torch.randn(hidden, hidden, generator=torch.Generator().manual_seed(seed))
    return state


def t5_state_dict(seed: int = 0, **sizes) -> dict[str, Tensor]:
    """A T5 v1.1 encoder in the layout of the distributed `t5xxl_fp16.safetensors`."""
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=T5_VOCAB, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                   **{**TINY_T5, **sizes})
    with torch.device("meta"):
        model = T5EncoderModel(cfg)
    state = _randomize(model, seed)
    state.pop("encoder.embed_tokens.weight", None)  # the distributed files hold it once, as shared.weight
    return state


def write_clip_l(path: str | os.PathLike, seed: int = 0, dtype: torch.dtype = torch.float32, prefix: str = "") -> Path:
    return save_safetensors({prefix + k: v.to(dtype) for k, v in clip_l_state_dict(seed).items()}, path)


def write_t5xxl(path: str | os.PathLike, seed: int = 0, dtype: torch.dtype = torch.float32, prefix: str = "") -> Path:
    return save_safetensors({prefix + k: v.to(dtype) for k, v in t5_state_dict(seed).items()}, path)


def write_comfy_checkpoint(path: str | os.PathLike, seed: int = 0, schnell: bool = False) -> Path:
    """A ComfyUI-style full checkpoint: transformer, AE and both text encoders in one file."""
    params = replace(TINY_FLUX, guidance_embed=not schnell)
    state = {f"model.diffusion_model.{k}": v for k, v in flux_state_dict(params, seed).items()}
    state.update({f"first_stage_model.{k}": v for k, v in ae_state_dict(TINY_AE, seed + 1).items()})
    state.update({f"text_encoders.clip_l.transformer.{k}": v for k, v in clip_l_state_dict(seed + 2).items()})
    state.update({f"text_encoders.t5xxl.transformer.{k}": v for k, v in t5_state_dict(seed + 3).items()})
    return save_safetensors(state, path)


def write_model_set(folder: str | os.PathLike, seed: int = 0, schnell: bool = False) -> dict[str, Path]:
    """flux.safetensors, ae.safetensors, clip_l.safetensors, t5xxl_fp16.safetensors in `folder`."""
    folder = Path(folder)
    return {
        "flux": write_flux(folder / "flux.safetensors", replace(TINY_FLUX, guidance_embed=not schnell), seed=seed),
        "ae": write_ae(folder / "ae.safetensors", seed=seed + 1),
        "clip_l": write_clip_l(folder / "clip_l.safetensors", seed=seed + 2),
        "t5xxl": write_t5xxl(folder / "t5xxl_fp16.safetensors", seed=seed + 3, dtype=torch.float16),
    }
