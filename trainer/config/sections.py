"""The sections a training configuration is made of: small frozen dataclasses, each checking its own values, each
read only by the components it configures (in the manner of BFL's flux/util.py specs).

Field names are sd-scripts' option names and the defaults are its defaults; `trainer/config/train.py` composes the
sections into `TrainConfig` and holds the one table that maps flat command-line flags onto them.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from pathlib import Path

from ..errors import ConfigError, LoRAConfigError
from .data import DatasetConfig, SubsetConfig
from .finite import check_dataclass_finite, check_finite
from .lora import lr_for_text_encoders
from .model_type import check_model_type, required_model_files
from .names import check_file_name
from .optim import (
    SCHEDULERS,
    adafactor_relative_step,
    canonical_optimizer,
    check_scheduler_type,
    parse_optimizer_args,
    scheduler_args,
)
from .swap_split import MAX_SWAPPED_BLOCKS

MIXED_PRECISION = ("no", "fp16", "bf16")
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
MAX_DDP_TIMEOUT = 1_000_000  # minutes; Python's clock cannot hold much more
SAVE_PRECISION = ("float", "fp16", "bf16")
LOG_WITH = ("tensorboard", "wandb", "all")
RESIZE_INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area")
# sd-scripts' choices, and "no", which the kohya_ss GUI writes into its config files when torch_compile is off
DYNAMO_BACKENDS = ("no", "eager", "aot_eager", "inductor", "aot_ts_nvfuser", "nvprims_nvfuser", "cudagraphs", "ofi",
                   "fx2trt", "onnxrt", "tensort", "ipex", "tvm")


def _dataset_default(name: str):
    """The command-line fallback of a dataset option defaults to the dataset's or subset's own default: written
    once, in config/data.py."""
    for cls in (SubsetConfig, DatasetConfig):
        for f in fields(cls):
            if f.name == name and f.default is not MISSING:
                return f.default
    raise KeyError(name)


@dataclass(frozen=True, kw_only=True)
class ModelsConfig:
    """The files the run loads: the transformer, text encoders, autoencoder, tokenizers, LoRAs merged before
    training and the LoRA it starts from."""
    pretrained_model_name_or_path: str
    clip_l: str | None = None  # required for FLUX.1; Chroma has no CLIP-L
    t5xxl: str
    ae: str
    model_type: str = "flux"  # sd-scripts' --model_type: flux or chroma (the transformer file must be that)
    clip_l_tokenizer: str | None = None  # folder or Hugging Face id (ours; default: $FLUX_TRAINER_TOKENIZERS or HF)
    t5xxl_tokenizer: str | None = None
    t5xxl_max_token_length: int | None = None  # None: 512 for dev, 256 for schnell
    apply_t5_attn_mask: bool = False
    base_weights: tuple[str, ...] = ()  # LoRA files merged into the transformer before training
    base_weights_multiplier: tuple[float, ...] = ()
    network_weights: str | None = None  # a LoRA to start from
    dim_from_weights: bool = False

    def __post_init__(self):
        check_dataclass_finite(self)
        check_model_type(self.model_type)
        for name in required_model_files(self.model_type):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                without = " (only --model_type chroma does without CLIP-L)" if name == "clip_l" else ""
                raise ConfigError(f"{name}: a model file is required{without}")
        if self.model_type == "chroma" and not self.apply_t5_attn_mask:
            # sd-scripts refuses Chroma without it; every front end turns it on (the CLI and the nodes say so)
            object.__setattr__(self, "apply_t5_attn_mask", True)
        if self.t5xxl_max_token_length is not None and not 1 <= self.t5xxl_max_token_length <= 512:
            raise ConfigError(f"t5xxl_max_token_length: expected 1-512, not {self.t5xxl_max_token_length}")
        object.__setattr__(self, "base_weights", tuple(self.base_weights))
        object.__setattr__(self, "base_weights_multiplier", tuple(float(v) for v in self.base_weights_multiplier))
        if self.base_weights_multiplier and len(self.base_weights_multiplier) != len(self.base_weights):
            raise ConfigError(f"base_weights_multiplier: {len(self.base_weights_multiplier)} values for "
                              f"{len(self.base_weights)} base_weights files; give one per file (or none for 1.0)")


@dataclass(frozen=True, kw_only=True)
class MemoryConfig:
    """Where weights live and in what precision: fp8, block swap, checkpointing, compilation, the device."""
    fp8_base: bool = False
    fp8_base_unet: bool = False
    t5xxl_fp8: bool = False  # ours: keep T5-XXL's Linear weights in fp8 while it encodes (the guide's 8-10 GB rows)
    blocks_to_swap: int | None = None
    cpu_offload_checkpointing: bool = False
    gradient_checkpointing: bool = False
    device: str | None = None  # None: cuda if available, else cpu
    mixed_precision: str = "no"
    full_bf16: bool = False
    full_fp16: bool = False
    no_half_vae: bool = False  # the autoencoder in float32 even with --mixed_precision bf16
    torch_compile: bool = False  # each transformer block compiled separately
    dynamo_backend: str = "inductor"

    def __post_init__(self):
        check_dataclass_finite(self)
        _choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        _choice("dynamo_backend", self.dynamo_backend, DYNAMO_BACKENDS)
        if self.torch_compile and self.dynamo_backend == "no":
            raise ConfigError("torch_compile needs a --dynamo_backend (inductor, eager ...), not 'no'")
        if self.torch_compile and self.dynamo_backend == "cudagraphs" and (
                self.blocks_to_swap or self.cpu_offload_checkpointing):
            raise ConfigError("dynamo_backend cudagraphs cannot be used with blocks_to_swap or "
                              "cpu_offload_checkpointing: swapped weights and offloaded inputs change device address "
                              "every step, so a CUDA-graph replay would read the wrong memory (use inductor)")
        if self.blocks_to_swap is not None:
            if not 0 <= self.blocks_to_swap <= MAX_SWAPPED_BLOCKS:
                raise ConfigError(f"blocks_to_swap: expected 0-{MAX_SWAPPED_BLOCKS} (at most 17 double and 36 single "
                                  f"blocks move), not {self.blocks_to_swap}")
            if self.cpu_offload_checkpointing:
                raise ConfigError("blocks_to_swap and cpu_offload_checkpointing cannot be used together")
        if self.cpu_offload_checkpointing and not self.gradient_checkpointing:
            raise ConfigError("cpu_offload_checkpointing needs --gradient_checkpointing")
        if self.fp8 and self.mixed_precision == "no":
            raise ConfigError("fp8_base needs --mixed_precision bf16 or fp16 (fp8 weights are upcast for each layer)")
        if self.full_bf16 and self.mixed_precision != "bf16":
            raise ConfigError("full_bf16 needs --mixed_precision bf16")
        if self.full_fp16 and self.mixed_precision != "fp16":
            raise ConfigError("full_fp16 needs --mixed_precision fp16")

    @property
    def fp8(self) -> bool:
        return self.fp8_base or self.fp8_base_unet


@dataclass(frozen=True, kw_only=True)
class CachingConfig:
    """Latents and text-encoder outputs computed once, in memory or on disk."""
    cache_latents: bool = False
    cache_latents_to_disk: bool = False
    vae_batch_size: int = 1
    cache_text_encoder_outputs: bool = False
    cache_text_encoder_outputs_to_disk: bool = False
    cache_dir: str | None = None  # ours: disk caches go here instead of beside the images (the nodes use it)
    text_encoder_batch_size: int | None = None

    def __post_init__(self):
        check_dataclass_finite(self)
        _positive(self, ("vae_batch_size",), ("text_encoder_batch_size",))
        if self.cache_latents_to_disk and not self.cache_latents:
            object.__setattr__(self, "cache_latents", True)
        if self.cache_text_encoder_outputs_to_disk and not self.cache_text_encoder_outputs:
            object.__setattr__(self, "cache_text_encoder_outputs", True)


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """One of a dataset TOML, a DreamBooth-style folder, or typed datasets (what the ComfyUI nodes build), and
    sd-scripts' dataset options on the command line: the fallback below [general] for every dataset and subset."""
    datasets: tuple[DatasetConfig, ...] = ()
    dataset_config: str | None = None
    train_data_dir: str | None = None
    reg_data_dir: str | None = None
    in_json: str | None = None  # fine-tune style captions for --train_data_dir
    dataset_repeats: int = 1  # repeats of the --in_json dataset
    masked_loss: bool = False  # lets dataset-config subsets name mask images (conditioning_data_dir)
    resolution: tuple[int, int] | None = None
    train_batch_size: int = 1
    face_crop_aug_range: str | None = None  # "MIN,MAX"
    caption_extension: str = _dataset_default("caption_extension")
    enable_bucket: bool = _dataset_default("enable_bucket")
    min_bucket_reso: int = _dataset_default("min_bucket_reso")
    max_bucket_reso: int = _dataset_default("max_bucket_reso")
    bucket_reso_steps: int = _dataset_default("bucket_reso_steps")
    bucket_no_upscale: bool = _dataset_default("bucket_no_upscale")
    prior_loss_weight: float = _dataset_default("prior_loss_weight")
    shuffle_caption: bool = _dataset_default("shuffle_caption")
    caption_separator: str = _dataset_default("caption_separator")
    keep_tokens: int = _dataset_default("keep_tokens")
    keep_tokens_separator: str = _dataset_default("keep_tokens_separator")
    secondary_separator: str | None = _dataset_default("secondary_separator")
    enable_wildcard: bool = _dataset_default("enable_wildcard")
    caption_prefix: str | None = _dataset_default("caption_prefix")
    caption_suffix: str | None = _dataset_default("caption_suffix")
    color_aug: bool = _dataset_default("color_aug")
    flip_aug: bool = _dataset_default("flip_aug")
    random_crop: bool = _dataset_default("random_crop")
    resize_interpolation: str | None = _dataset_default("resize_interpolation")
    token_warmup_min: int = _dataset_default("token_warmup_min")
    token_warmup_step: float = _dataset_default("token_warmup_step")
    alpha_mask: bool = _dataset_default("alpha_mask")
    caption_dropout_rate: float = _dataset_default("caption_dropout_rate")
    caption_dropout_every_n_epochs: int = _dataset_default("caption_dropout_every_n_epochs")
    caption_tag_dropout_rate: float = _dataset_default("caption_tag_dropout_rate")
    cache_info: bool = _dataset_default("cache_info")
    validation_split: float = _dataset_default("validation_split")  # held-out images for the validation loss
    validation_seed: int | None = _dataset_default("validation_seed")

    def __post_init__(self):
        check_seed("validation_seed", self.validation_seed)
        check_dataclass_finite(self)
        _positive(self, ("train_batch_size",), ("dataset_repeats",))
        for name in ("validation_split", "caption_dropout_rate", "caption_tag_dropout_rate"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name}: expected a number between 0 and 1, not {getattr(self, name)}")
        if self.validation_split == 1:
            raise ConfigError("validation_split: 1 would hold out every image; expected a fraction below 1")
        if self.caption_dropout_every_n_epochs < 0 or self.keep_tokens < 0:
            raise ConfigError("caption_dropout_every_n_epochs and keep_tokens must not be negative")
        if self.resize_interpolation is not None:
            _choice("resize_interpolation", self.resize_interpolation, RESIZE_INTERPOLATIONS)
        if self.resolution is not None and (len(self.resolution) != 2 or min(self.resolution) < 16):
            raise ConfigError(f"resolution: expected WIDTH,HEIGHT (or one size), not {self.resolution}")
        sources = [name for name in ("datasets", "dataset_config", "train_data_dir") if getattr(self, name)]
        if not sources:
            raise ConfigError("no training data: give --dataset_config (a dataset TOML) or --train_data_dir")
        if len(sources) > 1:
            raise ConfigError(f"training data given twice ({' and '.join(sources)}): use one of them")
        if self.datasets:
            object.__setattr__(self, "datasets", tuple(self.datasets))
            if not all(isinstance(d, DatasetConfig) for d in self.datasets):
                raise ConfigError("datasets: expected DatasetConfig values")


@dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """The optimizer, its learning rates and schedule, gradient accumulation, clipping and norm caps."""
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
    lr_scheduler_type: str = ""  # a scheduler class by dotted path, with lr_scheduler_args
    lr_scheduler_args: tuple[str, ...] = ()
    lr_scheduler_timescale: int | None = None  # inverse_sqrt: default the warmup steps
    max_grad_norm: float = 1.0
    scale_weight_norms: float | None = None
    gradient_accumulation_steps: int = 1

    def __post_init__(self):
        check_dataclass_finite(self)
        _choice("lr_scheduler", self.lr_scheduler, SCHEDULERS)
        _positive(self, ("gradient_accumulation_steps", "lr_scheduler_num_cycles"), ("lr_scheduler_timescale",))
        if self.learning_rate < 0 or self.max_grad_norm < 0 or self.lr_warmup_steps < 0:
            raise ConfigError("learning_rate, max_grad_norm and lr_warmup_steps must not be negative")
        for name in ("lr_warmup_steps", "lr_decay_steps"):
            _check_steps_or_ratio(name, getattr(self, name))
        object.__setattr__(self, "lr_scheduler_args", tuple(self.lr_scheduler_args))
        object.__setattr__(self, "optimizer_args", tuple(self.optimizer_args))
        parse_optimizer_args(self.lr_scheduler_args, "lr_scheduler_args")
        optimizer = canonical_optimizer(self.optimizer_type)
        optimizer_args = parse_optimizer_args(self.optimizer_args)
        check_finite({"optimizer_args": optimizer_args,
                      "lr_scheduler_args": parse_optimizer_args(self.lr_scheduler_args, "lr_scheduler_args")})
        if self.text_encoder_lr is not None:
            object.__setattr__(self, "text_encoder_lr", tuple(float(v) for v in self.text_encoder_lr))
            try:
                lr_for_text_encoders(self.text_encoder_lr, self.learning_rate)
            except LoRAConfigError as e:
                raise ConfigError(str(e)) from None
            if any(v < 0 for v in self.text_encoder_lr):
                raise ConfigError(f"text_encoder_lr: expected numbers >= 0, not {list(self.text_encoder_lr)}")
        if self.unet_lr is not None and self.unet_lr < 0:
            raise ConfigError(f"unet_lr: expected a number >= 0, not {self.unet_lr}")
        if self.lr_decay_steps < 0:
            raise ConfigError(f"lr_decay_steps: expected a number >= 0, not {self.lr_decay_steps}")
        if self.lr_scheduler_power <= 0:
            raise ConfigError(f"lr_scheduler_power: expected a positive number, not {self.lr_scheduler_power}")
        ratio = self.lr_scheduler_min_lr_ratio
        if ratio is not None and not 0 <= ratio <= 1:
            raise ConfigError(f"lr_scheduler_min_lr_ratio: expected a number between 0 and 1, not {ratio}")
        if self.lr_scheduler == "adafactor" and optimizer != "Adafactor":
            raise ConfigError("lr_scheduler adafactor follows the Adafactor optimizer's own learning rate: it needs "
                              "--optimizer_type Adafactor")
        if self.lr_scheduler == "adafactor" and not adafactor_relative_step(optimizer_args):
            raise ConfigError("lr_scheduler adafactor reports Adafactor's own relative step size, which "
                              "relative_step=False turns off: use constant_with_warmup (the guide's recipe)")
        check_scheduler_type(self.lr_scheduler_type)
        if self.lr_scheduler == "piecewise_constant" and not self.lr_scheduler_type:
            scheduler_args(self.lr_scheduler, self.lr_scheduler_type, self.lr_scheduler_args)


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """How long the run is, where it starts, its seed, and how it treats non-finite steps."""
    max_train_steps: int = 1600
    max_train_epochs: int | None = None
    seed: int | None = None
    initial_epoch: int | None = None
    initial_step: int | None = None
    skip_until_initial_step: bool = False
    skip_nonfinite_steps: int = 0  # ours: skip up to this many steps whose loss or gradients are NaN/inf, then stop

    def __post_init__(self):
        check_seed("seed", self.seed)
        check_dataclass_finite(self)
        _positive(self, ("max_train_steps",), ("max_train_epochs", "initial_epoch", "initial_step"))
        if self.skip_nonfinite_steps < 0:
            raise ConfigError(f"skip_nonfinite_steps: expected a whole number >= 0, not {self.skip_nonfinite_steps}")


@dataclass(frozen=True, kw_only=True)
class ValidationConfig:
    """When the validation loss is measured (which images are held out is a dataset option)."""
    validate_every_n_steps: int | None = None
    validate_every_n_epochs: int | None = None
    max_validation_steps: int | None = None

    def __post_init__(self):
        check_dataclass_finite(self)
        _positive(self, (), ("validate_every_n_steps", "validate_every_n_epochs", "max_validation_steps"))


@dataclass(frozen=True, kw_only=True)
class SavingConfig:
    """What is written where and when: LoRA files, training states, their metadata, and the state to resume."""
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
    save_last_n_epochs_state: int | None = None
    save_last_n_steps_state: int | None = None
    save_n_epoch_ratio: int | None = None
    resume: str | None = None
    no_metadata: bool = False
    training_comment: str | None = None
    metadata_title: str | None = None
    metadata_author: str | None = None
    metadata_description: str | None = None
    metadata_license: str | None = None
    metadata_tags: str | None = None
    metadata_usage_hint: str | None = None
    metadata_thumbnail: str | None = None
    metadata_merged_from: str | None = None
    metadata_trigger_phrase: str | None = None
    metadata_preprocessor: str | None = None
    metadata_is_negative_embedding: str | None = None

    def __post_init__(self):
        check_dataclass_finite(self)
        if self.save_precision is not None:
            _choice("save_precision", self.save_precision, SAVE_PRECISION)
        if self.save_model_as != "safetensors":
            raise ConfigError(f"save_model_as: only safetensors is written (a LoRA in {self.save_model_as} would be a "
                              "pickle, which loaders must not trust); use --save_model_as safetensors")
        _positive(self, (), ("save_every_n_epochs", "save_every_n_steps", "save_last_n_epochs", "save_last_n_steps",
                             "save_last_n_epochs_state", "save_last_n_steps_state", "save_n_epoch_ratio"))
        if self.output_name is not None:
            check_file_name(self.output_name, "output_name")
        if not str(self.output_dir).strip():
            raise ConfigError("output_dir: a folder is required")
        if self.resume and not any(Path(f"{self.resume}{s}").is_dir() for s in ("", ".partial", ".old")):
            raise ConfigError(f"resume: {self.resume} is not a folder saved with --save_state")

    @property
    def name(self) -> str:
        """The output file names' stem."""
        return self.output_name or "last"


@dataclass(frozen=True, kw_only=True)
class PreviewConfig:
    """Sample images: the prompts file and when they are drawn."""
    sample_prompts: str | None = None
    sample_prompt_lines: tuple[str, ...] = ()  # ours, no flag: prompts given as text (the train node's box), one a line
    sample_every_n_steps: int | None = None
    sample_every_n_epochs: int | None = None
    sample_at_first: bool = False
    sample_at_end: bool = False  # ours: previews of the finished LoRA whatever the cadence (the nodes' default)

    def __post_init__(self):
        check_dataclass_finite(self)
        _positive(self, (), ("sample_every_n_steps", "sample_every_n_epochs"))
        object.__setattr__(self, "sample_prompt_lines", tuple(self.sample_prompt_lines))
        if self.sample_prompts and self.sample_prompt_lines:
            raise ConfigError("sample_prompts: give a prompt file or prompt lines, not both")

    @property
    def given(self) -> bool:
        """Whether any preview prompt is given (a file, or lines)."""
        return bool(self.sample_prompts or self.sample_prompt_lines)


@dataclass(frozen=True, kw_only=True)
class LoggingConfig:
    """Metric trackers (TensorBoard, W&B) and their names."""
    logging_dir: str | None = None
    log_with: str | None = None
    log_prefix: str | None = None
    log_tracker_name: str | None = None
    log_tracker_config: str | None = None
    log_config: bool = False
    wandb_run_name: str | None = None
    wandb_api_key: str | None = None

    def __post_init__(self):
        check_dataclass_finite(self)
        if self.log_with is not None:
            _choice("log_with", self.log_with, LOG_WITH)


@dataclass(frozen=True, kw_only=True)
class DistributedConfig:
    """torchrun / DDP settings (one process per GPU)."""
    ddp_timeout: int | None = None  # minutes
    ddp_gradient_as_bucket_view: bool = False
    ddp_static_graph: bool = False

    def __post_init__(self):
        check_dataclass_finite(self)
        _positive(self, (), ("ddp_timeout",))
        if self.ddp_timeout is not None and self.ddp_timeout > MAX_DDP_TIMEOUT:
            raise ConfigError(f"ddp_timeout: at most {MAX_DDP_TIMEOUT} minutes (about two years), not "
                              f"{self.ddp_timeout}")


def check_seed(option: str, value: int | None) -> None:
    """Seeds end in torch's 64-bit generators (plus the prompt index for previews): refused outside the signed 64-bit
    range instead of overflowing there."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not SEED_MIN <= value <= SEED_MAX:
        raise ConfigError(f"{option}: expected a whole number from {SEED_MIN} to {SEED_MAX} (a 64-bit seed), not "
                          f"{value!r}")


def _positive(section, required: tuple[str, ...], optional: tuple[str, ...]) -> None:
    for name in (*required, *optional):
        value = getattr(section, name)
        if (value is not None or name in required) and value < 1:
            raise ConfigError(f"{name}: expected a positive whole number, not {value}")


def _check_steps_or_ratio(option: str, value) -> None:
    """sd-scripts' int_or_float rule: a count of steps is a whole number; a float is a ratio of the run's steps and
    must be below 1 (`--lr_warmup_steps 50.0`, `1e2` and `1.5` are refused by sd-scripts' parser too)."""
    if isinstance(value, float) and value >= 1:
        whole = f"write {int(value)} for {int(value)} steps" if value.is_integer() else "write a whole number of steps"
        raise ConfigError(f"{option} {value:g}: a number from 1 up is a count of steps and must be a whole number "
                          f"written without a decimal point or exponent; {whole}, or a ratio of the run below 1 "
                          "(0.1 or 10%)")


def _choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{option}: expected one of {', '.join(choices)}, not {value!r}")
