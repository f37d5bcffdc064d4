"""`flux-train-network` (also `python -m trainer`): sd-scripts' `flux_train_network.py` command line -> TrainConfig.

The parser is built from the dataclasses in `trainer.config`: every field is a flag of the same name, and a flag
not given leaves the field's default, so each default is written once (sd-scripts' own). Options that have no
meaning for FLUX are accepted with a warning; options about data loaders and attention back ends that the trainer
chooses itself are accepted silently.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

from .cli_config_file import read_config_file, write_config_file
from .cli_help import describe_options
from .cli_options import CHOICES, NO_EFFECT, NO_EFFECT_DEFAULTS, OURS_TITLE, REFUSED, SD_SCRIPTS_GROUPS
from .config import FlowConfig, LoRAConfig, TrainConfig
from .config.combine import FLOW_FIELDS, Machine, Source, combine
from .config.model_type import MODEL_TYPES
from .config.sections import DYNAMO_BACKENDS, RESIZE_INTERPOLATIONS
from .config.train import FLAG_SECTIONS, SECTIONS
from .console import MOSTLY_SKIPPED_EXIT, ConsoleReporter, configure_logging, mostly_skipped
from .errors import ConfigError, Stopped, TrainerError
from .events import Message

# TrainConfig fields that are not flags: nested option groups, and values only the library interface takes
NOT_FLAGS = ("network", "flow", "datasets", "sample_prompt_lines")
# LoRAConfig fields with a flag of their own; the rest go through --network_args key=value
LORA_FLAGS = ("network_dim", "network_alpha", "network_dropout", "network_train_unet_only")
# flags that act on the command line itself (read here, not a config field)
ACTING = {
    "console_log_level": dict(choices=CHOICES["console_log_level"], help="level of the library's log lines"),
    "console_log_file": dict(help="also write the log to this file"),
    "console_log_simple": dict(action="store_true", help="log lines without time and source"),
    "tokenizer_cache_dir": dict(help="a folder holding the tokenizers as sd-scripts caches them "
                                     "(openai_clip-vit-large-patch14, google_t5-v1_1-xxl)"),
    "caption_extention": dict(help="old spelling of --caption_extension"),
    "debug_dataset": dict(action="store_true", help="print the datasets' pre-flight report and stop"),
    "config_file": dict(help="a TOML file of options (the kohya_ss GUI's); the command line overrides it"),
    "output_config": dict(action="store_true", help="write the options given to --config_file and stop"),
    "use_8bit_adam": dict(action="store_true", help="old form of --optimizer_type AdamW8bit"),
    "use_lion_optimizer": dict(action="store_true", help="old form of --optimizer_type Lion"),
    "network_module": dict(default="networks.lora_flux", help="networks.lora_flux (the only one)"),
    "network_args": dict(nargs="*", default=[], help="LoRA options as key=value (img_attn_dim=8, split_qkv=True ...)"),
    "sample_sampler": dict(default="euler", help="previews always use the Euler flow-matching sampler"),
    "split_mode": dict(action="store_true", help="deprecated: --blocks_to_swap 18"),
    "sdpa": dict(action="store_true", help="always on here: attention is PyTorch's scaled_dot_product_attention"),
    "memory": dict(choices=("auto",), help="auto: from the GPU's free memory, the datasets' resolution and batch and "
                   "the transformer's size, pick fp8 base, block swap, T5 in fp8, checkpointing and caching (what the "
                   "command line sets itself is kept)"),
    "check_only": dict(action="store_true", help="read the datasets and check every input, print the pre-flight "
                                                 "report, and stop before loading any model"),
}
# flags that are not a field: acting on the command line, doing nothing here (with a warning), or refused
CLI_ONLY = (*ACTING, *NO_EFFECT, *REFUSED)
HELP = {
    "pretrained_model_name_or_path": "FLUX.1 transformer (.safetensors)", "clip_l": "CLIP-L text encoder",
    "t5xxl": "T5-XXL text encoder", "ae": "FLUX autoencoder", "clip_l_tokenizer": "folder or Hugging Face id",
    "t5xxl_tokenizer": "folder or Hugging Face id", "device": "cuda, cuda:1, cpu ... (default: cuda if available)",
    "cache_dir": "write disk caches here instead of beside the images",
}
# sd-scripts' parser default where the config field's differs: without --output_dir sd-scripts trains and then fails
# at its first save, so the command line asks for it (the library and the nodes keep "output")
SD_SCRIPTS_DEFAULTS = {"output_dir": None}
_KINDS = {"flag": dict(action="store_true"), "str": dict(type=str), "int": dict(type=int),
          "float": dict(type=float), "str*": dict(nargs="*"), "float*": dict(type=float, nargs="*")}


def _int_or_float(text: str):
    """sd-scripts' int_or_float: 100 steps, 0.1 of the total, or 10% of the total."""
    if text.endswith("%"):
        return float(text[:-1]) / 100
    value = float(text)
    return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value


def _resolution(text: str) -> tuple[int, int]:
    parts = [int(p) for p in text.replace("x", ",").split(",")]
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected SIZE or WIDTH,HEIGHT, not {text!r}")
    return parts[0], parts[1]


SPECIAL_TYPES = {"resolution": dict(type=_resolution), "lr_warmup_steps": dict(type=_int_or_float),
                 "lr_decay_steps": dict(type=_int_or_float), "text_encoder_lr": dict(type=float, nargs="*"),
                 "optimizer_args": dict(nargs="*"), "lr_scheduler_args": dict(nargs="*"),
                 "base_weights": dict(nargs="*"), "base_weights_multiplier": dict(type=float, nargs="*"),
                 "dynamo_backend": dict(type=str, choices=DYNAMO_BACKENDS),
                 "resize_interpolation": dict(type=str, choices=RESIZE_INTERPOLATIONS),
                 "model_type": dict(type=str, choices=MODEL_TYPES)}


def _flag_for(field: dataclasses.Field) -> dict:
    """argparse keywords for a dataclass field, from its annotation (a string under `from __future__`)."""
    if field.name in SPECIAL_TYPES:
        return dict(SPECIAL_TYPES[field.name])
    kind = str(field.type).split("|")[0].strip()
    if kind == "bool":
        return dict(action="store_true")
    if kind in ("int", "float"):
        return dict(type=int if kind == "int" else float)
    if kind == "str":
        return dict(type=str)
    raise TypeError(f"no command-line form for {field.name}: {field.type}")


def option_fields() -> list[dataclasses.Field]:
    """Every field that has a flag of its name: TrainConfig's, FlowConfig's and four of LoRAConfig's."""
    train = [f for cls in SECTIONS.values() for f in dataclasses.fields(cls) if f.name not in NOT_FLAGS]
    lora = [f for f in dataclasses.fields(LoRAConfig) if f.name in LORA_FLAGS]
    return train + list(dataclasses.fields(FlowConfig)) + lora


def _add(group, name: str, fields: dict[str, dataclasses.Field]) -> None:
    if name in fields:
        field = fields[name]
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        default = "" if required else f" (default: {SD_SCRIPTS_DEFAULTS.get(name, field.default)})"
        group.add_argument(f"--{name}", required=required, help=HELP.get(name, "") + default, **_flag_for(field))
    elif name in ACTING:
        group.add_argument(f"--{name}", **ACTING[name])
    elif name in NO_EFFECT:
        kind, why = NO_EFFECT[name]
        choices = {"choices": CHOICES[name]} if name in CHOICES else {}
        group.add_argument(f"--{name}", help=f"[accepted, no effect: {why}]", **choices, **_KINDS[kind])
    elif name in REFUSED:
        kind, why = REFUSED[name]
        group.add_argument(f"--{name}", help=f"[refused: {why}]", **_KINDS[kind])
    else:
        raise TypeError(f"--{name}: neither a config field nor a command-line option")


def build_parser() -> argparse.ArgumentParser:
    """sd-scripts' options in its groups and order, then ours; every field of the config is a flag."""
    p = argparse.ArgumentParser(prog="flux-train-network", description="Train a FLUX.1 LoRA (sd-scripts' options).",
                                argument_default=argparse.SUPPRESS)
    fields = {f.name: f for f in option_fields()}
    placed: set[str] = set()
    for title, names in SD_SCRIPTS_GROUPS:
        group = p.add_argument_group(f"sd-scripts: {title}")
        for name in names:
            _add(group, name, fields)
        placed.update(names)
    ours = p.add_argument_group(OURS_TITLE)
    for name in [*fields, *ACTING, *NO_EFFECT, *REFUSED]:
        if name not in placed:
            _add(ours, name, fields)
            placed.add(name)
    return describe_options(p)


def parse_command_line(argv: list[str] | None, warn=print) -> argparse.Namespace:
    """Parse, reading --config_file first when given (its values under the command line's)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--config_file")
    first.add_argument("--output_config", action="store_true")
    known, _ = first.parse_known_args(argv)
    if known.config_file and not known.output_config:
        return parser.parse_args(read_config_file(known.config_file, parser, warn) + argv)
    return parser.parse_args(argv)


def _requested(name: str, value) -> bool:
    return value not in (None, False, 0, "", []) and value != NO_EFFECT_DEFAULTS.get(name)


def _acts_in_sd_scripts(name: str, given: dict) -> bool:
    """Whether a value the kohya_ss GUI writes by default would have done anything in sd-scripts (no warning for
    those that would not): upload settings without a repository to upload to, the whole 0-1000 timestep range."""
    if name in ("huggingface_repo_type", "huggingface_path_in_repo", "huggingface_token",
                "huggingface_repo_visibility", "save_state_to_huggingface", "async_upload"):
        return bool(given.get("huggingface_repo_id"))
    if name in ("min_timestep", "max_timestep"):
        return given[name] != {"min_timestep": 0, "max_timestep": 1000}[name]
    return True


def config_from_args(ns: argparse.Namespace, warn=print, measure=None, inform=None) -> TrainConfig:
    """The command line's options -> the config, resolved by the core's `combine` (as the nodes' are); `measure`
    (--memory auto) reads the machine the draft config would train on, and the plan fills what the command line
    leaves unset. The plan's explanation goes to `inform` (default `warn`), everything else combine notes to
    `warn`."""
    resolved = combine([command_line_source(ns, warn)], measure=measure)
    explained = set(resolved.memory.lines) if resolved.memory else set()
    for line in resolved.notes:
        (inform or warn if line in explained else warn)(line)
    return resolved.config


def command_line_source(ns: argparse.Namespace, warn=print) -> Source:
    """Every option the command line set, under the config's names: sd-scripts' old spellings and deprecated flags
    translated, options without effect warned about, refused ones refused."""
    given = dict(vars(ns))
    for name, (_, why) in NO_EFFECT.items():
        if _requested(name, given.get(name)) and _acts_in_sd_scripts(name, given):
            warn(f"--{name} has no effect here: {why}")
    for name, (_, why) in REFUSED.items():
        if _requested(name, given.get(name)):
            raise ConfigError(f"--{name} is not supported: {why}")
    if given.get("network_module", "networks.lora_flux") != "networks.lora_flux":
        raise ConfigError(f"network_module: only networks.lora_flux is supported, not {given['network_module']!r}")
    if given.get("sample_sampler", "euler").lower() not in ("euler", "k_euler"):
        warn(f"--sample_sampler {given['sample_sampler']}: previews use the Euler flow-matching sampler")
    if given.get("caption_extention") is not None:
        given["caption_extension"] = given["caption_extention"]  # sd-scripts: the old spelling wins
    if given.get("dataset_config"):
        ignored = [name for name in ("train_data_dir", "reg_data_dir", "in_json") if given.get(name)]
        if ignored:
            warn(f"--dataset_config is given, so {', '.join('--' + n for n in ignored)} "
                 f"{'is' if len(ignored) == 1 else 'are'} ignored (as sd-scripts does)")
            for name in ignored:
                del given[name]
    _old_optimizer_flags(given)
    _tokenizer_cache(given, warn)
    values = {name: given[name] for name in FLAG_SECTIONS if name in given}
    if given.get("split_mode"):
        if "blocks_to_swap" not in values:
            warn("--split_mode is deprecated: using --blocks_to_swap 18")
            values["blocks_to_swap"] = 18
        else:
            warn("--split_mode is deprecated and ignored because --blocks_to_swap is given")
    lora = {name: given[name] for name in LORA_FLAGS if name in given}
    values["network"] = LoRAConfig.from_network_args(given.get("network_args", []), unknown_key=warn, **lora)
    values.update({name: given[name] for name in FLOW_FIELDS if name in given})
    if "text_encoder_lr" in values:
        values["text_encoder_lr"] = tuple(values["text_encoder_lr"]) or None
    for name, value in values.items():
        if isinstance(value, list):
            values[name] = tuple(value)
    return Source("the command line", values)


def free_device_memory(device: str | None) -> tuple[str, float]:
    """The device type training will use and its free memory in bytes (RAM on the CPU)."""
    import torch

    from .distributed import pick_device

    chosen = pick_device(device)
    if chosen.type == "cuda":
        return "cuda", float(torch.cuda.mem_get_info(chosen)[0])
    return chosen.type, float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def free_host_memory(device_type: str) -> float | None:
    """What block swap may pin on the host (MemAvailable) when training on a GPU; None elsewhere."""
    from .config.memory_plan import available_host_bytes

    return available_host_bytes() if device_type == "cuda" else None


def measure_machine(draft: TrainConfig) -> Machine:
    """--memory auto's inputs: the free memory of the device the run would use, the host memory block swap may
    pin there, and the transformer's size from its file's header."""
    from .config.memory_plan import TransformerSize
    from .models import read_flux_params

    device_type, free = free_device_memory(draft.memory.device)
    size = TransformerSize.of(read_flux_params(draft.models.pretrained_model_name_or_path))
    return Machine(free, device_type, free_host_memory(device_type), size)


def _require_output_dir(ns: argparse.Namespace) -> None:
    """sd-scripts' --output_dir has no default: a run without one fails when it first saves. Refused before
    training (a check that saves nothing does not need it)."""
    if "output_dir" not in vars(ns):
        raise ConfigError("--output_dir is required: the folder the LoRA is saved to (sd-scripts has no default "
                          "either, and its run fails at the first save without one)")


def _old_optimizer_flags(given: dict) -> None:
    """--use_8bit_adam / --use_lion_optimizer: sd-scripts' older spellings, used when --optimizer_type is not set."""
    old = [name for name in ("use_8bit_adam", "use_lion_optimizer") if given.get(name)]
    if len(old) > 1:
        raise ConfigError("use_8bit_adam and use_lion_optimizer cannot be used together")
    if old and given.get("optimizer_type"):
        raise ConfigError(f"--{old[0]} and --optimizer_type both choose the optimizer: give only --optimizer_type")
    if old:
        given["optimizer_type"] = "AdamW8bit" if old[0] == "use_8bit_adam" else "Lion"


def _tokenizer_cache(given: dict, warn) -> None:
    """--tokenizer_cache_dir: sd-scripts keeps each tokenizer in <dir>/<hub id with / as _>; use those folders."""
    folder = given.get("tokenizer_cache_dir")
    if not folder:
        return
    for option, hub_id in (("clip_l_tokenizer", "openai/clip-vit-large-patch14"),
                           ("t5xxl_tokenizer", "google/t5-v1_1-xxl")):
        cached = Path(folder) / hub_id.replace("/", "_")
        if given.get(option):
            continue
        if cached.is_dir():
            given[option] = str(cached)
        else:
            warn(f"--tokenizer_cache_dir: {cached} does not exist; the tokenizer is read from {option} or "
                 "$FLUX_TRAINER_TOKENIZERS (nothing is downloaded into the cache here)")


def main(argv: list[str] | None = None) -> int:
    reporter = ConsoleReporter(quiet=os.environ.get("RANK", "0") != "0")  # one console voice under torchrun

    def warn(text: str) -> None:
        reporter.emit(Message(text, "warning"))

    try:
        ns = parse_command_line(argv, warn)
        configure_logging(ns)
        if getattr(ns, "output_config", False):
            if not getattr(ns, "config_file", None):
                raise ConfigError("--output_config writes the options to --config_file: give its path")
            print(f"options written to {write_config_file(ns.config_file, ns, build_parser())}")
            return 0
        auto = getattr(ns, "memory", None) == "auto"
        config = config_from_args(ns, warn=warn, measure=measure_machine if auto else None,
                                  inform=lambda text: reporter.emit(Message(text)))
        if getattr(ns, "check_only", False) or getattr(ns, "debug_dataset", False):
            from .preflight import check, preflight_report

            check(config)
            print(preflight_report(config).text())
            print("check only: every input is usable; no model was loaded")
            return 0
        _require_output_dir(ns)
        reporter.install_signals()
        from .loop import train

        started = time.perf_counter()
        finished = train(config, reporter, step_down=getattr(ns, "memory", None) == "auto")
        reporter.emit(Message(f"total time {time.perf_counter() - started:.1f} s"))
        return MOSTLY_SKIPPED_EXIT if mostly_skipped(finished) else 0
    except Stopped as e:
        reporter.end_progress()
        print(f"stopped: {e}", file=sys.stderr)
        return 130
    except TrainerError as e:  # bad input: one message; anything else is a bug and keeps its traceback
        reporter.end_progress()
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
