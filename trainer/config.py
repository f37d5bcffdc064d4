"""Every training option, typed and validated at construction; errors name the option.

Field names are sd-scripts' option names and the defaults are its defaults (the CLI keeps them); the ComfyUI nodes
start from `TrainConfig.recommended()`, which differs only where the README says why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .flow import FlowConfig
from .lora.config import LoRAConfig

MIXED_PRECISION = ("no", "fp16", "bf16")
SAVE_PRECISION = ("float", "fp16", "bf16")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
              "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay", "adafactor")


class ConfigError(ValueError):
    """An option has a value it cannot take, or options conflict; the message names them."""


@dataclass(frozen=True)
class TrainConfig:
    # models
    pretrained_model_name_or_path: str = ""
    clip_l: str | None = None
    t5xxl: str | None = None
    ae: str = ""
    clip_l_tokenizer: str | None = None  # folder or Hugging Face id (ours; default: $FLUX_TRAINER_TOKENIZERS or HF)
    t5xxl_tokenizer: str | None = None
    t5xxl_max_token_length: int | None = None  # None: 512 for dev, 256 for schnell
    apply_t5_attn_mask: bool = False
    fp8_base: bool = False
    fp8_base_unet: bool = False
    blocks_to_swap: int | None = None
    cpu_offload_checkpointing: bool = False
    gradient_checkpointing: bool = False
    device: str | None = None  # None: cuda if available, else cpu

    # network
    network: LoRAConfig = field(default_factory=LoRAConfig)
    network_weights: str | None = None
    dim_from_weights: bool = False

    # flow matching
    flow: FlowConfig = field(default_factory=FlowConfig)

    # data
    dataset_config: str | None = None
    train_data_dir: str | None = None
    resolution: tuple[int, int] | None = None
    train_batch_size: int = 1
    caption_extension: str = ".caption"
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    prior_loss_weight: float = 1.0
    cache_latents: bool = False
    cache_latents_to_disk: bool = False
    vae_batch_size: int = 1
    cache_text_encoder_outputs: bool = False
    cache_text_encoder_outputs_to_disk: bool = False
    text_encoder_batch_size: int | None = None

    # optimisation
    learning_rate: float = 2e-6
    unet_lr: float | None = None
    text_encoder_lr: tuple[float, ...] | None = None
    optimizer_type: str = ""
    optimizer_args: tuple[str, ...] = ()
    lr_scheduler: str = "constant"
    lr_warmup_steps: float = 0
    lr_decay_steps: float = 0
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1.0
    lr_scheduler_min_lr_ratio: float | None = None
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    full_bf16: bool = False
    full_fp16: bool = False
    gradient_accumulation_steps: int = 1
    max_train_steps: int = 1600
    max_train_epochs: int | None = None
    seed: int | None = None

    # output
    output_dir: str = "output"
    output_name: str | None = None
    save_model_as: str = "safetensors"
    save_precision: str | None = None
    save_every_n_epochs: int | None = None
    save_every_n_steps: int | None = None
    save_last_n_epochs: int | None = None
    save_last_n_steps: int | None = None
    save_state: bool = False
    save_state_on_train_end: bool = False
    resume: str | None = None
    training_comment: str | None = None
    metadata_title: str | None = None

    # previews and logs
    sample_prompts: str | None = None
    sample_every_n_steps: int | None = None
    sample_every_n_epochs: int | None = None
    sample_at_first: bool = False
    logging_dir: str | None = None
    log_with: str | None = None

    def __post_init__(self):
        _choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        if self.save_precision is not None:
            _choice("save_precision", self.save_precision, SAVE_PRECISION)
        _choice("lr_scheduler", self.lr_scheduler, SCHEDULERS)
        if self.save_model_as != "safetensors":
            raise ConfigError(f"save_model_as: only safetensors is written (a LoRA in {self.save_model_as} would be a "
                              "pickle, which loaders must not trust); use --save_model_as safetensors")
        for name in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "vae_batch_size",
                     "lr_scheduler_num_cycles"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: expected a positive whole number, not {getattr(self, name)}")
        for name in ("max_train_epochs", "save_every_n_epochs", "save_every_n_steps", "save_last_n_epochs",
                     "save_last_n_steps", "sample_every_n_steps", "sample_every_n_epochs", "text_encoder_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name}: expected a positive whole number, not {value}")
        if self.learning_rate < 0 or self.max_grad_norm < 0 or self.lr_warmup_steps < 0:
            raise ConfigError("learning_rate, max_grad_norm and lr_warmup_steps must not be negative")
        if self.t5xxl_max_token_length is not None and not 1 <= self.t5xxl_max_token_length <= 512:
            raise ConfigError(f"t5xxl_max_token_length: expected 1-512, not {self.t5xxl_max_token_length}")
        if self.blocks_to_swap is not None:
            if not 0 <= self.blocks_to_swap <= 35:
                raise ConfigError(f"blocks_to_swap: expected 0-35 (at most 17 double and 36 single blocks move), "
                                  f"not {self.blocks_to_swap}")
            if self.cpu_offload_checkpointing:
                raise ConfigError("blocks_to_swap and cpu_offload_checkpointing cannot be used together")
        if self.cpu_offload_checkpointing and not self.gradient_checkpointing:
            raise ConfigError("cpu_offload_checkpointing needs --gradient_checkpointing")
        if (self.fp8_base or self.fp8_base_unet) and self.mixed_precision == "no":
            raise ConfigError("fp8_base needs --mixed_precision bf16 or fp16 (fp8 weights are upcast for each layer)")
        if self.full_bf16 and self.mixed_precision != "bf16":
            raise ConfigError("full_bf16 needs --mixed_precision bf16")
        if self.full_fp16 and self.mixed_precision != "fp16":
            raise ConfigError("full_fp16 needs --mixed_precision fp16")
        if self.network.train_t5xxl and self.cache_text_encoder_outputs:
            raise ConfigError("train_t5xxl trains T5 itself, so its outputs cannot be cached: drop "
                              "--cache_text_encoder_outputs or train_t5xxl")
        if self.network.train_t5xxl and self.network.network_train_unet_only:
            raise ConfigError("train_t5xxl and network_train_unet_only contradict each other")
        if self.cache_latents_to_disk and not self.cache_latents:
            object.__setattr__(self, "cache_latents", True)
        if self.cache_text_encoder_outputs_to_disk and not self.cache_text_encoder_outputs:
            object.__setattr__(self, "cache_text_encoder_outputs", True)
        if self.resolution is not None and (len(self.resolution) != 2 or min(self.resolution) < 16):
            raise ConfigError(f"resolution: expected WIDTH,HEIGHT (or one size), not {self.resolution}")
        if not self.dataset_config and not self.train_data_dir:
            raise ConfigError("no training data: give --dataset_config (a dataset TOML) or --train_data_dir")
        if self.resume and not Path(self.resume).is_dir():
            raise ConfigError(f"resume: {self.resume} is not a folder saved with --save_state")

    @property
    def name(self) -> str:
        return self.output_name or "last"

    @classmethod
    def recommended(cls, **overrides) -> "TrainConfig":
        """What the ComfyUI nodes start from: guidance 1.0, raw prediction, flux_shift sampling, AdamW at 1e-4,
        bf16, gradient checkpointing, rank 16."""
        base = dict(flow=FlowConfig(guidance_scale=1.0, model_prediction_type="raw", timestep_sampling="flux_shift"),
                    network=LoRAConfig(network_dim=16, network_alpha=16, network_train_unet_only=True),
                    learning_rate=1e-4, mixed_precision="bf16", gradient_checkpointing=True, save_precision="bf16",
                    cache_latents=True, cache_text_encoder_outputs=True, max_train_steps=1000)
        return cls(**{**base, **overrides})


def _choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{option}: expected one of {', '.join(choices)}, not {value!r}")
