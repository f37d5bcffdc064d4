"""LoRA network options, with the names and defaults of sd-scripts' `networks.lora_flux`.

`LoRAConfig.from_network_args` reads sd-scripts' `--network_args "key=value" ...` strings; every bad value is an
error naming the option and what it accepts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Callable, Mapping, Sequence

from ..errors import LoRAConfigError
from .finite import check_dataclass_finite
from .safe_regex import check_patterns

TYPE_DIM_OPTIONS = ("img_attn_dim", "txt_attn_dim", "img_mlp_dim", "txt_mlp_dim", "img_mod_dim", "txt_mod_dim",
                    "single_dim", "single_mod_dim")
IN_DIM_TARGETS = ("img_in", "time_in", "vector_in", "guidance_in", "txt_in")
TRAIN_BLOCKS = ("all", "single", "double")


@dataclass(frozen=True)
class LoRAConfig:
    network_dim: int = 4
    network_alpha: float = 1.0
    network_dropout: float | None = None
    rank_dropout: float | None = None
    module_dropout: float | None = None
    # per-layer-type ranks (None: network_dim; 0: no LoRA there), first match in this order wins
    img_attn_dim: int | None = None
    txt_attn_dim: int | None = None
    img_mlp_dim: int | None = None
    txt_mlp_dim: int | None = None
    img_mod_dim: int | None = None
    txt_mod_dim: int | None = None
    single_dim: int | None = None
    single_mod_dim: int | None = None
    in_dims: tuple[int, int, int, int, int] | None = None  # img_in, time_in, vector_in, guidance_in, txt_in
    train_double_block_indices: str | None = None  # "0,1,8-12,18", "all", "none"
    train_single_block_indices: str | None = None
    train_blocks: str = "all"
    split_qkv: bool = False
    train_t5xxl: bool = False
    network_train_unet_only: bool = False
    loraplus_lr_ratio: float | None = None
    loraplus_unet_lr_ratio: float | None = None
    loraplus_text_encoder_lr_ratio: float | None = None
    network_reg_dims: tuple[tuple[str, int], ...] = field(default=())  # (regex, rank), first match wins
    network_reg_lrs: tuple[tuple[str, float], ...] = field(default=())  # (regex, lr), first match wins
    ggpo_sigma: float | None = None  # GGPO's weight-norm factor; GGPO acts when ggpo_beta is given too
    ggpo_beta: float | None = None  # GGPO's gradient-norm factor

    def __post_init__(self):
        check_dataclass_finite(self, LoRAConfigError)
        if self.network_alpha in (None, 0):  # sd-scripts: alpha 0/None means alpha = dim (scale 1)
            object.__setattr__(self, "network_alpha", float(self.network_dim))
        _check(isinstance(self.network_dim, int) and self.network_dim > 0, "network_dim",
               f"a positive whole number, not {self.network_dim!r}")
        _check(self.network_alpha > 0, "network_alpha", f"a positive number, not {self.network_alpha!r}")
        for name in ("network_dropout", "rank_dropout", "module_dropout"):
            value = getattr(self, name)
            _check(value is None or 0 <= value < 1, name, f"a probability in [0, 1), not {value!r}")
        for name in TYPE_DIM_OPTIONS:
            value = getattr(self, name)
            _check(value is None or (isinstance(value, int) and value >= 0), name,
                   f"a whole number >= 0 (0 = no LoRA there), not {value!r}")
        if self.in_dims is not None:
            _check(len(self.in_dims) == 5 and all(isinstance(d, int) and d >= 0 for d in self.in_dims), "in_dims",
                   f"exactly five whole numbers >= 0 for [{', '.join(IN_DIM_TARGETS)}], not {list(self.in_dims)!r}")
        _check(self.train_blocks in TRAIN_BLOCKS, "train_blocks",
               f"one of {', '.join(TRAIN_BLOCKS)}, not {self.train_blocks!r}")
        for option, count in (("train_double_block_indices", 19), ("train_single_block_indices", 38)):
            value = getattr(self, option)
            if value is not None:
                parse_block_selection(value, count, option, check_range=False)
        for option in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"):
            value = getattr(self, option)
            _check(value is None or value > 0, option, f"a positive number, not {value!r}")
        for option in ("network_reg_dims", "network_reg_lrs"):
            check_patterns(option, [pattern for pattern, _ in getattr(self, option)])

    @property
    def type_dims(self) -> tuple[int | None, ...]:
        return tuple(getattr(self, name) for name in TYPE_DIM_OPTIONS)

    @classmethod
    def from_network_args(cls, network_args: Sequence[str] = (), network_dim: int | None = None,
                          network_alpha: float | None = None, network_dropout: float | None = None,
                          unknown_key: Callable[[str], None] | None = None, **options) -> "LoRAConfig":
        """sd-scripts' command line: `--network_dim`, `--network_alpha`, `--network_dropout` and
        `--network_args key=value ...`; `options` are further typed fields (e.g. network_train_unet_only).
        An unknown key is an error, or with `unknown_key` a message passed to it and the key skipped (sd-scripts'
        networks take any keyword and ignore the ones they do not know)."""
        values: dict = dict(options)
        given = {"network_dim": network_dim, "network_alpha": network_alpha, "network_dropout": network_dropout}
        values.update({k: v for k, v in given.items() if v is not None})
        known = {f.name: f for f in fields(cls)}
        for arg in network_args:
            if "=" not in arg:
                raise LoRAConfigError(f"network_args: {arg!r} is not of the form key=value")
            key, raw = (s.strip() for s in arg.split("=", 1))
            if key in NOT_SUPPORTED_KEYS and unknown_key is not None:
                unknown_key(f"network_args: {key} is not supported here ({NOT_SUPPORTED_KEYS[key]}); ignored")
                continue
            if key not in known or key in ("network_dim", "network_alpha", "network_dropout"):
                valid = sorted(k for k in known if k not in ("network_dim", "network_alpha", "network_dropout",
                                                              "network_train_unet_only"))
                message = f"network_args: unknown key {key!r}; valid keys: {', '.join(valid)}"
                if unknown_key is None:
                    raise LoRAConfigError(message)
                unknown_key(message.replace("; valid keys", ", ignored; valid keys", 1))
                continue
            values[key] = _parse_value(key, raw)
        return cls(**values)


# keys sd-scripts' lora_flux takes that do nothing here, and why
NOT_SUPPORTED_KEYS = {
    "conv_dim": "FLUX's blocks have no convolutions", "conv_alpha": "FLUX's blocks have no convolutions",
    "verbose": "the network's layers are listed by --check_only",
}


def _check(ok: bool, option: str, expected: str) -> None:
    if not ok:
        raise LoRAConfigError(f"{option}: expected {expected}")


_INT_KEYS = set(TYPE_DIM_OPTIONS)
_FLOAT_KEYS = {"rank_dropout", "module_dropout", "loraplus_lr_ratio", "loraplus_unet_lr_ratio",
               "loraplus_text_encoder_lr_ratio", "ggpo_sigma", "ggpo_beta"}
_BOOL_KEYS = {"split_qkv", "train_t5xxl"}


def _parse_value(key: str, raw: str):
    try:
        if key in _INT_KEYS:
            return int(raw)
        if key in _FLOAT_KEYS:
            return float(raw)
        if key in _BOOL_KEYS:
            if raw.lower() not in ("true", "false"):
                raise ValueError
            return raw.lower() == "true"
        if key == "in_dims":
            return tuple(int(d) for d in raw.strip().strip("[]").split(","))
        if key in ("network_reg_dims", "network_reg_lrs"):
            return _parse_pairs(raw, int if key == "network_reg_dims" else float)
    except ValueError:
        kind = {"in_dims": "five comma-separated whole numbers, e.g. [4,0,0,0,4]",
                "network_reg_dims": "comma-separated pattern=value pairs, e.g. single_blocks=8,double_blocks=16",
                "network_reg_lrs": "comma-separated pattern=value pairs, e.g. single_blocks=1e-4"}.get(
            key, "a whole number" if key in _INT_KEYS else "a number" if key in _FLOAT_KEYS else "True or False")
        raise LoRAConfigError(f"network_args: {key}={raw!r}: expected {kind}") from None
    return raw


def _parse_pairs(raw: str, kind) -> tuple:
    pairs = []
    for item in filter(None, (p.strip() for p in raw.split(","))):
        if "=" not in item:
            raise ValueError(item)
        pattern, value = item.split("=", 1)
        pairs.append((pattern.strip(), kind(value.strip())))
    return tuple(pairs)


def parse_block_selection(selection: str, count: int, option: str, check_range: bool = True) -> list[bool]:
    """'all', 'none' (or ''), or comma-separated indices and inclusive ranges: '0,1,8-12,18'."""
    text = selection.strip().lower()
    if text == "all":
        return [True] * count
    if text in ("none", ""):
        return [False] * count
    chosen = [False] * count
    for part in (p.strip() for p in text.split(",")):
        match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not match:
            raise LoRAConfigError(f"{option}: {part!r} in {selection!r} is not an index or a range like 8-12; "
                                  "expected e.g. '0,1,8-12,18', 'all' or 'none'")
        start = int(match.group(1))
        end = int(match.group(2) or start)
        if start > end:
            raise LoRAConfigError(f"{option}: range {part!r} runs backwards")
        if check_range and end >= count:
            raise LoRAConfigError(f"{option}: index {end} is out of range; this model's blocks are 0-{count - 1}")
        for i in range(start, min(end, count - 1) + 1):
            chosen[i] = True
    return chosen


def lr_for_text_encoders(text_encoder_lr: float | Sequence[float] | None, default: float | None) -> tuple:
    """sd-scripts' --text_encoder_lr: none (the default lr), one value (both), or two (CLIP-L, T5)."""
    if text_encoder_lr is None:
        return default, default
    if isinstance(text_encoder_lr, (int, float)):
        return float(text_encoder_lr), float(text_encoder_lr)
    values = list(text_encoder_lr)
    if len(values) == 0:
        return default, default
    if len(values) > 2:
        raise LoRAConfigError(f"text_encoder_lr: expected one value (both encoders) or two (CLIP-L, T5), got {values}")
    return (float(values[0]), float(values[-1]))


def as_mapping(config: LoRAConfig) -> Mapping[str, object]:
    """The options as sd-scripts records them in ss_network_args (only those set away from the default)."""
    out = {}
    for f in fields(LoRAConfig):
        if f.name in ("network_dim", "network_alpha", "network_dropout", "network_train_unet_only"):
            continue
        value = getattr(config, f.name)
        if value != f.default and value not in ((),):
            out[f.name] = ",".join(f"{k}={v}" for k, v in value) if f.name.startswith("network_reg") else (
                "[" + ",".join(map(str, value)) + "]" if f.name == "in_dims" else str(value))
    return out
