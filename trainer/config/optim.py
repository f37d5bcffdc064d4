"""Optimizer and learning-rate schedule vocabularies, by sd-scripts' names, and the checks that need no torch."""

from __future__ import annotations

import ast
import re

from ..errors import ConfigError

# name as sd-scripts spells it -> the package it needs (None: torch or transformers, always present)
OPTIMIZERS: dict[str, str | None] = {
    "AdamW": None, "AdamW8bit": "bitsandbytes", "PagedAdamW": "bitsandbytes", "PagedAdamW8bit": "bitsandbytes",
    "Lion": "bitsandbytes", "Lion8bit": "bitsandbytes", "PagedLion8bit": "bitsandbytes", "SGDNesterov": None,
    "SGDNesterov8bit": "bitsandbytes", "Adafactor": None, "Prodigy": "prodigyopt",
}
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
              "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay", "adafactor")
# the guide's Adafactor recipe: a fixed learning rate, no relative step or parameter scaling
ADAFACTOR_RECOMMENDED_ARGS = ("relative_step=False", "scale_parameter=False", "warmup_init=False")

_DOTTED = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+")


def canonical_optimizer(name: str) -> str:
    """The optimizer's canonical name ('' means AdamW; case does not matter), or a dotted class path as given."""
    name = (name or "AdamW").strip()
    by_lower = {known.lower(): known for known in OPTIMIZERS}
    if name.lower() in by_lower:
        return by_lower[name.lower()]
    if _DOTTED.fullmatch(name):
        return name
    raise ConfigError(f"optimizer_type {name!r} is unknown; expected one of {', '.join(OPTIMIZERS)} or a dotted class "
                      "path such as torch.optim.RAdam")


def parse_optimizer_args(args: tuple[str, ...] | list[str], option: str = "optimizer_args") -> dict:
    """`key=value` strings, values read as Python literals when they are one (`relative_step=False`,
    `betas=(0.9,0.99)`), else kept as text."""
    out = {}
    for arg in args:
        key, sep, raw = (s.strip() for s in arg.partition("="))
        if not sep or not key.isidentifier():
            raise ConfigError(f"{option}: {arg!r} is not of the form key=value")
        try:
            out[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key] = raw
    return out
