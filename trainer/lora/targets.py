"""Which Linear layers get a LoRA, under which kohya name, with which rank: sd-scripts' lora_flux rules.

Names are `lora_unet_` + the BFL module path, `lora_te1_text_model_` + the CLIP-L path and `lora_te3_` + the T5 path,
every "." replaced by "_" (the names ComfyUI and sd-scripts look for).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from ..config.lora import IN_DIM_TARGETS, LoRAConfig, parse_block_selection

UNET, CLIP_L, T5 = "lora_unet", "lora_te1", "lora_te3"
_CLIP_TARGET = re.compile(r"(text_model\.)?encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")
_T5_TARGET = re.compile(r"encoder\.block\.\d+\.layer\.(0\.SelfAttention\.[qkvo]|1\.DenseReluDense\.(wi_0|wi_1|wi|wo))$")
# substrings identifying each per-type rank option, checked in this order (sd-scripts' order)
_TYPE_IDENTIFIERS = (("img_attn",), ("txt_attn",), ("img_mlp",), ("txt_mlp",), ("img_mod",), ("txt_mod",),
                     ("single_blocks", "linear"), ("modulation",))


@dataclass(frozen=True)
class Target:
    name: str
    path: str
    module: nn.Linear
    prefix: str  # UNET, CLIP_L or T5
    rank: int = 0
    alpha: float = 1.0
    splits: tuple[int, ...] | None = None  # output sizes of separately trained parts (split_qkv)


def kohya_name(prefix: str, path: str) -> str:
    if prefix == CLIP_L and not path.startswith("text_model."):
        path = "text_model." + path  # transformers 5 dropped this level; the file format keeps it
    return f"{prefix}_{path.replace('.', '_')}"


def linears(root: nn.Module, prefix: str) -> dict[str, tuple[str, nn.Linear]]:
    """Every Linear of `root` by kohya name (what a LoRA file may address)."""
    return {kohya_name(prefix, path): (path, m) for path, m in root.named_modules() if isinstance(m, nn.Linear)}


def _is_block_linear(path: str, train_blocks: str) -> bool:
    kind = path.split(".", 1)[0]
    if kind == "double_blocks":
        return train_blocks in ("all", "double")
    return kind == "single_blocks" and train_blocks in ("all", "single")


def _in_dim_for(path: str, in_dims: tuple[int, ...]) -> int | None:
    top = path.split(".", 1)[0]
    return in_dims[IN_DIM_TARGETS.index(top)] if top in IN_DIM_TARGETS else None


def plan_flux(flux: nn.Module, config: LoRAConfig) -> list[Target]:
    p = flux.params
    double = _selection(config.train_double_block_indices, p.depth, "train_double_block_indices")
    single = _selection(config.train_single_block_indices, p.depth_single_blocks, "train_single_block_indices")
    out = []
    for name, (path, module) in linears(flux, UNET).items():
        in_dim = _in_dim_for(path, config.in_dims) if config.in_dims else None
        if in_dim is None and not _is_block_linear(path, config.train_blocks):
            continue
        rank = _reg_dim(name, config)
        if rank is None:
            rank = in_dim if in_dim is not None else _type_dim(name, config)
            rank = rank if _block_selected(path, double, single) else 0
        if rank:
            out.append(Target(name, path, module, UNET, rank, config.network_alpha, _splits(path, p, config)))
    return out


def plan_text_encoder(model: nn.Module, prefix: str, config: LoRAConfig) -> list[Target]:
    pattern = _CLIP_TARGET if prefix == CLIP_L else _T5_TARGET
    out = []
    for name, (path, module) in linears(model, prefix).items():
        if pattern.search(path):
            rank = _reg_dim(name, config)
            rank = config.network_dim if rank is None else rank
            if rank:
                out.append(Target(name, path, module, prefix, rank, config.network_alpha))
    return out


def _selection(option_value: str | None, count: int, option: str) -> list[bool] | None:
    return None if option_value is None else parse_block_selection(option_value, count, option)


def _reg_dim(name: str, config: LoRAConfig) -> int | None:
    return next((rank for pattern, rank in config.network_reg_dims if re.search(pattern, name)), None)


def _type_dim(name: str, config: LoRAConfig) -> int:
    for identifiers, dim in zip(_TYPE_IDENTIFIERS, config.type_dims):
        if dim is not None and all(i in name for i in identifiers):
            return dim
    return config.network_dim


def _block_selected(path: str, double: list[bool] | None, single: list[bool] | None) -> bool:
    kind, _, rest = path.partition(".")
    chosen = {"double_blocks": double, "single_blocks": single}.get(kind)
    return chosen is None or chosen[int(rest.split(".", 1)[0])]


def _splits(path: str, params, config: LoRAConfig) -> tuple[int, ...] | None:
    if not config.split_qkv:
        return None
    h = params.hidden_size
    if path.startswith("double_blocks.") and path.endswith("attn.qkv"):
        return (h, h, h)
    if path.startswith("single_blocks.") and path.endswith("linear1"):
        return (h, h, h, params.mlp_hidden_dim)
    return None
