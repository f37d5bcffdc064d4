"""Optimizers and learning-rate schedules by sd-scripts' names."""

from __future__ import annotations

import importlib
import logging
import math
from typing import Callable

import torch

from .config.optim import canonical_optimizer, parse_optimizer_args  # noqa: F401 (parse_optimizer_args re-exported)
from .errors import ConfigError

log = logging.getLogger(__name__)


def _bnb(name: str):
    try:
        import bitsandbytes
    except ImportError as e:
        raise ConfigError(f"optimizer_type {name} needs bitsandbytes: pip install bitsandbytes") from e
    return bitsandbytes.optim


def create_optimizer(optimizer_type: str, groups: list[dict], lr: float, args: dict) -> torch.optim.Optimizer:
    name = canonical_optimizer(optimizer_type)
    args = dict(args)
    cls = _optimizer_class(name, groups, args)
    try:
        return cls(groups, lr=None if name == "Adafactor" and args.get("relative_step") else lr, **args)
    except (TypeError, ValueError) as e:  # a bad keyword or value in --optimizer_args
        given = ", ".join(f"{k}={v!r}" for k, v in args.items()) or "none"
        raise ConfigError(f"optimizer_args for {name}: {e} (given: {given})") from e


def _optimizer_class(name: str, groups: list[dict], args: dict):
    """The class for `name`; fills in the defaults sd-scripts gives some of them (in `args`, `groups`)."""
    if name == "AdamW":
        return torch.optim.AdamW
    if name in ("AdamW8bit", "PagedAdamW8bit", "PagedAdamW", "Lion", "Lion8bit", "PagedLion8bit"):
        return getattr(_bnb(name), name)
    if name in ("SGDNesterov", "SGDNesterov8bit"):
        args.setdefault("momentum", 0.9)
        args["nesterov"] = True
        return torch.optim.SGD if name == "SGDNesterov" else _bnb(name).SGD8bit
    if name == "Adafactor":
        from transformers.optimization import Adafactor

        args.setdefault("relative_step", True)
        args.setdefault("scale_parameter", True)
        args.setdefault("warmup_init", False)
        if args["relative_step"]:  # Adafactor computes its own lr; groups must not carry one
            for group in groups:
                group.pop("lr", None)
        return Adafactor
    if name == "Prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError as e:
            raise ConfigError("optimizer_type Prodigy needs prodigyopt: pip install prodigyopt") from e
        return Prodigy
    return import_optimizer_class(name)


def import_optimizer_class(path: str):
    module_name, _, class_name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"optimizer_type {path}: cannot import {class_name} from {module_name} ({e})") from e


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
        return lambda s: (ramp(s) if s < warmup
                          else floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress(s)))))
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
