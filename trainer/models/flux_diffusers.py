"""The diffusers layout of the FLUX.1 transformer, as recipes that build each BFL tensor from diffusers tensors.

One table serves both directions: loading (diffusers -> BFL) concatenates or reorders, and writing a diffusers file
(for test fixtures) splits the same way. Differences from BFL: q, k, v (and, in single blocks, the MLP input) are
separate Linears; the final modulation emits (scale, shift) where BFL emits (shift, scale).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor


@dataclass(frozen=True)
class Recipe:
    sources: tuple[str, ...]
    op: str = "copy"  # copy | cat (along dim 0) | swap (exchange the two halves of dim 0)


_DOUBLE_RENAMES = {
    "img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
    "img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear",
    "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2",
}
_DOUBLE_NORMS = {
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight", "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}
_SINGLE_RENAMES = {"modulation.lin": "norm.linear", "linear2": "proj_out"}
_SINGLE_NORMS = {"norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}
_TOP_RENAMES = {
    "img_in": "x_embedder", "txt_in": "context_embedder", "final_layer.linear": "proj_out",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
}


def _block_indices(keys: Sequence[str], prefix: str) -> list[int]:
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    return sorted({int(m.group(1)) for k in keys if (m := pattern.match(k))})


def _all_recipes(double: Sequence[int], single: Sequence[int]) -> dict[str, Recipe]:
    out: dict[str, Recipe] = {}
    for i in double:
        d, b = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for p in ("weight", "bias"):
            out[f"{b}.img_attn.qkv.{p}"] = Recipe(tuple(f"{d}.attn.to_{x}.{p}" for x in "qkv"), "cat")
            out[f"{b}.txt_attn.qkv.{p}"] = Recipe(tuple(f"{d}.attn.add_{x}_proj.{p}" for x in "qkv"), "cat")
            out.update({f"{b}.{bfl}.{p}": Recipe((f"{d}.{diff}.{p}",)) for bfl, diff in _DOUBLE_RENAMES.items()})
        out.update({f"{b}.{bfl}": Recipe((f"{d}.{diff}",)) for bfl, diff in _DOUBLE_NORMS.items()})
    for i in single:
        d, b = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        for p in ("weight", "bias"):
            sources = (*(f"{d}.attn.to_{x}.{p}" for x in "qkv"), f"{d}.proj_mlp.{p}")
            out[f"{b}.linear1.{p}"] = Recipe(sources, "cat")
            out.update({f"{b}.{bfl}.{p}": Recipe((f"{d}.{diff}.{p}",)) for bfl, diff in _SINGLE_RENAMES.items()})
        out.update({f"{b}.{bfl}": Recipe((f"{d}.{diff}",)) for bfl, diff in _SINGLE_NORMS.items()})
    for p in ("weight", "bias"):
        out.update({f"{bfl}.{p}": Recipe((f"{diff}.{p}",)) for bfl, diff in _TOP_RENAMES.items()})
        out[f"final_layer.adaLN_modulation.1.{p}"] = Recipe((f"norm_out.linear.{p}",), "swap")
    return out


def recipes(diffusers_keys: Sequence[str]) -> dict[str, Recipe]:
    """BFL key -> how to build it from the diffusers tensors in `diffusers_keys` (prefix removed)."""
    present = set(diffusers_keys)
    every = _all_recipes(_block_indices(diffusers_keys, "transformer_blocks"),
                         _block_indices(diffusers_keys, "single_transformer_blocks"))
    return {k: r for k, r in every.items() if all(s in present for s in r.sources)}


def _swap_halves(t: Tensor) -> Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat((second, first), dim=0)


def build(recipe: Recipe, read: Callable[[str], Tensor]) -> Tensor:
    parts = [read(s) for s in recipe.sources]
    if recipe.op == "cat":
        return torch.cat(parts, dim=0)
    if recipe.op == "swap":
        return _swap_halves(parts[0])
    return parts[0]


def built_shape(recipe: Recipe, shapes: Mapping[str, Sequence[int]]) -> tuple[int, ...]:
    first = tuple(shapes[recipe.sources[0]])
    if recipe.op == "cat":
        return (sum(shapes[s][0] for s in recipe.sources), *first[1:])
    return first


def to_diffusers(bfl_state: Mapping[str, Tensor], hidden_size: int) -> dict[str, Tensor]:
    """Split a BFL state dict into the diffusers layout (the inverse of `recipes`)."""
    out: dict[str, Tensor] = {}
    keys = list(bfl_state)
    every = _all_recipes(_block_indices(keys, "double_blocks"), _block_indices(keys, "single_blocks"))
    for bfl_key, recipe in every.items():
        if bfl_key not in bfl_state:
            continue
        t = bfl_state[bfl_key]
        if recipe.op == "cat":
            sizes = [hidden_size] * 3 + ([t.shape[0] - 3 * hidden_size] if len(recipe.sources) == 4 else [])
            out.update(zip(recipe.sources, (part.contiguous() for part in t.split(sizes, dim=0))))
        elif recipe.op == "swap":
            out[recipe.sources[0]] = _swap_halves(t)
        else:
            out[recipe.sources[0]] = t
    return out
