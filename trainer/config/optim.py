"""Optimizer and learning-rate schedule vocabularies, by sd-scripts' names, and the checks that need no torch."""

from __future__ import annotations

import ast
import re

from ..errors import ConfigError

# name as sd-scripts spells it -> the package it needs (None: torch or transformers, always present)
OPTIMIZERS: dict[str, str | None] = {
    "AdamW": None, "AdamW8bit": "bitsandbytes", "PagedAdamW": "bitsandbytes", "PagedAdamW8bit": "bitsandbytes",
    "PagedAdamW32bit": "bitsandbytes", "Lion": "bitsandbytes", "Lion8bit": "bitsandbytes",
    "PagedLion8bit": "bitsandbytes", "SGDNesterov": None, "SGDNesterov8bit": "bitsandbytes", "Adafactor": None,
    "Prodigy": "prodigyopt", "RAdamScheduleFree": "schedulefree", "AdamWScheduleFree": "schedulefree",
    "SGDScheduleFree": "schedulefree", "DAdaptation": "dadaptation", "DAdaptAdamPreprint": "dadaptation",
    "DAdaptAdaGrad": "dadaptation", "DAdaptAdam": "dadaptation", "DAdaptAdan": "dadaptation",
    "DAdaptAdanIP": "dadaptation", "DAdaptLion": "dadaptation", "DAdaptSGD": "dadaptation",
}
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
              "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay", "piecewise_constant", "adafactor")
# the guide's Adafactor recipe: a fixed learning rate, no relative step or parameter scaling
ADAFACTOR_RECOMMENDED_ARGS = ("relative_step=False", "scale_parameter=False", "warmup_init=False")
# the lr_scheduler_args a named schedule takes: what sd-scripts hands on to transformers/diffusers beyond the values
# it fills in from its own options (warmup, steps, cycles, power, timescale, min_lr_ratio)
SCHEDULER_ARGS: dict[str, tuple[str, ...]] = {
    "cosine": ("num_cycles",), "polynomial": ("lr_end",), "cosine_with_min_lr": ("min_lr",),
    "warmup_stable_decay": ("warmup_type", "decay_type"), "piecewise_constant": ("step_rules",),
}
WSD_SHAPES = ("linear", "cosine", "1-sqrt")
STEP_RULES_EXAMPLE = "step_rules=1:10,0.1:20,0.01 (x1 before step 10, x0.1 before step 20, then x0.01)"

# torch.optim.lr_scheduler classes that take only numbers (a text option can give nothing else): what
# --lr_scheduler_type may name where class paths are not taken (the ComfyUI nodes)
TORCH_SCHEDULER_CLASSES = ("StepLR", "MultiStepLR", "ConstantLR", "LinearLR", "ExponentialLR", "PolynomialLR",
                           "CosineAnnealingLR", "CosineAnnealingWarmRestarts", "CyclicLR", "OneCycleLR")

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


def is_learning_rate_free(optimizer_type: str) -> bool:
    """D-Adaptation and Prodigy estimate the step size themselves; learning_rate multiplies it (sd-scripts' test: a
    name starting with DAdapt, or Prodigy)."""
    name = canonical_optimizer(optimizer_type).lower()
    return name.startswith("dadapt") or name == "prodigy"


def is_schedule_free(optimizer_type: str) -> bool:
    """sd-scripts' test: a name ending in ScheduleFree (also a dotted path such as schedulefree.AdamWScheduleFree)."""
    return canonical_optimizer(optimizer_type).lower().endswith("schedulefree")


def adafactor_relative_step(args: dict) -> bool:
    """Whether Adafactor runs with its own relative step size: its default, and forced by warmup_init=True (as
    sd-scripts does; transformers refuses warmup_init without it)."""
    return bool(args.get("relative_step", True)) or bool(args.get("warmup_init", False))


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


def check_named_only(optimizer_type: str, lr_scheduler_type: str, where: str) -> None:
    """Where the options come from untrusted text (a shared ComfyUI workflow), only the optimizers of OPTIMIZERS and
    the schedules by name exist: a class path would be imported, running the module's code, and called with
    arguments the text chooses. Checked before anything is imported; the CLI keeps class paths."""
    name = (optimizer_type or "AdamW").strip()
    if name.lower() not in {known.lower() for known in OPTIMIZERS}:
        raise ConfigError(f"{where}: optimizer_type {name!r} is not one of the named optimizers "
                          f"({', '.join(OPTIMIZERS)}); an optimizer class by path (module.Class) is a command-line "
                          "feature only: it imports and runs that module's code, which a shared workflow must not do")
    scheduler = (lr_scheduler_type or "").strip()
    if scheduler and scheduler not in TORCH_SCHEDULER_CLASSES:
        raise ConfigError(f"{where}: lr_scheduler_type {scheduler!r} is not taken here; use --lr_scheduler with a "
                          f"named schedule, or one of torch's {', '.join(TORCH_SCHEDULER_CLASSES)}; a scheduler class "
                          "by path (module.Class) is a command-line feature only: it imports and runs that module's "
                          "code, which a shared workflow must not do")


def check_scheduler_type(path: str) -> None:
    """--lr_scheduler_type: a class of torch.optim.lr_scheduler by name, or any scheduler class by dotted path."""
    if path and not (path.isidentifier() or _DOTTED.fullmatch(path)):
        raise ConfigError(f"lr_scheduler_type {path!r}: expected a class name of torch.optim.lr_scheduler (such as "
                          "CosineAnnealingLR) or a dotted class path (such as torch.optim.lr_scheduler.StepLR)")


def parse_step_rules(text) -> tuple[list[tuple[int, float]], float]:
    """piecewise_constant's rules `m1:s1,m2:s2,...,m_last` (diffusers' format): the factor is m1 before step s1,
    m2 before step s2 (and not before s1), ..., m_last from the last step given on. Returns ([(step, factor)] sorted
    by step, the last factor)."""
    parts = [p.strip() for p in str(text).split(",")]
    bad = ConfigError(f"lr_scheduler_args step_rules={text!r}: expected multiplier:step pairs and a final multiplier, "
                      f"e.g. {STEP_RULES_EXAMPLE}")
    rules: dict[int, float] = {}
    try:
        for part in parts[:-1]:
            value, sep, step = part.partition(":")
            if not sep:
                raise bad
            rules[int(step)] = float(value)
        last = float(parts[-1])
    except ValueError:
        raise bad from None
    return sorted(rules.items()), last


def scheduler_args(lr_scheduler: str, lr_scheduler_type: str, raw: tuple[str, ...] | list[str]) -> dict:
    """The keyword arguments --lr_scheduler_args gives the schedule, checked: a --lr_scheduler_type class takes any
    (its own constructor judges them); a named schedule only those of SCHEDULER_ARGS."""
    args = parse_optimizer_args(raw, "lr_scheduler_args")
    if lr_scheduler_type:
        return args
    allowed = SCHEDULER_ARGS.get(lr_scheduler, ())
    for key in args:
        if key not in allowed:
            takes = f"takes only {', '.join(allowed)}" if allowed else "takes none"
            raise ConfigError(f"lr_scheduler_args {key}: lr_scheduler {lr_scheduler} {takes} (warmup, steps, cycles, "
                              "power, timescale and min_lr_ratio come from their own --lr_* options; a scheduler "
                              "class of your choice goes in --lr_scheduler_type)")
    for key in ("num_cycles", "lr_end", "min_lr"):
        if key in args and (isinstance(args[key], bool) or not isinstance(args[key], (int, float)) or args[key] < 0):
            raise ConfigError(f"lr_scheduler_args {key}: expected a number >= 0, not {args[key]!r}")
    for key in ("warmup_type", "decay_type"):
        if key in args and args[key] not in WSD_SHAPES:
            raise ConfigError(f"lr_scheduler_args {key}: expected one of {', '.join(WSD_SHAPES)}, not {args[key]!r}")
    if lr_scheduler == "piecewise_constant":
        if "step_rules" not in args:
            raise ConfigError(f"lr_scheduler piecewise_constant needs its rules in --lr_scheduler_args, e.g. "
                              f"{STEP_RULES_EXAMPLE}")
        parse_step_rules(args["step_rules"])
    return args
