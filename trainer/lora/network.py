"""The LoRA network over FLUX (and optionally CLIP-L and T5): create, attach, train, export, load, merge."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Iterable, Mapping

import torch
from torch import Tensor, nn

from ..config.lora import LoRAConfig, lr_for_text_encoders
from ..errors import ConfigError, LoRAWeightsError
from .module import LoRAModule
from .targets import CLIP_L, T5, UNET, Target, _splits, linears, plan_flux, plan_text_encoder

# Older tools name the T5 LoRA te2 when a file has no CLIP-G; ComfyUI accepts both.
_PREFIX_ALIASES = {"lora_te2": T5}


def _text_model(encoder: nn.Module | None) -> nn.Module | None:
    return getattr(encoder, "model", encoder)  # our ClipL/T5XXL wrappers hold the transformers model


class LoRANetwork(nn.Module):
    def __init__(self, targets: Iterable[Target], config: LoRAConfig | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.config = config or LoRAConfig()
        c = self.config
        ggpo = ggpo_parameters(c)
        if ggpo is not None and any(t.splits for t in targets):
            raise ConfigError("network_args: ggpo_sigma/ggpo_beta cannot be combined with split_qkv (sd-scripts' "
                              "lora_flux stops with an error on split layers under GGPO); drop one of them")
        self.loras = nn.ModuleList(
            LoRAModule(t.name, t.module, t.rank, t.alpha, t.splits, c.network_dropout, c.rank_dropout,
                       c.module_dropout, dtype=dtype, ggpo=ggpo)
            for t in targets
        )
        self.prefix_of = {t.name: t.prefix for t in targets}
        names = [m.lora_name for m in self.loras]
        if len(set(names)) != len(names):
            raise ValueError("duplicate LoRA names")
        self.by_name = {m.lora_name: m for m in self.loras}
        self.skipped: list[str] = []  # file layers for models that were not given (from_weights)
        self.fingerprint: str | None = None  # content hash, set by apply_lora

    # ---------------------------------------------------------------------------------------- building

    @classmethod
    def create(cls, config: LoRAConfig, flux: nn.Module, clip_l: nn.Module | None = None, t5: nn.Module | None = None,
               dtype: torch.dtype = torch.float32) -> "LoRANetwork":
        """A fresh network by the rules of `config` (a fresh LoRA changes nothing: up starts at zero)."""
        targets = plan_flux(flux, config)
        if not config.network_train_unet_only:
            if clip_l is not None:
                targets += plan_text_encoder(_text_model(clip_l), CLIP_L, config)
            if config.train_t5xxl:
                if t5 is None:
                    raise ConfigError("train_t5xxl: the LoRA on T5-XXL needs the T5-XXL model (give it, or a "
                                      "meta-device copy from text_encoders.t5_encoder_on_meta, to LoRANetwork.create)")
                targets += plan_text_encoder(_text_model(t5), T5, config)
        return cls(targets, config, dtype)

    @classmethod
    def from_weights(cls, weights: Mapping[str, Tensor], flux: nn.Module | None = None,
                     clip_l: nn.Module | None = None, t5: nn.Module | None = None,
                     config: LoRAConfig | None = None, dtype: torch.dtype | None = None,
                     ignore_missing_models: bool = True) -> "LoRANetwork":
        """A network shaped by a kohya-layout state dict (ranks and alphas from the file) and loaded with it.
        Names for a model that was not given are skipped when `ignore_missing_models`; names that address no layer
        of a given model are an error."""
        grouped = group_kohya(weights)
        roots = {UNET: flux, CLIP_L: _text_model(clip_l), T5: _text_model(t5)}
        layers = {prefix: linears(root, prefix) for prefix, root in roots.items() if root is not None}
        targets, loaded, unknown, skipped = [], [], [], []
        for name, parts in grouped.items():
            prefix, canonical = _canonical(name)
            if prefix is None or (roots.get(prefix) is None and not ignore_missing_models):
                unknown.append(name)
                continue
            if roots.get(prefix) is None:
                skipped.append(name)
                continue
            if canonical not in layers[prefix]:
                unknown.append(name)
                continue
            path, module = layers[prefix][canonical]
            if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
                raise LoRAWeightsError(f"{name}: needs both lora_down.weight and lora_up.weight")
            down = parts["lora_down.weight"]
            splits = _splits(path, flux.params, config) if prefix == UNET and config else None
            rank = down.shape[0] // (len(splits) if splits else 1)
            alpha = float(parts["alpha"]) if "alpha" in parts else float(down.shape[0])
            alpha = alpha / len(splits) if splits else alpha
            targets.append(Target(canonical, path, module, prefix, rank, alpha, splits))
            loaded.append(parts)
        if unknown:
            raise LoRAWeightsError(
                f"{len(unknown)} LoRA layers match no layer of the given model(s): {', '.join(sorted(unknown)[:5])}"
                f"{' ...' if len(unknown) > 5 else ''}; expected names like lora_unet_double_blocks_0_img_attn_qkv "
                "(FLUX), lora_te1_text_model_encoder_layers_0_mlp_fc1 (CLIP-L) or "
                "lora_te3_encoder_block_0_layer_0_SelfAttention_q (T5)")
        network = cls(targets, config, dtype)
        network.skipped = skipped
        for target, parts in zip(targets, loaded):
            network.by_name[target.name].load_kohya(parts["lora_down.weight"], parts["lora_up.weight"],
                                                    parts.get("alpha"))
        return network

    # ---------------------------------------------------------------------------------------- use

    def attach(self) -> "LoRANetwork":
        for lora in self.loras:
            lora.attach()
        return self

    def detach(self) -> None:
        for lora in reversed(self.loras):
            lora.detach()

    def update_ggpo_norms(self) -> None:
        """GGPO: read this optimizer step's final gradients and the weights before the step (call between clipping and
        `optimizer.step()`); the next training forwards perturb each layer by them. Nothing without GGPO."""
        for lora in self.loras:
            lora.update_ggpo_norms()

    def set_multiplier(self, multiplier: float) -> None:
        for lora in self.loras:
            lora.multiplier = float(multiplier)

    @torch.no_grad()
    def merge(self) -> None:
        """Add each LoRA into its base weight (for export), then detach: the model computes the same without hooks."""
        for lora in self.loras:
            weight = lora.org_module.weight
            if weight.dtype.itemsize == 1:
                raise ValueError(f"{lora.lora_name}: cannot merge into an fp8 weight; load the model in bf16 or fp32")
            weight.copy_((weight.float() + lora.weight_delta().to(weight.device)).to(weight.dtype))
        self.detach()

    def param_groups(self, learning_rate: float, unet_lr: float | None = None,
                     text_encoder_lr: float | list[float] | None = None) -> list[dict]:
        """Optimizer groups as sd-scripts makes them: per model (FLUX, CLIP-L, T5), per regex lr, LoRA+ `up`
        weights at lr × ratio; groups whose lr is 0 are left out (not trained)."""
        c = self.config
        te1_lr, te3_lr = lr_for_text_encoders(text_encoder_lr, learning_rate)
        plan = [(UNET, unet_lr if unet_lr is not None else learning_rate,
                 c.loraplus_unet_lr_ratio or c.loraplus_lr_ratio),
                (CLIP_L, te1_lr, c.loraplus_text_encoder_lr_ratio or c.loraplus_lr_ratio),
                (T5, te3_lr, c.loraplus_text_encoder_lr_ratio or c.loraplus_lr_ratio)]
        groups = []
        for prefix, lr, plus in plan:
            buckets: dict[tuple[str, float], list[nn.Parameter]] = defaultdict(list)
            for lora in self.loras:
                if self.prefix_of[lora.lora_name] != prefix:
                    continue
                regex_lr = next(((i, v) for i, (p, v) in enumerate(c.network_reg_lrs)
                                 if re.search(p, lora.lora_name)), None)
                base_name, base_lr = (f"{prefix} reg_lr_{regex_lr[0]}", regex_lr[1]) if regex_lr else (prefix, lr)
                buckets[(base_name, base_lr)].append(lora.lora_down.weight)
                up_lr = base_lr * plus if plus else base_lr
                buckets[(base_name + (" plus" if plus else ""), up_lr)].append(lora.lora_up.weight)
            for (name, group_lr), params in buckets.items():
                if group_lr:
                    groups.append({"params": params, "lr": group_lr, "name": name})
        return groups

    # ---------------------------------------------------------------------------------------- files

    def kohya_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for lora in self.loras:
            for key, t in lora.kohya_tensors().items():
                out[key] = t.to(dtype) if dtype is not None else t.float() if key.endswith("alpha") else t
        return out

    def load_kohya(self, weights: Mapping[str, Tensor]) -> None:
        """Load a kohya state dict whose layers are exactly this network's (continuing training)."""
        grouped = {(_canonical(n)[1] or n): p for n, p in group_kohya(weights).items()}
        missing = sorted(set(self.by_name) - set(grouped))
        extra = sorted(set(grouped) - set(self.by_name))
        if missing or extra:
            raise LoRAWeightsError(f"the weights do not match the network: {len(missing)} layers missing "
                                   f"({', '.join(missing[:3])}), {len(extra)} unexpected ({', '.join(extra[:3])})")
        for name, parts in grouped.items():
            self.by_name[name].load_kohya(parts["lora_down.weight"], parts["lora_up.weight"], parts.get("alpha"))


def ggpo_parameters(config: LoRAConfig) -> tuple[float, float] | None:
    """(sigma, beta) when network_args give both ggpo_sigma and ggpo_beta (sd-scripts needs both), else None."""
    sigma, beta = getattr(config, "ggpo_sigma", None), getattr(config, "ggpo_beta", None)
    return None if sigma is None or beta is None else (float(sigma), float(beta))


def group_kohya(weights: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    grouped: dict[str, dict[str, Tensor]] = defaultdict(dict)
    for key, value in weights.items():
        name, _, rest = key.partition(".")
        if rest not in ("lora_down.weight", "lora_up.weight", "alpha"):
            raise LoRAWeightsError(f"'{key}' is not a kohya LoRA tensor (expected <name>.lora_down.weight, "
                                   "<name>.lora_up.weight or <name>.alpha)")
        grouped[name][rest] = value
    return dict(grouped)


def _canonical(name: str) -> tuple[str | None, str | None]:
    for prefix in (UNET, CLIP_L, T5, *_PREFIX_ALIASES):
        if name.startswith(prefix + "_"):
            real = _PREFIX_ALIASES.get(prefix, prefix)
            return real, real + name[len(prefix):]
    return None, None
