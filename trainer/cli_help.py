"""`--help` text: what each option does (in this trainer's words), its choices and its one default. Torch-free.

`describe_options(parser)` rewrites the help of every option of the parser `trainer.cli.build_parser` makes: the
description below, then "one of: ..." for options with a fixed set of values, then the default (from the config
dataclasses, or the option's own), then the existing note of an option accepted without effect or refused.
"""

from __future__ import annotations

import argparse
import dataclasses

from .cli_options import CHOICES
from .config import FlowConfig, LoRAConfig, TrainConfig
from .config.flow import HUBER_SCHEDULES, LOSS_TYPES, PREDICTION_TYPES, TIMESTEP_SAMPLINGS, WEIGHTING_SCHEMES
from .config.optim import SCHEDULERS
from .config.sections import DYNAMO_BACKENDS, LOG_WITH, MIXED_PRECISION, RESIZE_INTERPOLATIONS, SAVE_PRECISION

_SAMPLE = "previews: "
_SAVE = "saving: "

DESCRIPTIONS: dict[str, str] = {
    # logging
    "console_log_level": "how much the trainer logs to the console",
    "console_log_file": "also write the log lines to this file",
    "console_log_simple": "log lines without time stamp and source",
    # models
    "v2": "Stable Diffusion 2 models (not FLUX)",
    "v_parameterization": "v-prediction training for Stable Diffusion models",
    "pretrained_model_name_or_path": "the FLUX.1 transformer (dev or schnell) to train on: a .safetensors file, BFL "
                                     "or diffusers layout, or a checkpoint holding one",
    "tokenizer_cache_dir": "a folder holding the tokenizers as sd-scripts caches them "
                           "(openai_clip-vit-large-patch14, google_t5-v1_1-xxl); nothing is downloaded into it",
    # metadata
    "metadata_title": "modelspec.title written into the LoRA (default: the output name)",
    "metadata_author": "modelspec.author written into the LoRA",
    "metadata_description": "modelspec.description written into the LoRA",
    "metadata_license": "modelspec.license written into the LoRA",
    "metadata_tags": "modelspec.tags written into the LoRA (comma-separated)",
    "metadata_usage_hint": "modelspec.usage_hint written into the LoRA",
    "metadata_thumbnail": "modelspec.thumbnail written into the LoRA (a data: URI or a link)",
    "metadata_merged_from": "modelspec.merged_from written into the LoRA",
    "metadata_trigger_phrase": "modelspec.trigger_phrase written into the LoRA",
    "metadata_preprocessor": "modelspec.preprocessor written into the LoRA",
    "metadata_is_negative_embedding": "modelspec.is_negative_embedding written into the LoRA",
    # dataset
    "train_data_dir": "folder of training images, one sub-folder per concept named '<repeats>_<class tokens>' "
                      "(DreamBooth style), or the image folder of --in_json",
    "cache_info": "keep a list of image sizes beside the dataset to start faster (read and checked, not applied)",
    "shuffle_caption": "shuffle the caption's comma-separated tags each time an image is used",
    "caption_separator": "what separates the tags of a caption",
    "caption_extension": "file extension of the caption files beside the images",
    "caption_extention": "old spelling of --caption_extension (it wins when both are given, as in sd-scripts)",
    "keep_tokens": "keep this many leading tags in place when shuffling or dropping tags",
    "keep_tokens_separator": "keep everything before this separator in place when shuffling or dropping tags",
    "secondary_separator": "a separator whose parts are shuffled and dropped together as one tag",
    "enable_wildcard": "captions may hold {a|b|c}: one choice is drawn each time; with several lines, one line is used",
    "caption_prefix": "text put before every caption",
    "caption_suffix": "text put after every caption",
    "color_aug": "random hue changes of the images (not with latent caching)",
    "flip_aug": "flip images horizontally at random (each image's latents are cached for both sides)",
    "face_crop_aug_range": "crop around faces at a random scale in this range (read and checked, not applied)",
    "random_crop": "crop images at a random place instead of the centre (not with latent caching)",
    "debug_dataset": "print the datasets' pre-flight report (images, captions, buckets, steps) and stop",
    "resolution": "training resolution: SIZE or WIDTH,HEIGHT",
    "cache_latents": "encode every image once with the autoencoder before training, and keep the latents in memory",
    "vae_batch_size": "how many images the autoencoder encodes at once when caching latents",
    "cache_latents_to_disk": "cache latents in files beside the images (or in --cache_dir), reused by later runs",
    "skip_cache_check": "skip checking that disk caches fit the images",
    "enable_bucket": "sort images into buckets of similar aspect ratio instead of cropping them all to --resolution",
    "min_bucket_reso": "smallest side of a bucket, in pixels",
    "max_bucket_reso": "largest side of a bucket, in pixels",
    "bucket_reso_steps": "bucket sides are multiples of this many pixels (a multiple of 16 here)",
    "bucket_no_upscale": "never scale an image up to fit a bucket; smaller images get a bucket of their own size",
    "resize_interpolation": "how images are resized (default: area when shrinking, lanczos when enlarging)",
    "token_warmup_min": "caption tag warm-up: the number of tags used at the start",
    "token_warmup_step": "caption tag warm-up: the step (or fraction of the run, below 1) by which all tags are used",
    "alpha_mask": "use each image's alpha channel as a loss mask (transparent parts do not train)",
    "dataset_class": "a Python class to build the dataset from",
    "caption_dropout_rate": "chance that an image trains with an empty caption",
    "caption_dropout_every_n_epochs": "train with empty captions every N-th epoch",
    "caption_tag_dropout_rate": "chance that each tag of a caption is left out",
    "reg_data_dir": "folder of regularisation images (prior preservation), laid out like --train_data_dir",
    "in_json": "a metadata JSON of captions for the images in --train_data_dir (fine-tuning style)",
    "dataset_repeats": "how often each image of --in_json is repeated per epoch",
    # training
    "output_dir": "folder the LoRA files, states and logs are written to (needed to train, as in sd-scripts)",
    "output_name": "file name of the LoRA, without extension (default: last)",
    "huggingface_repo_id": "Hugging Face repository to upload the results to",
    "huggingface_repo_type": "type of that Hugging Face repository",
    "huggingface_path_in_repo": "folder inside that Hugging Face repository",
    "huggingface_token": "Hugging Face access token for uploading",
    "huggingface_repo_visibility": "visibility of a Hugging Face repository created for uploading",
    "save_state_to_huggingface": "upload training states to Hugging Face too",
    "resume_from_huggingface": "resume from a training state stored on Hugging Face",
    "async_upload": "upload to Hugging Face in the background",
    "save_precision": "dtype of the saved LoRA weights (default: float)",
    "save_every_n_epochs": _SAVE + "save the LoRA every N epochs",
    "save_every_n_steps": _SAVE + "save the LoRA every N steps",
    "save_n_epoch_ratio": _SAVE + "save about this many times over the run (sets --save_every_n_epochs)",
    "save_last_n_epochs": _SAVE + "keep only the LoRAs of the last N epoch saves",
    "save_last_n_epochs_state": _SAVE + "keep only the last N epoch states (default: as --save_last_n_epochs)",
    "save_last_n_steps": _SAVE + "keep only the LoRAs saved within the last N steps",
    "save_last_n_steps_state": _SAVE + "keep only the states saved within the last N steps",
    "save_state": _SAVE + "also save the training state (optimizer, schedule, random states) with each LoRA",
    "save_state_on_train_end": _SAVE + "save the training state once, at the end",
    "resume": "continue training from a saved state folder, exactly where it stopped",
    "train_batch_size": "images per step (a dataset TOML may set its own)",
    "max_token_length": "CLIP token length for Stable Diffusion models (75, 150 or 225)",
    "mem_eff_attn": "memory-efficient attention for Stable Diffusion models",
    "torch_compile": "compile the transformer's blocks with torch.compile",
    "dynamo_backend": "torch.compile's back end",
    "xformers": "xformers attention for Stable Diffusion models",
    "sdpa": "PyTorch's scaled_dot_product_attention",
    "vae": "a separate autoencoder for Stable Diffusion models",
    "max_train_steps": "number of optimizer steps to train",
    "max_train_epochs": "number of epochs to train (overrides --max_train_steps)",
    "max_data_loader_n_workers": "worker processes that load the images",
    "persistent_data_loader_workers": "keep the loading workers between epochs",
    "seed": "random seed of the whole run (default: a random one, recorded in the LoRA)",
    "gradient_checkpointing": "recompute activations in the backward pass: far less memory, about 30% slower",
    "gradient_accumulation_steps": "add up the gradients of N batches before each optimizer step",
    "mixed_precision": "compute dtype of the forward and backward passes",
    "full_fp16": "keep the LoRA weights themselves in float16 (with --mixed_precision fp16)",
    "full_bf16": "keep the LoRA weights themselves in bfloat16 (with --mixed_precision bf16)",
    "fp8_base": "keep the transformer's (and an fp8 T5's) Linear weights in float8: about half the memory",
    "ddp_timeout": "minutes the processes of a multi-GPU run wait for each other",
    "ddp_gradient_as_bucket_view": "DDP: gradients share memory with its communication buckets",
    "ddp_static_graph": "DDP: the model's graph is the same every step",
    "clip_skip": "use an earlier CLIP layer's output for Stable Diffusion models",
    "logging_dir": "folder for TensorBoard / wandb logs",
    "log_with": "where to log (default: tensorboard when --logging_dir is given)",
    "log_prefix": "prefix of the run's log folder name",
    "log_tracker_name": "project / run-group name given to the trackers",
    "wandb_run_name": "name of the wandb run",
    "log_tracker_config": "a TOML file of tracker settings",
    "wandb_api_key": "wandb API key (logs in before the run)",
    "log_config": "log the run's options to the trackers",
    "noise_offset": "add a per-channel constant to the noise (Stable Diffusion trainers)",
    "noise_offset_random_strength": "draw the noise offset's strength at random each step",
    "multires_noise_iterations": "add noise at several resolutions (Stable Diffusion trainers)",
    "ip_noise_gamma": "input perturbation: the model's input is noised with noise + gamma x (another standard "
                      "normal) while the target keeps the plain noise; about 0.1 is usual",
    "ip_noise_gamma_random_strength": "draw the input perturbation's gamma uniformly between 0 and "
                                      "--ip_noise_gamma, once per step",
    "multires_noise_discount": "how fast the multires noise fades with each coarser level",
    "adaptive_noise_scale": "scale the noise offset with the latents' mean",
    "zero_terminal_snr": "rescale a DDPM noise schedule to zero signal at its last step",
    "min_timestep": "lowest timestep sampled (Stable Diffusion and SD3 trainers)",
    "max_timestep": "highest timestep sampled, exclusive (Stable Diffusion and SD3 trainers)",
    "loss_type": "loss function between prediction and target",
    "huber_schedule": "how the Huber threshold changes with the noise level (snr is not defined for flow matching)",
    "huber_c": "threshold of the Huber / smooth L1 loss",
    "huber_scale": "factor on the Huber threshold",
    "lowram": "load models straight to the GPU to spare host memory",
    "highvram": "keep caches on the GPU instead of freeing them",
    "sample_every_n_steps": _SAMPLE + "render the sample prompts every N steps",
    "sample_at_first": _SAMPLE + "render the sample prompts before training starts",
    "sample_every_n_epochs": _SAMPLE + "render the sample prompts every N epochs",
    "sample_prompts": _SAMPLE + "a file of prompts (.txt, .toml or .json) with their --w --h --s --d --l --g flags",
    "sample_sampler": _SAMPLE + "the sampler (previews always use the Euler flow-matching sampler)",
    # config file
    "config_file": "a TOML file of options (the kohya_ss GUI's); options on the command line override it",
    "output_config": "write the options given on the command line to --config_file and stop",
    # DreamBooth
    "prior_loss_weight": "loss weight of the regularisation images",
    # masked loss
    "conditioning_data_dir": "sd-scripts' ControlNet option; a LoRA's mask images are set per subset in the "
                             "dataset config (conditioning_data_dir there)",
    "masked_loss": "weight the loss by mask images: lets dataset-config subsets name a conditioning_data_dir of "
                   "masks named like the images (R channel: 255 trains fully, 0 not at all), resized and cropped "
                   "like each image; alpha_mask subsets are masked with or without it",
    # DeepSpeed
    "deepspeed": "train with DeepSpeed",
    "zero_stage": "DeepSpeed ZeRO stage",
    "offload_optimizer_device": "DeepSpeed: where the optimizer state is offloaded",
    "offload_optimizer_nvme_path": "DeepSpeed: NVMe folder for the offloaded optimizer state",
    "offload_param_device": "DeepSpeed: where parameters are offloaded",
    "offload_param_nvme_path": "DeepSpeed: NVMe folder for offloaded parameters",
    "zero3_init_flag": "DeepSpeed: build the model under ZeRO-3 initialisation",
    "zero3_save_16bit_model": "DeepSpeed: save a 16-bit model under ZeRO-3",
    "fp16_master_weights_and_gradients": "DeepSpeed: float16 master weights and gradients",
    # optimizer
    "optimizer_type": "the optimizer: AdamW, AdamW8bit, PagedAdamW8bit, Lion, Lion8bit, SGDNesterov, "
                      "SGDNesterov8bit, Adafactor, Prodigy, the schedule-free family, or a module.Class "
                      "(default: AdamW)",
    "use_8bit_adam": "old form of --optimizer_type AdamW8bit",
    "use_lion_optimizer": "old form of --optimizer_type Lion",
    "learning_rate": "learning rate of the LoRA (of the transformer's part when --unet_lr is given)",
    "max_grad_norm": "clip the gradients' total norm to this (0: no clipping)",
    "optimizer_args": "optimizer settings as key=value (weight_decay=0.01 betas=0.9,0.999 ...)",
    "lr_scheduler_type": "a learning-rate scheduler class (module.Class) instead of --lr_scheduler",
    "lr_scheduler_args": "scheduler settings as key=value, for --lr_scheduler_type or the named schedulers",
    "lr_scheduler": "learning-rate schedule over the run",
    "lr_warmup_steps": "warm-up steps: a whole number, or a fraction of the run below 1",
    "lr_decay_steps": "decay steps of warmup_stable_decay: a whole number, or a fraction of the run below 1",
    "lr_scheduler_num_cycles": "restarts of cosine_with_restarts",
    "lr_scheduler_power": "power of the polynomial schedule",
    "fused_backward_pass": "apply the optimizer inside the backward pass (full fine-tuning with Adafactor)",
    "lr_scheduler_timescale": "time scale of the inverse_sqrt schedule (default: the warm-up steps)",
    "lr_scheduler_min_lr_ratio": "lowest learning rate of cosine_with_min_lr / warmup_stable_decay, as a ratio",
    # custom training
    "dataset_config": "a dataset TOML (sd-scripts' format): datasets, subsets, resolutions, repeats, captions",
    "min_snr_gamma": "min-SNR loss weighting (Stable Diffusion trainers)",
    "scale_v_pred_loss_like_noise_pred": "scale a v-prediction loss like a noise-prediction one",
    "v_pred_like_loss": "add a v-prediction-like loss term",
    "debiased_estimation_loss": "debiased-estimation loss weighting",
    "weighted_captions": "read (word:1.2) weights in captions",
    # network
    "cpu_offload_checkpointing": "with --gradient_checkpointing, keep the saved activations in host memory",
    "no_metadata": "write no metadata into the LoRA file",
    "save_model_as": "file format of the LoRA (safetensors only here)",
    "unet_lr": "learning rate of the transformer's LoRA layers (default: --learning_rate)",
    "text_encoder_lr": "learning rate of the text encoders' LoRA layers: one value for both, or CLIP-L then T5-XXL "
                       "(default: --learning_rate)",
    "fp8_base_unet": "keep only the transformer's Linear weights in float8 (the text encoders stay as they are)",
    "network_weights": "a LoRA file to continue training from",
    "network_module": "the network to train: networks.lora_flux, the only one",
    "network_dim": "LoRA rank",
    "network_alpha": "LoRA alpha: the LoRA's output is scaled by alpha / rank",
    "network_dropout": "dropout on the LoRA's down projection while training",
    "network_args": "LoRA options as key=value: per-layer ranks (img_attn_dim=8 ...), train_blocks, split_qkv, "
                    "train_t5xxl, rank_dropout, module_dropout, loraplus_lr_ratio, ggpo_sigma / ggpo_beta ...",
    "network_train_unet_only": "train the transformer's LoRA only (no CLIP-L layers)",
    "network_train_text_encoder_only": "train the text encoders' LoRA only",
    "training_comment": "a comment written into the LoRA's metadata",
    "dim_from_weights": "take the ranks from --network_weights instead of --network_dim",
    "scale_weight_norms": "after each step, scale down every LoRA layer whose weight norm exceeds this",
    "base_weights": "LoRA files merged into the models before training",
    "base_weights_multiplier": "strength of each --base_weights file (default: 1.0 each)",
    "no_half_vae": "run the autoencoder in float32 whatever --mixed_precision says",
    "skip_until_initial_step": "with --initial_step, skip the data of the steps before it",
    "initial_epoch": "start counting at this epoch (for the schedule and the data order)",
    "initial_step": "start counting at this step (for the schedule and the data order)",
    "validation_seed": "seed of the validation split and its noise (default: --seed)",
    "validation_split": "fraction of the images held out for a validation loss",
    "validate_every_n_steps": "compute the validation loss every N steps",
    "validate_every_n_epochs": "compute the validation loss every N epochs (default: every epoch)",
    "max_validation_steps": "at most this many validation batches each time",
    # FLUX.1
    "cache_text_encoder_outputs": "encode every caption once before training, and keep the outputs in memory",
    "cache_text_encoder_outputs_to_disk": "cache text-encoder outputs in files beside the images (or in --cache_dir)",
    "text_encoder_batch_size": "captions the text encoders encode at once when caching (default: --vae_batch_size)",
    "disable_mmap_load_safetensors": "read model files without memory mapping",
    "weighting_scheme": "with --timestep_sampling sigma: how timesteps are drawn; with sigma_scaled: the loss weight",
    "logit_mean": "mean of the logit_normal weighting scheme",
    "logit_std": "standard deviation of the logit_normal weighting scheme",
    "mode_scale": "scale of the mode weighting scheme",
    "blocks_to_swap": "keep this many transformer blocks in host memory and stream them to the GPU as needed",
    "clip_l": "the CLIP-L text encoder (.safetensors)",
    "t5xxl": "the T5-XXL text encoder (.safetensors, 16-bit or fp8)",
    "ae": "the FLUX autoencoder (ae.safetensors)",
    "controlnet_model_name_or_path": "a FLUX ControlNet to train the LoRA through",
    "t5xxl_max_token_length": "T5-XXL token length (default: 512 for dev, 256 for schnell)",
    "apply_t5_attn_mask": "mask T5-XXL's padding tokens in T5 and in the transformer's attention",
    "guidance_scale": "guidance the transformer is given while training (dev; 1.0 is usual for LoRAs)",
    "timestep_sampling": "how the noise level of each sample is drawn",
    "sigmoid_scale": "scale of the normal draw behind the sigmoid, shift and flux_shift samplings",
    "model_prediction_type": "how the transformer's output becomes the prediction (raw: as is)",
    "discrete_flow_shift": "shift of the sigma and shift samplings",
    "model_type": "the model family",
    "split_mode": "deprecated: the same as --blocks_to_swap 18",
    # ours
    "clip_l_tokenizer": "CLIP-L tokenizer: a folder or a Hugging Face id (default: $FLUX_TRAINER_TOKENIZERS/clip_l, "
                        "else openai/clip-vit-large-patch14)",
    "t5xxl_tokenizer": "T5-XXL tokenizer: a folder or a Hugging Face id (default: $FLUX_TRAINER_TOKENIZERS/t5xxl, "
                       "else google/t5-v1_1-xxl)",
    "t5xxl_fp8": "keep T5-XXL's Linear weights in float8 while it encodes, whatever the file holds",
    "device": "cuda, cuda:1, cpu ... (default: cuda when available, else cpu)",
    "cache_dir": "write disk caches here instead of beside the images (the image folders are then only read)",
    "skip_nonfinite_steps": "skip up to this many steps whose loss or gradients are not finite, then stop",
    "sample_at_end": _SAMPLE + "also render the sample prompts with the finished LoRA",
    "memory": "auto: pick fp8 base, block swap, T5 in fp8, checkpointing and caching from the GPU's free memory, "
              "the datasets' resolution and batch and the transformer's size (what the command line sets is kept)",
    "check_only": "read the datasets and check every input, print the pre-flight report, and stop before loading "
                  "any model",
    "lowvram": "spare GPU memory at the cost of speed (SD3 trainers)",
    "mem_eff_save": "save full models in pieces to spare memory (full fine-tuning)",
}

# options with a fixed set of values that the parser itself does not check (the config does)
VALUE_CHOICES: dict[str, tuple] = {
    **CHOICES,
    "mixed_precision": MIXED_PRECISION, "save_precision": SAVE_PRECISION, "log_with": LOG_WITH,
    "resize_interpolation": RESIZE_INTERPOLATIONS, "dynamo_backend": DYNAMO_BACKENDS, "loss_type": LOSS_TYPES,
    "huber_schedule": HUBER_SCHEDULES, "weighting_scheme": WEIGHTING_SCHEMES, "timestep_sampling": TIMESTEP_SAMPLINGS,
    "model_prediction_type": PREDICTION_TYPES, "save_model_as": ("safetensors",), "lr_scheduler": SCHEDULERS,
    "max_token_length": (75, 150, 225),
}
_NOT_SHOWN = (None, False, "", (), [])  # defaults that mean "not set": the description says what happens then
# the command line's default where it is not the config field's (sd-scripts' parser has no --output_dir default)
COMMAND_LINE_DEFAULTS = {"output_dir": None}


def field_defaults() -> dict[str, object]:
    """Each config field's default (fields without one are required and absent here)."""
    out = {}
    for cls in (TrainConfig, FlowConfig, LoRAConfig):
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out.setdefault(f.name, f.default)
    return {**out, **COMMAND_LINE_DEFAULTS}


def help_text(name: str, default: object = None, note: str = "", required: bool = False) -> str:
    """Description, its choices, "(required)" or its default when that is a value, and the no-effect/refused note."""
    text = DESCRIPTIONS.get(name, "")
    choices = [str(c) for c in VALUE_CHOICES.get(name, ()) if c is not None]
    if choices:
        text += "; one of: " + ", ".join(choices)
    if required:
        text += " (required)"
    elif "(default:" not in text and not any(default is v or default == v for v in _NOT_SHOWN):
        text += f" (default: {default})"
    return f"{text} {note}" if note else text


def describe_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Give every option of `parser` its help text (see the module's docstring); returns the parser."""
    defaults = field_defaults()
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        name = action.dest
        note = action.help if action.help and action.help.startswith("[") else ""
        own = None if action.default is argparse.SUPPRESS else action.default
        text = help_text(name, defaults.get(name, own), note, required=action.required)
        action.help = text.replace("%", "%%")  # argparse formats help with %
    return parser
