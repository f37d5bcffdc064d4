"""`flux-train-network` (also `python -m trainer`): sd-scripts' `flux_train_network.py` command line -> TrainConfig.

The parser is built from the dataclasses in `trainer.config`: every field is a flag of the same name, and a flag
not given leaves the field's default, so each default is written once (sd-scripts' own). Options that have no
meaning for FLUX are accepted with a warning; options about data loaders and attention back ends that the trainer
chooses itself are accepted silently.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import time

from .config import FlowConfig, LoRAConfig, TrainConfig
from .errors import Stopped, TrainerError
from .events import Finished, Message, Phase, Samples, Saved, StepEnd

NOT_FOR_FLUX = {"v2": "FLUX has no v2 variant", "v_parameterization": "FLUX predicts velocity by construction",
                "clip_skip": "FLUX uses CLIP-L's pooled output only",
                "max_token_length": "use --t5xxl_max_token_length"}
ACCEPTED_AND_UNUSED = ("persistent_data_loader_workers", "highvram", "lowvram", "lowram", "xformers", "mem_eff_attn",
                       "sdpa", "disable_mmap_load_safetensors", "mem_eff_save", "skip_cache_check")
# TrainConfig fields that are not flags: nested option groups, and values only the library interface takes
NOT_FLAGS = ("network", "flow", "datasets")
# LoRAConfig fields with a flag of their own; the rest go through --network_args key=value
LORA_FLAGS = ("network_dim", "network_alpha", "network_dropout", "network_train_unet_only")
# flags that are about the command line itself, not a field
CLI_ONLY = ("network_module", "network_args", "network_train_text_encoder_only", "split_mode", "sample_sampler",
            "max_data_loader_n_workers", "check_only", *ACCEPTED_AND_UNUSED, *NOT_FOR_FLUX)
HELP = {
    "pretrained_model_name_or_path": "FLUX.1 transformer (.safetensors)", "clip_l": "CLIP-L text encoder",
    "t5xxl": "T5-XXL text encoder", "ae": "FLUX autoencoder", "clip_l_tokenizer": "folder or Hugging Face id",
    "t5xxl_tokenizer": "folder or Hugging Face id", "device": "cuda, cuda:1, cpu ... (default: cuda if available)",
    "cache_dir": "write disk caches here instead of beside the images",
    "blocks_to_swap": "(not on a GPU yet)", "check_only": "read the datasets and check every input, print the "
    "pre-flight report, and stop before loading any model",
}


def _int_or_float(text: str):
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
                 "base_weights": dict(nargs="*"), "base_weights_multiplier": dict(type=float, nargs="*")}


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
    train = [f for f in dataclasses.fields(TrainConfig) if f.name not in NOT_FLAGS]
    lora = [f for f in dataclasses.fields(LoRAConfig) if f.name in LORA_FLAGS]
    return train + list(dataclasses.fields(FlowConfig)) + lora


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flux-train-network", description="Train a FLUX.1 LoRA (sd-scripts' options).",
                                argument_default=argparse.SUPPRESS)
    for field in option_fields():
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        default = "" if required else f" (default: {field.default})"
        p.add_argument(f"--{field.name}", required=required, help=HELP.get(field.name, "") + default,
                       **_flag_for(field))
    a = p.add_argument
    a("--network_module", default="networks.lora_flux")
    a("--network_args", nargs="*", default=[], help="LoRA options as key=value (img_attn_dim=8, split_qkv=True ...)")
    a("--network_train_text_encoder_only", action="store_true", help=argparse.SUPPRESS)
    a("--split_mode", action="store_true", help="deprecated: --blocks_to_swap 18")
    a("--sample_sampler", default="euler")
    a("--max_data_loader_n_workers", type=int)
    a("--check_only", action="store_true", help=HELP["check_only"])
    for name in ACCEPTED_AND_UNUSED:
        a(f"--{name}", action="store_true", help=argparse.SUPPRESS)
    a("--v2", action="store_true", help=argparse.SUPPRESS)
    a("--v_parameterization", action="store_true", help=argparse.SUPPRESS)
    a("--clip_skip", type=int, help=argparse.SUPPRESS)
    a("--max_token_length", type=int, help=argparse.SUPPRESS)
    return p


def config_from_args(ns: argparse.Namespace, warn=print) -> TrainConfig:
    given = vars(ns)
    for option, why in NOT_FOR_FLUX.items():
        if given.get(option) not in (None, False):
            warn(f"--{option} does not apply to FLUX ({why}); ignored")
    if given.get("network_module", "networks.lora_flux") != "networks.lora_flux":
        raise TrainerError(f"network_module: only networks.lora_flux is supported, not {given['network_module']!r}")
    if given.get("sample_sampler", "euler").lower() not in ("euler", "k_euler"):
        warn(f"--sample_sampler {given['sample_sampler']}: previews use the Euler flow-matching sampler")
    if given.get("network_train_text_encoder_only"):
        raise TrainerError("network_train_text_encoder_only is not supported: FLUX LoRAs train the transformer")
    values = {f.name: given[f.name] for f in dataclasses.fields(TrainConfig) if f.name in given}
    if given.get("split_mode"):
        if "blocks_to_swap" not in values:
            warn("--split_mode is deprecated: using --blocks_to_swap 18")
            values["blocks_to_swap"] = 18
        else:
            warn("--split_mode is deprecated and ignored because --blocks_to_swap is given")
    lora = {name: given[name] for name in LORA_FLAGS if name in given}
    network = LoRAConfig.from_network_args(given.get("network_args", []), **lora)
    flow = FlowConfig(**{f.name: given[f.name] for f in dataclasses.fields(FlowConfig) if f.name in given})
    if "text_encoder_lr" in values:
        values["text_encoder_lr"] = tuple(values["text_encoder_lr"]) or None
    for name, value in values.items():
        if isinstance(value, list):
            values[name] = tuple(value)
    return TrainConfig(network=network, flow=flow, **values)


class ConsoleReporter:
    """tqdm progress with loss and ETA; first Ctrl-C (or SIGTERM) stops after the current step and saves."""

    def __init__(self, quiet: bool = False):
        self.stop = False
        self.bar = None
        self.quiet = quiet
        self.interrupts = 0

    def install_signals(self) -> None:
        def handler(signum, frame):
            self.interrupts += 1
            if self.interrupts > 1:
                raise KeyboardInterrupt
            self.stop = True
            self._write("stopping after this step; the LoRA and the training state will be saved "
                        "(press Ctrl-C again to abort without saving)")

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)

    def should_stop(self) -> bool:
        return self.stop

    def end_progress(self) -> None:
        """End the progress bar's line, so that a message after it starts a line of its own."""
        if self.bar:
            self.bar.close()
        self.bar = None

    def _write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def emit(self, event) -> None:
        if self.quiet:
            return
        if isinstance(event, Message):
            self._write(("WARNING: " if event.level == "warning" else "") + event.text)
        elif isinstance(event, Phase) and not event.total:
            self._write(f"{event.name} ...")
        elif isinstance(event, StepEnd):
            if self.bar is None:
                try:
                    from tqdm import tqdm
                except ImportError:
                    tqdm = None
                self.bar = tqdm(total=event.total_steps, desc="steps", initial=event.step - 1) if tqdm else False
            if self.bar:
                self.bar.update(1)
                self.bar.set_postfix(loss=f"{event.average_loss:.4f}", lr=f"{event.lr:.2e}", epoch=event.epoch)
            elif event.step % 10 == 0:
                print(f"step {event.step}/{event.total_steps} loss {event.average_loss:.4f}", flush=True)
        elif isinstance(event, Saved):
            self._write(f"saved {event.kind}: {event.path}")
        elif isinstance(event, Samples):
            self._write(f"samples: {', '.join(str(p) for p in event.paths)}")
        elif isinstance(event, Finished):
            if self.bar:
                self.bar.close()
            state = "stopped early" if event.stopped_early else "finished"
            self._write(f"training {state} after {event.steps} steps; LoRA: {event.lora}")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    ns = build_parser().parse_args(argv)
    reporter = ConsoleReporter(quiet=os.environ.get("RANK", "0") != "0")  # one console voice under torchrun
    try:
        config = config_from_args(ns, warn=lambda text: reporter.emit(Message(text, "warning")))
        if getattr(ns, "check_only", False):
            from .preflight import check, preflight_report

            check(config)
            print(preflight_report(config).text())
            print("check only: every input is usable; no model was loaded")
            return 0
        reporter.install_signals()
        from .loop import train

        started = time.perf_counter()
        train(config, reporter)
        reporter.emit(Message(f"total time {time.perf_counter() - started:.1f} s"))
        return 0
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
