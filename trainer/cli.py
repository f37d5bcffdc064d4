"""`flux-train-network` (also `python -m trainer`): sd-scripts' `flux_train_network.py` command line -> TrainConfig.

Defaults are sd-scripts' own. Options that have no meaning for FLUX are accepted with a warning; options about
data loaders and attention back ends that the trainer chooses itself are accepted silently.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time

from .config import ConfigError, TrainConfig
from .data import DatasetConfigError, DatasetError
from .events import Finished, Message, Phase, Samples, Saved, StepEnd
from .flow import FlowConfig
from .lora import LoRAConfig, LoRAConfigError
from .models import ModelFileError

NOT_FOR_FLUX = {"v2": "FLUX has no v2 variant", "v_parameterization": "FLUX predicts velocity by construction",
                "clip_skip": "FLUX uses CLIP-L's pooled output only", "max_token_length": "use --t5xxl_max_token_length"}
ACCEPTED_AND_UNUSED = ("persistent_data_loader_workers", "highvram", "lowvram", "lowram", "xformers", "mem_eff_attn",
                       "sdpa", "disable_mmap_load_safetensors", "mem_eff_save", "skip_cache_check")


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flux-train-network", description="Train a FLUX.1 LoRA (sd-scripts' options).")
    a = p.add_argument
    # models
    a("--pretrained_model_name_or_path", required=True, help="FLUX.1 transformer (.safetensors)")
    a("--clip_l", required=True)
    a("--t5xxl", required=True)
    a("--ae", required=True)
    a("--clip_l_tokenizer", help="CLIP-L tokenizer folder or Hugging Face id")
    a("--t5xxl_tokenizer", help="T5 tokenizer folder or Hugging Face id")
    a("--t5xxl_max_token_length", type=int)
    a("--apply_t5_attn_mask", action="store_true")
    a("--fp8_base", action="store_true")
    a("--fp8_base_unet", action="store_true")
    a("--blocks_to_swap", type=int)
    a("--split_mode", action="store_true", help="deprecated: --blocks_to_swap 18")
    a("--cpu_offload_checkpointing", action="store_true")
    a("--gradient_checkpointing", action="store_true")
    a("--device", help="cuda, cuda:1, cpu ... (default: cuda if available)")
    # network
    a("--network_module", default="networks.lora_flux")
    a("--network_dim", type=int)
    a("--network_alpha", type=float)
    a("--network_dropout", type=float)
    a("--network_args", nargs="*", default=[])
    a("--network_weights")
    a("--dim_from_weights", action="store_true")
    a("--network_train_unet_only", action="store_true")
    a("--network_train_text_encoder_only", action="store_true")
    # flow matching
    a("--guidance_scale", type=float, default=3.5)
    a("--timestep_sampling", default="sigma")
    a("--sigmoid_scale", type=float, default=1.0)
    a("--model_prediction_type", default="sigma_scaled")
    a("--discrete_flow_shift", type=float, default=3.0)
    a("--weighting_scheme", default="uniform")
    a("--logit_mean", type=float, default=0.0)
    a("--logit_std", type=float, default=1.0)
    a("--mode_scale", type=float, default=1.29)
    a("--loss_type", default="l2")
    a("--huber_schedule", default="snr")
    a("--huber_c", type=float, default=0.1)
    a("--huber_scale", type=float, default=1.0)
    # data
    a("--dataset_config")
    a("--train_data_dir")
    a("--resolution", type=_resolution)
    a("--train_batch_size", type=int, default=1)
    a("--caption_extension", default=".caption")
    a("--enable_bucket", action="store_true")
    a("--min_bucket_reso", type=int, default=256)
    a("--max_bucket_reso", type=int, default=1024)
    a("--bucket_reso_steps", type=int, default=64)
    a("--bucket_no_upscale", action="store_true")
    a("--prior_loss_weight", type=float, default=1.0)
    a("--cache_latents", action="store_true")
    a("--cache_latents_to_disk", action="store_true")
    a("--vae_batch_size", type=int, default=1)
    a("--cache_text_encoder_outputs", action="store_true")
    a("--cache_text_encoder_outputs_to_disk", action="store_true")
    a("--text_encoder_batch_size", type=int)
    a("--max_data_loader_n_workers", type=int, default=8)
    # optimisation
    a("--learning_rate", type=float, default=2e-6)
    a("--unet_lr", type=float)
    a("--text_encoder_lr", type=float, nargs="*")
    a("--optimizer_type", default="")
    a("--optimizer_args", nargs="*", default=[])
    a("--lr_scheduler", default="constant")
    a("--lr_warmup_steps", type=_int_or_float, default=0)
    a("--lr_decay_steps", type=_int_or_float, default=0)
    a("--lr_scheduler_num_cycles", type=int, default=1)
    a("--lr_scheduler_power", type=float, default=1.0)
    a("--lr_scheduler_min_lr_ratio", type=float)
    a("--max_grad_norm", type=float, default=1.0)
    a("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    a("--full_bf16", action="store_true")
    a("--full_fp16", action="store_true")
    a("--gradient_accumulation_steps", type=int, default=1)
    a("--max_train_steps", type=int, default=1600)
    a("--max_train_epochs", type=int)
    a("--seed", type=int)
    # output
    a("--output_dir", default="output")
    a("--output_name")
    a("--save_model_as", default="safetensors")
    a("--save_precision", choices=["float", "fp16", "bf16"])
    a("--save_every_n_epochs", type=int)
    a("--save_every_n_steps", type=int)
    a("--save_last_n_epochs", type=int)
    a("--save_last_n_steps", type=int)
    a("--save_state", action="store_true")
    a("--save_state_on_train_end", action="store_true")
    a("--resume")
    a("--training_comment")
    a("--metadata_title")
    # previews and logs
    a("--sample_prompts")
    a("--sample_every_n_steps", type=int)
    a("--sample_every_n_epochs", type=int)
    a("--sample_at_first", action="store_true")
    a("--sample_sampler", default="euler")
    a("--logging_dir")
    a("--log_with")
    a("--log_prefix")
    # accepted for compatibility
    for name in ACCEPTED_AND_UNUSED:
        a(f"--{name}", action="store_true", help=argparse.SUPPRESS)
    a("--v2", action="store_true", help=argparse.SUPPRESS)
    a("--v_parameterization", action="store_true", help=argparse.SUPPRESS)
    a("--clip_skip", type=int, help=argparse.SUPPRESS)
    a("--max_token_length", type=int, help=argparse.SUPPRESS)
    return p


def config_from_args(ns: argparse.Namespace, warn=print) -> TrainConfig:
    for option, why in NOT_FOR_FLUX.items():
        if getattr(ns, option) not in (None, False):
            warn(f"--{option} does not apply to FLUX ({why}); ignored")
    if ns.network_module != "networks.lora_flux":
        raise ConfigError(f"network_module: only networks.lora_flux is supported, not {ns.network_module!r}")
    if ns.guidance_scale != 1.0:
        warn(f"--guidance_scale {ns.guidance_scale}: 1.0 is recommended for training FLUX.1-dev (schnell ignores it)")
    if ns.sample_sampler.lower() not in ("euler", "k_euler"):
        warn(f"--sample_sampler {ns.sample_sampler}: previews use the Euler flow-matching sampler")
    blocks_to_swap = ns.blocks_to_swap
    if ns.split_mode:
        if blocks_to_swap is None:
            warn("--split_mode is deprecated: using --blocks_to_swap 18")
            blocks_to_swap = 18
        else:
            warn("--split_mode is deprecated and ignored because --blocks_to_swap is given")
    if ns.network_train_text_encoder_only:
        raise ConfigError("network_train_text_encoder_only is not supported: FLUX LoRAs train the transformer")
    network = LoRAConfig.from_network_args(ns.network_args, ns.network_dim, ns.network_alpha, ns.network_dropout,
                                           network_train_unet_only=ns.network_train_unet_only)
    flow = FlowConfig(timestep_sampling=ns.timestep_sampling, sigmoid_scale=ns.sigmoid_scale,
                      discrete_flow_shift=ns.discrete_flow_shift, model_prediction_type=ns.model_prediction_type,
                      weighting_scheme=ns.weighting_scheme, logit_mean=ns.logit_mean, logit_std=ns.logit_std,
                      mode_scale=ns.mode_scale, guidance_scale=ns.guidance_scale, loss_type=ns.loss_type,
                      huber_schedule=ns.huber_schedule, huber_c=ns.huber_c, huber_scale=ns.huber_scale)
    same = ("pretrained_model_name_or_path", "clip_l", "t5xxl", "ae", "clip_l_tokenizer", "t5xxl_tokenizer",
            "t5xxl_max_token_length", "apply_t5_attn_mask", "fp8_base", "fp8_base_unet", "cpu_offload_checkpointing",
            "gradient_checkpointing", "device", "network_weights", "dim_from_weights", "dataset_config",
            "train_data_dir", "resolution", "train_batch_size", "caption_extension", "enable_bucket",
            "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale", "prior_loss_weight",
            "cache_latents", "cache_latents_to_disk", "vae_batch_size", "cache_text_encoder_outputs",
            "cache_text_encoder_outputs_to_disk", "text_encoder_batch_size", "learning_rate", "unet_lr",
            "optimizer_type", "lr_scheduler", "lr_warmup_steps", "lr_decay_steps", "lr_scheduler_num_cycles",
            "lr_scheduler_power", "lr_scheduler_min_lr_ratio", "max_grad_norm", "mixed_precision", "full_bf16",
            "full_fp16", "gradient_accumulation_steps", "max_train_steps", "max_train_epochs", "seed", "output_dir",
            "output_name", "save_model_as", "save_precision", "save_every_n_epochs", "save_every_n_steps",
            "save_last_n_epochs", "save_last_n_steps", "save_state", "save_state_on_train_end", "resume",
            "training_comment", "metadata_title", "sample_prompts", "sample_every_n_steps", "sample_every_n_epochs",
            "sample_at_first", "logging_dir", "log_with")
    values = {name: getattr(ns, name) for name in same}
    return TrainConfig(network=network, flow=flow, blocks_to_swap=blocks_to_swap,
                       text_encoder_lr=tuple(ns.text_encoder_lr) if ns.text_encoder_lr else None,
                       optimizer_args=tuple(ns.optimizer_args), **values)


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
    parser = build_parser()
    ns = parser.parse_args(argv)
    import os

    reporter = ConsoleReporter(quiet=os.environ.get("RANK", "0") != "0")  # one console voice under torchrun
    try:
        config = config_from_args(ns, warn=lambda text: reporter.emit(Message(text, "warning")))
        reporter.install_signals()
        from .loop import train

        started = time.perf_counter()
        train(config, reporter)
        reporter.emit(Message(f"total time {time.perf_counter() - started:.1f} s"))
        return 0
    except (ConfigError, LoRAConfigError, DatasetConfigError, DatasetError, ModelFileError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
