"""Optimizers and learning-rate schedules by sd-scripts' names.

`build_optimizer_and_scheduler` is the one entry point the session uses: it reads the options of a TrainConfig, makes
the adjustments sd-scripts makes (Adafactor's own step size brings its own schedule, schedule-free optimizers take
none) and says so through `emit`. The schedules follow transformers' (and for piecewise_constant diffusers')
formulas, which is what sd-scripts calls. Schedule-free optimizers need `optimizer_train_mode` before training steps
and `optimizer_eval_mode` before previews and saves; both do nothing for any other optimizer.
"""

from __future__ import annotations

import importlib
import logging
import math
from typing import TYPE_CHECKING, Callable

import torch

from .config.optim import (  # noqa: F401 (parse_optimizer_args re-exported)
    adafactor_relative_step,
    canonical_optimizer,
    is_learning_rate_free,
    is_schedule_free,
    parse_optimizer_args,
    parse_step_rules,
    scheduler_args,
)
from .errors import ConfigError

if TYPE_CHECKING:
    from .config import TrainConfig
    from .config.sections import OptimizerConfig

log = logging.getLogger(__name__)

Emit = Callable[[str], None]

# sd-scripts' name -> the bitsandbytes.optim class
_BNB_CLASSES = {"AdamW8bit": "AdamW8bit", "PagedAdamW8bit": "PagedAdamW8bit", "PagedAdamW": "PagedAdamW",
                "PagedAdamW32bit": "PagedAdamW32bit", "Lion": "Lion", "Lion8bit": "Lion8bit",
                "PagedLion8bit": "PagedLion8bit", "SGDNesterov8bit": "SGD8bit"}
_SCHEDULE_FREE = ("RAdamScheduleFree", "AdamWScheduleFree", "SGDScheduleFree")
# sd-scripts' name -> (module of the dadaptation package, class); DAdaptation is its name for AdamPreprint
_DADAPT_CLASSES = {"DAdaptation": ("dadaptation.experimental", "DAdaptAdamPreprint"),
                   "DAdaptAdamPreprint": ("dadaptation.experimental", "DAdaptAdamPreprint"),
                   "DAdaptAdaGrad": ("dadaptation", "DAdaptAdaGrad"), "DAdaptAdam": ("dadaptation", "DAdaptAdam"),
                   "DAdaptAdan": ("dadaptation", "DAdaptAdan"),
                   "DAdaptAdanIP": ("dadaptation.experimental", "DAdaptAdanIP"),
                   "DAdaptLion": ("dadaptation", "DAdaptLion"), "DAdaptSGD": ("dadaptation", "DAdaptSGD")}


# ---------------------------------------------------------------------------------------------------- the entry point


def build_optimizer_and_scheduler(config: "TrainConfig", groups: list[dict], total_steps: int,
                                  emit: Emit = lambda text: None):
    """The optimizer over `groups` (network.param_groups(...), changed in place where the optimizer needs it) and
    its learning-rate schedule for a run of `total_steps` optimizer steps, as sd-scripts makes them from the same
    options; every option changed or ignored on the way is told through `emit(text)`."""
    name = canonical_optimizer(config.optimizer.optimizer_type)
    args = parse_optimizer_args(config.optimizer.optimizer_args)
    schedule = config.optimizer.lr_scheduler
    if name == "Adafactor":
        schedule = _adafactor_notes(config.optimizer, args, emit)
    elif is_learning_rate_free(name):
        _adaptive_notes(name, groups, config.optimizer.learning_rate, emit)
    elif name == "SGDNesterov8bit":
        emit("SGDNesterov8bit: bitsandbytes' SGD8bit accepts nesterov=True but steps with plain momentum (so does "
             "sd-scripts'); SGDNesterov is the Nesterov one")
    optimizer = create_optimizer(name, groups, config.optimizer.learning_rate, args)
    optimizer_train_mode(optimizer)  # schedule-free ones start in training mode (a no-op for the rest)
    return optimizer, _create_scheduler(config.optimizer, optimizer, name, schedule, total_steps, emit)


def optimizer_train_mode(optimizer) -> None:
    """Before training steps: a schedule-free optimizer moves the weights to its training point (no-op otherwise)."""
    mode = getattr(optimizer, "train", None)
    if callable(mode):
        mode()


def optimizer_eval_mode(optimizer) -> None:
    """Before previews, validation and saves: a schedule-free optimizer moves the weights to the averaged point that
    is the model to use and keep (no-op otherwise)."""
    mode = getattr(optimizer, "eval", None)
    if callable(mode):
        mode()


def _adafactor_notes(settings: "OptimizerConfig", args: dict, emit: Emit) -> str:
    """sd-scripts' Adafactor rules; returns the schedule to use."""
    if not args.get("relative_step", True) and args.get("warmup_init", False):
        emit("Adafactor: warmup_init=True needs relative_step, so relative_step is set to True")
    if adafactor_relative_step(args):
        if settings.learning_rate != 0:
            emit(f"Adafactor with relative_step (its default) sets its own step size: learning_rate "
                 f"{settings.learning_rate:g} is only the initial value its schedule reports; for a fixed rate pass "
                 "--optimizer_args relative_step=False scale_parameter=False warmup_init=False")
        if settings.unet_lr is not None or settings.text_encoder_lr is not None:
            emit("Adafactor with relative_step: unet_lr and text_encoder_lr are ignored")
        if settings.lr_scheduler != "adafactor":
            emit(f"Adafactor with relative_step: lr_scheduler {settings.lr_scheduler} is replaced by adafactor, which "
                 "follows the optimizer's own step size")
        return "adafactor"
    if settings.max_grad_norm != 0:
        emit(f"Adafactor: max_grad_norm {settings.max_grad_norm:g} clips gradients; the recipe uses --max_grad_norm 0")
    if settings.lr_scheduler != "constant_with_warmup" and not settings.lr_scheduler_type:
        emit(f"Adafactor: lr_scheduler constant_with_warmup is the recipe's (not {settings.lr_scheduler})")
    if args.get("clip_threshold", 1.0) != 1.0:
        emit(f"Adafactor: clip_threshold=1.0 is the recipe's (not {args['clip_threshold']})")
    return settings.lr_scheduler


def _adaptive_notes(name: str, groups: list[dict], lr: float, emit: Emit) -> None:
    """Learning-rate-free optimizers (D-Adaptation, Prodigy): sd-scripts' advice on the learning rate."""
    first = groups[0].get("lr", lr) if groups else lr
    if first <= 0.1:
        emit(f"{name} adapts the step size itself; learning_rate is a multiplier on it and 1.0 is the usual value "
             f"(not {first:g})")
    if len({g.get("lr", lr) for g in groups}) > 1:
        emit(f"{name}: with several learning rates (transformer, text encoders) only the first one, {first:g}, "
             "takes effect")


# ---------------------------------------------------------------------------------------------------- optimizers


def create_optimizer(optimizer_type: str, groups: list[dict], lr: float, args: dict) -> torch.optim.Optimizer:
    name = canonical_optimizer(optimizer_type)
    args = dict(args)
    cls = _optimizer_class(name, groups, args)
    try:
        return cls(groups, lr=None if name == "Adafactor" and args.get("relative_step") else lr, **args)
    except (TypeError, ValueError) as e:  # a bad keyword or value in --optimizer_args
        given = ", ".join(f"{k}={v!r}" for k, v in args.items()) or "none"
        raise ConfigError(f"optimizer_args for {name}: {e} (given: {given})") from e


def _bnb(name: str):
    try:
        import bitsandbytes
    except ImportError as e:
        raise ConfigError(f"optimizer_type {name} needs bitsandbytes: pip install bitsandbytes") from e
    except (RuntimeError, OSError) as e:  # installed, but its native library does not load here
        raise ConfigError(f"optimizer_type {name} needs bitsandbytes, which is installed but cannot be loaded "
                          f"({e})") from e
    try:
        return getattr(bitsandbytes.optim, _BNB_CLASSES[name])
    except AttributeError:
        version = getattr(bitsandbytes, "__version__", "?")
        raise ConfigError(f"optimizer_type {name}: bitsandbytes {version} has no {_BNB_CLASSES[name]}; "
                          "pip install -U bitsandbytes") from None


def _optional_class(name: str, package: str, module_name: str, class_name: str, shown: str):
    """An optimizer class from an optional package, or one error naming the pip command."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"optimizer_type {name} needs {package}: pip install {package}") from e
    try:
        return getattr(module, class_name)
    except AttributeError:
        raise ConfigError(f"optimizer_type {name}: the installed {package} has no {shown}; "
                          f"pip install -U {package}") from None


def _schedulefree(name: str):
    return _optional_class(name, "schedulefree", "schedulefree", name, name)


def _dadaptation(name: str):
    module_name, class_name = _DADAPT_CLASSES[name]
    return _optional_class(name, "dadaptation", module_name, class_name, f"{module_name}.{class_name}")


def _optimizer_class(name: str, groups: list[dict], args: dict):
    """The class for `name`; fills in the defaults sd-scripts gives some of them (in `args`, `groups`)."""
    if name == "AdamW":
        return torch.optim.AdamW
    if name in ("SGDNesterov", "SGDNesterov8bit"):
        args.setdefault("momentum", 0.9)
        args["nesterov"] = True
        return torch.optim.SGD if name == "SGDNesterov" else _bnb(name)
    if name in _BNB_CLASSES:
        return _bnb(name)
    if name == "Adafactor":
        from transformers.optimization import Adafactor

        args["relative_step"] = adafactor_relative_step(args)
        args.setdefault("scale_parameter", True)
        args.setdefault("warmup_init", False)
        if args["relative_step"]:  # Adafactor computes its own lr; groups must not carry one
            for group in groups:
                group.pop("lr", None)
        return Adafactor
    if name in _SCHEDULE_FREE:
        return _schedulefree(name)
    if name in _DADAPT_CLASSES:
        return _dadaptation(name)
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


# ---------------------------------------------------------------------------------------------------- schedules


def warmup_steps(value: float, total: int) -> int:
    """sd-scripts: an int is a step count, a float below 1 a fraction of the training steps."""
    return int(value * total) if isinstance(value, float) and value < 1 else int(value)


def _create_scheduler(settings: "OptimizerConfig", optimizer: torch.optim.Optimizer, optimizer_name: str, schedule: str,
                      total: int, emit: Emit):
    warmup = warmup_steps(settings.lr_warmup_steps, total)
    if is_schedule_free(optimizer_name):
        if schedule != "constant" or settings.lr_scheduler_type or warmup:
            emit(f"{optimizer_name} needs no learning-rate schedule: lr_scheduler, lr_scheduler_type and "
                 "lr_warmup_steps are ignored (its own warmup: --optimizer_args warmup_steps=N)")
        return torch.optim.lr_scheduler.LambdaLR(optimizer, _constant)
    if schedule == "adafactor":
        from transformers.optimization import AdafactorSchedule

        if settings.lr_scheduler_type:
            emit(f"lr_scheduler_type {settings.lr_scheduler_type} is ignored: Adafactor with relative_step sets its "
                 "own step size")
        if warmup:
            emit("lr_warmup_steps is ignored by the adafactor schedule (Adafactor's own warmup: --optimizer_args "
                 "warmup_init=True)")
        return AdafactorSchedule(optimizer, settings.learning_rate)
    if settings.lr_scheduler_type:
        if warmup:
            emit(f"lr_warmup_steps is ignored with lr_scheduler_type {settings.lr_scheduler_type}")
        return scheduler_from_class(settings.lr_scheduler_type, optimizer,
                                    scheduler_args(schedule, settings.lr_scheduler_type, settings.lr_scheduler_args))
    options = scheduler_args(schedule, "", settings.lr_scheduler_args)
    if schedule == "constant" and warmup:
        emit(f"lr_warmup_steps {warmup} does nothing with lr_scheduler constant; constant_with_warmup warms up")
    factor = lr_lambda(schedule, warmup, total, settings.lr_scheduler_num_cycles, settings.lr_scheduler_power,
                       settings.lr_scheduler_min_lr_ratio, warmup_steps(settings.lr_decay_steps, total),
                       timescale=settings.lr_scheduler_timescale, lr_init=optimizer.defaults.get("lr") or 1.0,
                       options=options)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _constant(step: int) -> float:
    return 1.0


def scheduler_from_class(path: str, optimizer: torch.optim.Optimizer, kwargs: dict):
    """--lr_scheduler_type: a class of torch.optim.lr_scheduler by bare name, else by dotted path, built with
    --lr_scheduler_args as keywords (sd-scripts' way)."""
    module_name, _, class_name = path.rpartition(".")
    try:
        module = importlib.import_module(module_name) if module_name else torch.optim.lr_scheduler
        cls = getattr(module, class_name)
    except (ImportError, AttributeError) as e:
        where = module_name or "torch.optim.lr_scheduler"
        raise ConfigError(f"lr_scheduler_type {path}: cannot import {class_name} from {where} ({e})") from e
    if isinstance(cls, type) and issubclass(cls, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise ConfigError(f"lr_scheduler_type {path}: it steps on a measured loss, which the training loop does not "
                          "give it; choose a step-based scheduler")
    try:
        scheduler = cls(optimizer, **kwargs)
    except (TypeError, ValueError, KeyError) as e:
        given = ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "none"
        raise ConfigError(f"lr_scheduler_args for {path}: {e} (given: {given})") from e
    for method in ("step", "state_dict", "load_state_dict"):
        if not callable(getattr(scheduler, method, None)):
            raise ConfigError(f"lr_scheduler_type {path}: not a learning-rate scheduler (it has no {method}())")
    return scheduler


def lr_lambda(name: str, warmup: int, total: int, num_cycles: int = 1, power: float = 1.0,
              min_lr_ratio: float | None = None, decay_steps: int = 0, *, timescale: int | None = None,
              lr_init: float = 1.0, options: dict | None = None) -> Callable[[int], float]:
    """The factor on the base lr at step `s`, as transformers (piecewise_constant: diffusers) defines each schedule
    with the arguments sd-scripts gives it. `lr_init` is the optimizer's default lr (polynomial's lr_end and
    cosine_with_min_lr's min_lr are absolute); `options` are the schedule's --lr_scheduler_args."""
    options = options or {}
    floor = 0.0 if min_lr_ratio is None else float(min_lr_ratio)

    def ramp(s: int) -> float:
        return s / max(1, warmup)

    def progress(s: int) -> float:
        return (s - warmup) / max(1, total - warmup)

    if name == "constant":
        return _constant
    if name == "constant_with_warmup":
        return lambda s: ramp(s) if s < warmup else 1.0
    if name == "linear":
        return lambda s: ramp(s) if s < warmup else max(0.0, (total - s) / max(1, total - warmup))
    if name == "cosine":
        waves = float(options.get("num_cycles", 0.5))
        return lambda s: ramp(s) if s < warmup else max(0.0, 0.5 * (1 + math.cos(math.pi * waves * 2 * progress(s))))
    if name == "cosine_with_restarts":
        def restarts(s: int) -> float:
            if s < warmup:
                return ramp(s)
            p = progress(s)
            return 0.0 if p >= 1 else max(0.0, 0.5 * (1 + math.cos(math.pi * ((num_cycles * p) % 1.0))))
        return restarts
    if name == "polynomial":
        end = float(options.get("lr_end", 1e-7))
        if not lr_init > end:
            raise ConfigError(f"lr_scheduler polynomial: its end lr ({end:g}, lr_scheduler_args lr_end) must be "
                              f"below the learning rate ({lr_init:g})")

        def poly(s: int) -> float:
            if s < warmup:
                return ramp(s)
            if s > total:
                return end / lr_init
            remaining = 1 - (s - warmup) / max(1, total - warmup)
            return ((lr_init - end) * remaining ** power + end) / lr_init
        return poly
    if name == "inverse_sqrt":
        scale = timescale if timescale is not None else (warmup or 10_000)
        return lambda s: ramp(s) if s < warmup else 1 / math.sqrt((s + scale - warmup) / scale)
    if name == "cosine_with_min_lr":
        rate = floor
        if "min_lr" in options:
            if min_lr_ratio is not None:
                raise ConfigError("lr_scheduler cosine_with_min_lr: give the floor once, as lr_scheduler_min_lr_ratio "
                                  "or as lr_scheduler_args min_lr, not both")
            rate = float(options["min_lr"]) / lr_init
        waves = num_cycles / 2
        return lambda s: (ramp(s) if s < warmup else
                          max(0.0, 0.5 * (1 + math.cos(math.pi * waves * 2 * progress(s))) * (1 - rate) + rate))
    if name == "warmup_stable_decay":
        return _wsd(warmup, total, decay_steps, floor, num_cycles / 2, options.get("warmup_type", "linear"),
                    options.get("decay_type", "cosine"))
    if name == "piecewise_constant":
        if "step_rules" not in options:
            raise ConfigError("lr_scheduler piecewise_constant needs lr_scheduler_args step_rules=...")
        rules, last = parse_step_rules(options["step_rules"])

        def piecewise(s: int) -> float:
            return next((value for step, value in rules if s < step), last)
        return piecewise
    raise ConfigError(f"lr_scheduler {name!r} is unknown")


def _wsd(warmup: int, total: int, decay: int, floor: float, waves: float, warmup_type: str,
         decay_type: str) -> Callable[[int], float]:
    """Warmup, a stable stretch, then a decay over the last `decay` steps, each shape linear, cosine or 1-sqrt; the
    factor moves between `floor` and 1."""
    stable = total - warmup - decay
    rising = {"linear": lambda p: p, "cosine": lambda p: 0.5 * (1 - math.cos(math.pi * p)),
              "1-sqrt": lambda p: 1 - math.sqrt(1 - p)}[warmup_type]
    falling = {"linear": lambda p: 1 - p, "cosine": lambda p: 0.5 * (1 + math.cos(math.pi * waves * 2 * p)),
               "1-sqrt": lambda p: 1 - math.sqrt(p)}[decay_type]

    def wsd(s: int) -> float:
        if s < warmup:
            return max(0.0, rising(s / max(1, warmup)) * (1 - floor) + floor)
        if s < warmup + stable:
            return 1.0
        if s < warmup + stable + decay:
            return max(0.0, falling((s - warmup - stable) / max(1, decay)) * (1 - floor) + floor)
        return floor
    return wsd
