"""Optimizers and learning-rate schedules by sd-scripts' names."""

from __future__ import annotations

import ast
import importlib
import logging
import math
from typing import Callable

import torch

from .config import ConfigError

log = logging.getLogger(__name__)


def parse_optimizer_args(args: tuple[str, ...] | list[str]) -> dict:
    """`key=value` strings, values read as Python literals when they are one (`relative_step=False`,
    `betas=(0.9,0.99)`), else kept as text."""
    out = {}
    for arg in args:
        if "=" not in arg:
            raise ConfigError(f"optimizer_args: {arg!r} is not of the form key=value")
        key, raw = (s.strip() for s in arg.split("=", 1))
        try:
            out[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key] = raw
    return out


def _bnb(name: str):
    try:
        import bitsandbytes
    except ImportError as e:
        raise ConfigError(f"optimizer_type {name} needs bitsandbytes: pip install bitsandbytes") from e
    return bitsandbytes.optim


def create_optimizer(optimizer_type: str, groups: list[dict], lr: float, args: dict) -> torch.optim.Optimizer:
    name = (optimizer_type or "AdamW").strip()
    key = name.lower()
    args = dict(args)
    if key == "adamw":
        return torch.optim.AdamW(groups, lr=lr, **args)
    if key == "adamw8bit":
        return _bnb(name).AdamW8bit(groups, lr=lr, **args)
    if key == "pagedadamw8bit":
        return _bnb(name).PagedAdamW8bit(groups, lr=lr, **args)
    if key == "pagedadamw":
        return _bnb(name).PagedAdamW(groups, lr=lr, **args)
    if key == "lion":
        return _bnb(name).Lion(groups, lr=lr, **args)
    if key == "lion8bit":
        return _bnb(name).Lion8bit(groups, lr=lr, **args)
    if key == "pagedlion8bit":
        return _bnb(name).PagedLion8bit(groups, lr=lr, **args)
    if key in ("sgdnesterov", "sgdnesterov8bit"):
        args.setdefault("momentum", 0.9)
        cls = torch.optim.SGD if key == "sgdnesterov" else _bnb(name).SGD8bit
        return cls(groups, lr=lr, nesterov=True, **args)
    if key == "adafactor":
        from transformers.optimization import Adafactor

        args.setdefault("relative_step", True)
        args.setdefault("scale_parameter", True)
        args.setdefault("warmup_init", False)
        if args["relative_step"]:  # Adafactor computes its own lr; groups must not carry one
            for group in groups:
                group.pop("lr", None)
            return Adafactor(groups, lr=None, **args)
        return Adafactor(groups, lr=lr, **args)
    if key == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError as e:
            raise ConfigError("optimizer_type Prodigy needs prodigyopt: pip install prodigyopt") from e
        return Prodigy(groups, lr=lr, **args)
    if "." in name:
        module_name, _, class_name = name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"optimizer_type {name}: cannot import {class_name} from {module_name} ({e})") from e
        return cls(groups, lr=lr, **args)
    raise ConfigError(f"optimizer_type {name!r} is unknown; use AdamW, AdamW8bit, PagedAdamW8bit, Lion, Lion8bit, "
                      "SGDNesterov, SGDNesterov8bit, Adafactor, Prodigy or a dotted class path")


def warmup_steps(value: float, total: int) -> int:
    """sd-scripts: an int is a step count, a float below 1 a fraction of the training steps."""
    return int(value * total) if isinstance(value, float) and value < 1 else int(value)


def lr_lambda(name: str, warmup: int, total: int, num_cycles: int = 1, power: float = 1.0,
              min_lr_ratio: float | None = None, decay_steps: int = 0) -> Callable[[int], float]:
    """The factor on the base lr at step `s`, as diffusers/transformers define each schedule."""
    def ramp(s: int) -> float | None:
        return s / max(1, warmup) if s < warmup else None

    def progress(s: int) -> float:
        return (s - warmup) / max(1, total - warmup)

    if name == "constant":
        return lambda s: 1.0
    if name == "constant_with_warmup":
        return lambda s: ramp(s) if s < warmup else 1.0
    if name == "linear":
        return lambda s: ramp(s) if s < warmup else max(0.0, (total - s) / max(1, total - warmup))
    if name == "cosine":
        return lambda s: ramp(s) if s < warmup else max(0.0, 0.5 * (1 + math.cos(math.pi * progress(s))))
    if name == "cosine_with_restarts":
        def restarts(s: int) -> float:
            if s < warmup:
                return ramp(s)
            p = progress(s)
            return 0.0 if p >= 1 else max(0.0, 0.5 * (1 + math.cos(math.pi * ((num_cycles * p) % 1.0))))
        return restarts
    if name == "polynomial":
        end = 1e-7

        def poly(s: int) -> float:
            if s < warmup:
                return ramp(s)
            if s > total:
                return end
            return (1 - end) * (1 - progress(s)) ** power + end
        return poly
    if name == "inverse_sqrt":
        return lambda s: ramp(s) if s < warmup else 1 / math.sqrt(max(1, s - warmup + max(1, warmup)) / max(1, warmup))
    if name == "cosine_with_min_lr":
        floor = 0.0 if min_lr_ratio is None else min_lr_ratio
        return lambda s: ramp(s) if s < warmup else floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress(s))))
    if name == "warmup_stable_decay":
        floor = 0.0 if min_lr_ratio is None else min_lr_ratio
        stable_end = total - decay_steps

        def wsd(s: int) -> float:
            if s < warmup:
                return ramp(s)
            if s < stable_end or decay_steps <= 0:
                return 1.0
            return floor + (1 - floor) * max(0.0, (total - s) / decay_steps)
        return wsd
    raise ConfigError(f"lr_scheduler {name!r} is unknown")


def create_scheduler(name: str, optimizer: torch.optim.Optimizer, warmup: int, total: int, num_cycles: int = 1,
                     power: float = 1.0, min_lr_ratio: float | None = None, decay_steps: int = 0):
    if name == "adafactor":
        from transformers.optimization import AdafactorSchedule

        return AdafactorSchedule(optimizer)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(name, warmup, total, num_cycles, power, min_lr_ratio, decay_steps))
