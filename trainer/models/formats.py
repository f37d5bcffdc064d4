"""Recognise which models a checkpoint holds, under which key prefix, from tensor names alone.

A component is found by an anchor key that only that kind of model has; whatever precedes the anchor is the
component's prefix (`""` for a bare file, `model.diffusion_model.` in a ComfyUI full checkpoint, ...). The same
table names what a file holds when it is not what was asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Signature:
    kind: str
    anchor: str
    label: str
    shadowed_by: tuple[str, ...] = ()  # kinds that, found under the same prefix, already explain this anchor


_CHROMA_KINDS = ("chroma_radiance", "chroma")  # FLUX-like blocks under the same prefix: the Chroma kind explains them

SIGNATURES = (
    Signature("chroma_radiance", "nerf_blocks.0.norm.scale", "a Chroma Radiance transformer (pixel space)"),
    Signature("chroma", "distilled_guidance_layer.in_proj.weight", "a Chroma transformer",
              shadowed_by=("chroma_radiance",)),
    Signature("flux", "double_blocks.0.img_attn.qkv.weight", "a FLUX.1 transformer (BFL layout)",
              shadowed_by=_CHROMA_KINDS),
    Signature("flux", "single_blocks.0.linear1.weight", "a FLUX.1 transformer (BFL layout)",
              shadowed_by=_CHROMA_KINDS),
    Signature("flux_diffusers", "single_transformer_blocks.0.attn.to_q.weight",
              "a FLUX.1 transformer (diffusers layout)"),
    Signature("sd3", "joint_blocks.0.x_block.attn.qkv.weight", "an SD3 MMDiT"),
    Signature("sd3_diffusers", "transformer_blocks.0.attn.add_q_proj.weight", "an SD3 transformer (diffusers layout)",
              shadowed_by=("flux_diffusers",)),
    Signature("sdxl_unet", "label_emb.0.0.weight", "an SDXL UNet"),
    Signature("sd_unet", "input_blocks.0.0.weight", "a Stable Diffusion 1.x/2.x UNet", shadowed_by=("sdxl_unet",)),
    Signature("ae", "encoder.down.0.block.0.conv1.weight", "an autoencoder (BFL/LDM layout)"),
    Signature("ae_diffusers", "encoder.down_blocks.0.resnets.0.conv1.weight", "an autoencoder (diffusers layout)"),
    Signature("clip", "encoder.layers.0.mlp.fc1.weight", "a CLIP text encoder"),
    Signature("open_clip", "transformer.resblocks.0.attn.in_proj_weight", "an OpenCLIP text encoder (SDXL CLIP-G)"),
    Signature("t5", "encoder.block.0.layer.0.SelfAttention.q.weight", "a T5 encoder"),
    Signature("lora", ".lora_down.weight", "a LoRA"),
    Signature("lora", ".lora_A.weight", "a LoRA"),
)


@dataclass(frozen=True)
class Component:
    kind: str
    prefix: str
    label: str

    def describe(self) -> str:
        where = f" under the prefix '{self.prefix}'" if self.prefix else ""
        return self.label + where


def find_components(keys: Sequence[str]) -> list[Component]:
    """Every recognised model in `keys`, one entry per (kind, prefix), in signature order."""
    found: dict[tuple[str, str], Component] = {}
    for sig in SIGNATURES:
        for key in keys:
            if not key.endswith(sig.anchor):
                continue
            if sig.kind == "lora":  # adapters name their targets freely: one entry for the whole file
                found.setdefault(("lora", ""), Component("lora", "", sig.label))
                break
            prefix = key[: len(key) - len(sig.anchor)]
            if prefix.endswith("vision_model."):
                continue
            if any((kind, prefix) in found for kind in sig.shadowed_by):
                continue
            found.setdefault((sig.kind, prefix), Component(sig.kind, prefix, sig.label))
    return list(found.values())


def describe(keys: Sequence[str]) -> str:
    components = find_components(keys)
    if not components:
        sample = ", ".join(sorted(keys)[:3]) or "no tensors at all"
        return f"no model this trainer knows (first keys: {sample})"
    parts = list(dict.fromkeys(c.describe() for c in components))
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def find_component(keys: Sequence[str], kinds: Sequence[str], hint: str = "") -> Component | None:
    """The component of one of `kinds`; with several, the one whose prefix contains `hint` (e.g. 'clip_l')."""
    candidates = [c for c in find_components(keys) if c.kind in kinds]
    if len(candidates) > 1 and hint:
        hinted = [c for c in candidates if hint in c.prefix]
        candidates = hinted or candidates
    return min(candidates, key=lambda c: len(c.prefix)) if candidates else None
