"""The command line's vocabulary beyond the config fields: sd-scripts' option groups (for `--help`), the options
that do nothing here and why, and the ones refused. Torch-free, like trainer.config.

Kinds: "flag" (store_true), "str", "int", "float", "str*" / "float*" (zero or more values).
"""

from __future__ import annotations

# sd-scripts' flux_train_network.py parser, group by group in its order (the functions of train_util, train_network,
# flux_train_utils that add them). Every option name of that parser is listed exactly once.
SD_SCRIPTS_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("logging", ("console_log_level", "console_log_file", "console_log_simple")),
    ("models", ("v2", "v_parameterization", "pretrained_model_name_or_path", "tokenizer_cache_dir")),
    ("metadata", ("metadata_title", "metadata_author", "metadata_description", "metadata_license", "metadata_tags",
                  "metadata_usage_hint", "metadata_thumbnail", "metadata_merged_from", "metadata_trigger_phrase",
                  "metadata_preprocessor", "metadata_is_negative_embedding")),
    ("dataset", ("train_data_dir", "cache_info", "shuffle_caption", "caption_separator", "caption_extension",
                 "caption_extention", "keep_tokens", "keep_tokens_separator", "secondary_separator", "enable_wildcard",
                 "caption_prefix", "caption_suffix", "color_aug", "flip_aug", "face_crop_aug_range", "random_crop",
                 "debug_dataset", "resolution", "cache_latents", "vae_batch_size", "cache_latents_to_disk",
                 "skip_cache_check", "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps",
                 "bucket_no_upscale", "resize_interpolation", "token_warmup_min", "token_warmup_step", "alpha_mask",
                 "dataset_class", "caption_dropout_rate", "caption_dropout_every_n_epochs", "caption_tag_dropout_rate",
                 "reg_data_dir", "in_json", "dataset_repeats")),
    ("training", ("output_dir", "output_name", "huggingface_repo_id", "huggingface_repo_type",
                  "huggingface_path_in_repo", "huggingface_token", "huggingface_repo_visibility",
                  "save_state_to_huggingface", "resume_from_huggingface", "async_upload", "save_precision",
                  "save_every_n_epochs", "save_every_n_steps", "save_n_epoch_ratio", "save_last_n_epochs",
                  "save_last_n_epochs_state", "save_last_n_steps", "save_last_n_steps_state", "save_state",
                  "save_state_on_train_end", "resume", "train_batch_size", "max_token_length", "mem_eff_attn",
                  "torch_compile", "dynamo_backend", "xformers", "sdpa", "vae", "max_train_steps", "max_train_epochs",
                  "max_data_loader_n_workers", "persistent_data_loader_workers", "seed", "gradient_checkpointing",
                  "gradient_accumulation_steps", "mixed_precision", "full_fp16", "full_bf16", "fp8_base",
                  "ddp_timeout", "ddp_gradient_as_bucket_view", "ddp_static_graph", "clip_skip", "logging_dir",
                  "log_with", "log_prefix", "log_tracker_name", "wandb_run_name", "log_tracker_config",
                  "wandb_api_key", "log_config", "noise_offset", "noise_offset_random_strength",
                  "multires_noise_iterations", "ip_noise_gamma", "ip_noise_gamma_random_strength",
                  "multires_noise_discount", "adaptive_noise_scale", "zero_terminal_snr", "min_timestep",
                  "max_timestep", "loss_type", "huber_schedule", "huber_c", "huber_scale", "lowram", "highvram",
                  "sample_every_n_steps", "sample_at_first", "sample_every_n_epochs", "sample_prompts",
                  "sample_sampler")),
    ("config file", ("config_file", "output_config")),
    ("DreamBooth", ("prior_loss_weight",)),
    ("masked loss", ("conditioning_data_dir", "masked_loss")),
    ("DeepSpeed", ("deepspeed", "zero_stage", "offload_optimizer_device", "offload_optimizer_nvme_path",
                   "offload_param_device", "offload_param_nvme_path", "zero3_init_flag", "zero3_save_16bit_model",
                   "fp16_master_weights_and_gradients")),
    ("optimizer", ("optimizer_type", "use_8bit_adam", "use_lion_optimizer", "learning_rate", "max_grad_norm",
                   "optimizer_args", "lr_scheduler_type", "lr_scheduler_args", "lr_scheduler", "lr_warmup_steps",
                   "lr_decay_steps", "lr_scheduler_num_cycles", "lr_scheduler_power", "fused_backward_pass",
                   "lr_scheduler_timescale", "lr_scheduler_min_lr_ratio")),
    ("custom training", ("dataset_config", "min_snr_gamma", "scale_v_pred_loss_like_noise_pred", "v_pred_like_loss",
                         "debiased_estimation_loss", "weighted_captions")),
    ("network", ("cpu_offload_checkpointing", "no_metadata", "save_model_as", "unet_lr", "text_encoder_lr",
                 "fp8_base_unet", "network_weights", "network_module", "network_dim", "network_alpha",
                 "network_dropout", "network_args", "network_train_unet_only", "network_train_text_encoder_only",
                 "training_comment", "dim_from_weights", "scale_weight_norms", "base_weights",
                 "base_weights_multiplier", "no_half_vae", "skip_until_initial_step", "initial_epoch", "initial_step",
                 "validation_seed", "validation_split", "validate_every_n_steps", "validate_every_n_epochs",
                 "max_validation_steps")),
    ("FLUX.1", ("cache_text_encoder_outputs", "cache_text_encoder_outputs_to_disk", "text_encoder_batch_size",
                "disable_mmap_load_safetensors", "weighting_scheme", "logit_mean", "logit_std", "mode_scale",
                "blocks_to_swap", "clip_l", "t5xxl", "ae", "controlnet_model_name_or_path", "t5xxl_max_token_length",
                "apply_t5_attn_mask", "guidance_scale", "timestep_sampling", "sigmoid_scale", "model_prediction_type",
                "discrete_flow_shift", "model_type", "split_mode")),
)

_PLAIN_NOISE = ("sd-scripts' FLUX trainer draws plain Gaussian noise: its noise offset and multires noise belong to "
                "its SD trainers")
_NO_SNR = "sd-scripts' FLUX trainer skips its SNR-based loss weightings (flow matching has no SNR schedule)"
_NO_BOUNDS = ("sd-scripts' FLUX timestep sampling (--timestep_sampling) has no bounds: it does not read this option, "
              "in training or in validation")
_NO_UPLOAD = "this trainer does not upload to or download from the Hugging Face Hub"
_DEEPSPEED = "DeepSpeed is not used here; several GPUs train with torchrun (DDP)"
_LOADING = "images and caches are read in the training process; there are no data-loader workers"

# Accepted, do nothing here: name -> (kind, why). Given with a value other than its default -> one warning line.
NO_EFFECT: dict[str, tuple[str, str]] = {
    "v2": ("flag", "FLUX has no v2 variant"),
    "v_parameterization": ("flag", "FLUX predicts velocity by construction"),
    "clip_skip": ("int", "FLUX uses CLIP-L's pooled output only"),
    "max_token_length": ("int", "CLIP-L takes 77 tokens; use --t5xxl_max_token_length for T5-XXL"),
    "vae": ("str", "FLUX's autoencoder is --ae"),
    "mem_eff_attn": ("flag", "attention always uses PyTorch's scaled_dot_product_attention (memory-efficient)"),
    "xformers": ("flag", "attention always uses PyTorch's scaled_dot_product_attention (memory-efficient)"),
    "lowram": ("flag", "models are read with memory-mapped safetensors, straight to their device"),
    "highvram": ("flag", "caches are kept where --cache_latents / --cache_*_to_disk say"),
    "lowvram": ("flag", "see --blocks_to_swap and --fp8_base"),
    "disable_mmap_load_safetensors": ("flag", "safetensors are always memory-mapped here"),
    "mem_eff_save": ("flag", "LoRA files are small and saved in one write"),
    "skip_cache_check": ("flag", "cache files are checked by their keys, which costs no image reads"),
    "max_data_loader_n_workers": ("int", _LOADING),
    "persistent_data_loader_workers": ("flag", _LOADING),
    "noise_offset": ("float", _PLAIN_NOISE),
    "noise_offset_random_strength": ("flag", _PLAIN_NOISE),
    "multires_noise_iterations": ("int", _PLAIN_NOISE),
    "multires_noise_discount": ("float", _PLAIN_NOISE),
    "adaptive_noise_scale": ("float", _PLAIN_NOISE),
    "zero_terminal_snr": ("flag", "sd-scripts' FLUX trainer uses a flow-matching schedule, which this "
                                    "option does not change (it rescales the SD trainers' DDPM betas)"),
    "min_timestep": ("int", _NO_BOUNDS),
    "max_timestep": ("int", _NO_BOUNDS),
    "min_snr_gamma": ("float", _NO_SNR),
    "scale_v_pred_loss_like_noise_pred": ("flag", _NO_SNR),
    "v_pred_like_loss": ("float", _NO_SNR),
    "debiased_estimation_loss": ("flag", _NO_SNR),
    "weighted_captions": ("flag", "FLUX's text encoders take plain captions; (word:1.2) weights are not parsed "
                                   "(sd-scripts' FLUX tokenizer has no weighted form either)"),
    "conditioning_data_dir": ("str", "sd-scripts' LoRA trainer reads mask folders only from the dataset config: "
                                     "set conditioning_data_dir in each [[datasets.subsets]] table (with "
                                     "--masked_loss)"),
    "fused_backward_pass": ("flag", "sd-scripts fuses the backward pass only for full fine-tuning, not for LoRA"),
    "huggingface_repo_id": ("str", _NO_UPLOAD),
    "huggingface_repo_type": ("str", _NO_UPLOAD),
    "huggingface_path_in_repo": ("str", _NO_UPLOAD),
    "huggingface_token": ("str", _NO_UPLOAD),
    "huggingface_repo_visibility": ("str", _NO_UPLOAD),
    "save_state_to_huggingface": ("flag", _NO_UPLOAD),
    "resume_from_huggingface": ("flag", _NO_UPLOAD + "; give --resume a local state folder"),
    "async_upload": ("flag", _NO_UPLOAD),
    "deepspeed": ("flag", _DEEPSPEED),
    "zero_stage": ("int", _DEEPSPEED),
    "offload_optimizer_device": ("str", _DEEPSPEED),
    "offload_optimizer_nvme_path": ("str", _DEEPSPEED),
    "offload_param_device": ("str", _DEEPSPEED),
    "offload_param_nvme_path": ("str", _DEEPSPEED),
    "zero3_init_flag": ("flag", _DEEPSPEED),
    "zero3_save_16bit_model": ("flag", _DEEPSPEED),
    "fp16_master_weights_and_gradients": ("flag", _DEEPSPEED),
}
# sd-scripts' defaults of the options above that are not None/False (a value equal to it is not a request)
NO_EFFECT_DEFAULTS = {"multires_noise_discount": 0.3, "zero_stage": 2}
CHOICES = {"console_log_level": ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
           "offload_optimizer_device": (None, "cpu", "nvme"), "offload_param_device": (None, "cpu", "nvme"),
           "zero_stage": (0, 1, 2, 3), "model_type": ("flux", "chroma")}

# Accepted by the parser, refused when used: name -> (kind, why). Training without them would silently be another
# training than the one asked for.
REFUSED: dict[str, tuple[str, str]] = {
    "dataset_class": ("str", "custom dataset classes (Python code named on the command line) are not loaded; use "
                             "--dataset_config, --train_data_dir or --in_json"),
    "controlnet_model_name_or_path": ("str", "training a LoRA through a FLUX ControlNet is not supported"),
    "network_train_text_encoder_only": ("flag", "FLUX LoRAs here always train the transformer"),
}

# Our own options, not sd-scripts': shown in a group of their own.
OURS_TITLE = "this trainer's own options"
