"""Widgets -> the core's config pieces, for every node: pure functions, no torch, no ComfyUI, so each is tested
without either (tests/test_nodes_translate.py). The node files call these and only add ComfyUI's folders.

Defaults and choice lists come from `trainer.config`: a widget's default is the value of `TrainConfig.recommended()`
(what the README recommends for the nodes) or the dataclass field's default. Where a core value is None, the
widget uses a sentinel the tooltip explains (0 or -1, or an empty text). Every bad value raises the core's
TrainerError, whose message names the option.
"""

from __future__ import annotations

import os
from dataclasses import MISSING, asdict, dataclass, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Mapping

from ..trainer.config import (
    ADAFACTOR_RECOMMENDED_ARGS,
    RECOMMENDED,
    DatasetConfig,
    LoRAConfig,
    TrainConfig,
    canonical_optimizer,
    datasets_from_dict,
    load_dataset_config,
    single_folder_dataset,
)
from ..trainer.config.combine import Machine, Source, combine
from ..trainer.config.extra_options import option_lines, split_line
from ..trainer.config.extra_options import parse_extra_options as extra_options_source
from ..trainer.config.memory_plan import FLUX_DEV, MemoryPlan, TransformerSize, plan_memory  # noqa: F401
from ..trainer.config.optim import check_named_only
from ..trainer.config.sections import ModelsConfig, OptimizerConfig
from ..trainer.errors import ConfigError, DatasetConfigError
from .paths import comfy_tokenizers, resolve_input_file, resolve_input_folder  # noqa: F401
from .pieces import MemoryChoice, ModelFiles, NetworkChoice, for_transformer, piece_sources  # noqa: F401

NONE = "(none)"
FROM_CHECKPOINT = "(from checkpoint)"
PLACEHOLDER = "-"  # stands in for the model files where only datasets are looked at (the dataset node's report)
BASE_PRECISIONS = {"bf16": False, "fp8_e4m3fn": True}  # the models node's choice -> TrainConfig.fp8_base
CACHE_MODES = ("memory", "disk", "off")
MEMORY_MODES = ("manual", "auto")
# Block-index presets for the network node: (double blocks, single blocks) in the core's syntax; "custom" uses the
# two text widgets as typed.
BLOCK_PRESETS: dict[str, tuple[str, str] | None] = {
    "custom": None,
    "all": ("all", "all"),
    "double blocks only": ("all", "none"),
    "single blocks only": ("none", "all"),
    "single 10-20": ("none", "10-20"),
    "double 0-9 + single 0-18": ("0-9", "0-18"),
}


# ------------------------------------------------------------------------------------------ defaults

@lru_cache(maxsize=1)
def recommended() -> TrainConfig:
    """`TrainConfig.recommended()` with placeholder files: where every widget default is read."""
    return TrainConfig.recommended(pretrained_model_name_or_path=PLACEHOLDER, clip_l=PLACEHOLDER,
                                   t5xxl=PLACEHOLDER, ae=PLACEHOLDER, train_data_dir=PLACEHOLDER)


def default(cls: type, name: str) -> Any:
    """A dataclass field's default."""
    for f in fields(cls):
        if f.name == name:
            if f.default is not MISSING:
                return f.default
            if f.default_factory is not MISSING:
                return f.default_factory()
            raise KeyError(f"{cls.__name__}.{name} has no default")
    raise KeyError(f"{cls.__name__} has no field {name}")


def cache_mode(in_memory: bool, to_disk: bool) -> str:
    return "disk" if to_disk else "memory" if in_memory else "off"


def _none_if(value, *empty):
    return None if value in empty else value


# ------------------------------------------------------------------------------------------ models

def model_fields(*, transformer: str, clip_l: str, t5xxl: str, ae: str, checkpoint: str = NONE,
                 base_precision: str = "bf16", t5xxl_fp8: bool = False,
                 full_path: Callable[[str, str], str | None], tokenizers: tuple[str, str] | None = None) -> ModelFiles:
    """The models node: file names from ComfyUI's folder lists -> absolute paths in a ModelsConfig, and the
    precisions asked for. `full_path(folder, name)` is folder_paths.get_full_path; a slot set to FROM_CHECKPOINT
    reads its part of the full checkpoint chosen in `checkpoint`. Nothing is loaded."""
    if base_precision not in BASE_PRECISIONS:
        raise ConfigError(f"base_precision: expected one of {', '.join(BASE_PRECISIONS)}, not {base_precision!r}")
    checkpoint_path = None
    if checkpoint not in (None, "", NONE):
        checkpoint_path = full_path("checkpoints", checkpoint)
        if checkpoint_path is None:
            raise ConfigError(f"checkpoint: {checkpoint!r} is not in ComfyUI's checkpoints folder")
    files = {}
    slots = (("pretrained_model_name_or_path", "transformer", transformer, "diffusion_models"),
             ("clip_l", "clip_l", clip_l, "text_encoders"), ("t5xxl", "t5xxl", t5xxl, "text_encoders"),
             ("ae", "ae", ae, "vae"))
    for slot, option, name, folder in slots:
        files[slot] = _model_file(option, name, folder, checkpoint_path, full_path)
    if tokenizers is not None:
        files["clip_l_tokenizer"], files["t5xxl_tokenizer"] = (str(t) for t in tokenizers)
    return ModelFiles(ModelsConfig(**files), fp8_base=BASE_PRECISIONS[base_precision], t5xxl_fp8=bool(t5xxl_fp8))


def _model_file(option: str, name: str, folder: str, checkpoint_path: str | None, full_path) -> str:
    if name == FROM_CHECKPOINT:
        if checkpoint_path is None:
            raise ConfigError(f"{option}: {FROM_CHECKPOINT} needs a full checkpoint chosen in 'checkpoint'")
        return checkpoint_path
    if not name or name == NONE:
        raise ConfigError(f"{option}: choose a file (ComfyUI's {folder} folder) or {FROM_CHECKPOINT}")
    path = full_path(folder, name)
    if path is None:
        raise ConfigError(f"{option}: {name!r} is not in ComfyUI's {folder} folder")
    return path


# ------------------------------------------------------------------------------------------ datasets

DATASET_WIDGETS = ("batch_size", "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps",
                   "bucket_no_upscale", "network_multiplier")
SUBSET_WIDGETS = ("caption_extension", "class_tokens", "num_repeats", "shuffle_caption", "keep_tokens",
                  "caption_separator", "caption_dropout_rate", "caption_dropout_every_n_epochs",
                  "caption_tag_dropout_rate", "flip_aug", "random_crop", "is_reg")
_PATH_KEYS = ("image_dir", "metadata_file", "conditioning_data_dir")


def dataset_config(image_folder: str, input_dir: str | os.PathLike, resolution: int, height: int = 0,
                   extra_options: str = "", mask_folder: str = "", **widgets) -> DatasetConfig:
    """The dataset node: one folder -> one DatasetConfig (the core's checks apply). `resolution` is the width
    (and height when `height` is 0); `extra_options` holds further dataset/subset keys in TOML syntax
    (`color_aug = true`, `caption_prefix = "photo of "`); `mask_folder` (optional) holds a loss mask per image,
    named like it (sd-scripts' conditioning_data_dir), found like the image folder."""
    folder = resolve_input_folder(image_folder, input_dir)
    options = _toml_options(extra_options)
    if (mask_folder or "").strip():
        options["conditioning_data_dir"] = str(resolve_input_folder(mask_folder, input_dir, "mask_folder"))
    return _folder_dataset(folder, resolution, height, options, widgets)


# set by the image-set node itself: the caption files it writes, and alpha masks exactly when a MASK is connected
IMAGE_SET_KEYS = ("caption_extension", "alpha_mask")
IMAGE_SET_CAPTION_EXTENSION = ".txt"


def image_set_config(folder: str | os.PathLike, resolution: int, height: int = 0, extra_options: str = "",
                     alpha_mask: bool = False, **widgets) -> DatasetConfig:
    """The image-set node: the folder it wrote from the graph's images -> one DatasetConfig, with the folder
    node's widgets and extra_options (less the keys the node sets itself)."""
    options = _toml_options(extra_options)
    for key in IMAGE_SET_KEYS:
        if key in options:
            raise DatasetConfigError(f"extra_options: '{key}' is set by the image-set node (its caption files and "
                                     "its masks input), not here")
    options.update(caption_extension=IMAGE_SET_CAPTION_EXTENSION, alpha_mask=bool(alpha_mask))
    return _folder_dataset(Path(folder), resolution, height, options, widgets)


def _folder_dataset(folder: Path, resolution: int, height: int, options: dict, widgets: dict) -> DatasetConfig:
    unknown = set(widgets) - set(DATASET_WIDGETS) - set(SUBSET_WIDGETS)
    if unknown:
        raise TypeError(f"unknown dataset widgets: {sorted(unknown)}")
    values = dict(widgets)
    if "class_tokens" in values:
        values["class_tokens"] = (values["class_tokens"] or "").strip() or None
    values.update(options)
    size = (resolution, height or resolution)
    return single_folder_dataset(folder, size, **values)


def _toml_options(text: str) -> dict:
    if not (text or "").strip():
        return {}
    from ..trainer.tomlio import TOMLError, loads

    try:
        values = loads(text)
    except TOMLError as e:
        raise DatasetConfigError(f"extra_options: not valid TOML key = value lines ({e})") from None
    for key in _PATH_KEYS:
        if key in values:
            raise DatasetConfigError(f"extra_options: '{key}' is set by the node's folder widgets, not here")
    if "subsets" in values or any(isinstance(v, dict) and k != "custom_attributes" for k, v in values.items()):
        raise DatasetConfigError("extra_options: plain key = value lines only (use the TOML node for tables)")
    if "resolution" in values:
        raise DatasetConfigError("extra_options: 'resolution' is set by the node's resolution widget")
    return values


def chain(previous: tuple | None, *new: DatasetConfig) -> tuple[DatasetConfig, ...]:
    return tuple(previous or ()) + tuple(new)


def toml_datasets(toml_file: str, toml_text: str, input_dir: str | os.PathLike) -> list[DatasetConfig]:
    """The TOML node: sd-scripts' dataset TOML from a file or pasted text (one of the two). Relative image and
    mask folders in it are read under ComfyUI's input folder and may not leave it; absolute ones are taken as
    written. Subsets may name mask folders (conditioning_data_dir) without a --masked_loss: the TOML says so."""
    has_file, has_text = bool((toml_file or "").strip()), bool((toml_text or "").strip())
    if has_file == has_text:
        raise DatasetConfigError("dataset TOML: give a file or paste the TOML text (exactly one of the two)")
    if has_file:
        path = resolve_input_file(toml_file, input_dir, "toml_file")
        configs = load_dataset_config(path, masked_loss=True)
    else:
        from ..trainer.tomlio import TOMLError, loads

        try:
            document = loads(toml_text)
        except TOMLError as e:
            raise DatasetConfigError(f"dataset TOML (text): not valid TOML ({e})") from None
        configs = datasets_from_dict(document, source="dataset TOML (text)", masked_loss=True)
    out = []
    for d, config in enumerate(configs):
        subsets = []
        for s, subset in enumerate(config.subsets):
            where = f"[[datasets]] #{d + 1} [[datasets.subsets]] #{s + 1}"
            changes = {}
            for key in _PATH_KEYS:
                value = getattr(subset, key)
                if value is None:
                    continue
                if key in ("image_dir", "conditioning_data_dir"):
                    changes[key] = str(resolve_input_folder(value, input_dir, f"{where} {key}"))
                else:
                    changes[key] = str(resolve_input_file(value, input_dir, f"{where} metadata_file"))
            subsets.append(replace(subset, **changes))
        out.append(replace(config, subsets=tuple(subsets)))
    return out


def preview_config(datasets: tuple[DatasetConfig, ...]) -> TrainConfig:
    """A TrainConfig around the datasets alone, for the core's pre-flight report (no model is looked at)."""
    return TrainConfig.recommended(pretrained_model_name_or_path=PLACEHOLDER, clip_l=PLACEHOLDER,
                                   t5xxl=PLACEHOLDER, ae=PLACEHOLDER, datasets=tuple(datasets))


def report_lines(report) -> list[str]:
    """The core's pre-flight report for the dataset nodes: its step line counts the train node's defaults, so it
    is replaced by the batches per epoch (the train node sets steps or epochs)."""
    lines = report.lines()
    steps_line = f"{report.batches_per_epoch} batches per epoch"
    return [f"{report.batches_per_epoch} batches per epoch (all chained datasets); steps or epochs are set on the "
            "train node" if ln.startswith(steps_line) else ln for ln in lines]


def dataset_folders(datasets: tuple[DatasetConfig, ...]) -> list[str]:
    """The image and mask folders the datasets read."""
    return [f for d in datasets for s in d.subsets for f in (s.image_dir, s.conditioning_data_dir) if f]


# ------------------------------------------------------------------------------------------ network

def network_fields(*, network_dim: int, network_alpha: float, block_preset: str = "custom",
                   train_double_block_indices: str = "all", train_single_block_indices: str = "all",
                   train_blocks: str = "all", split_qkv: bool = False, in_dims: str = "",
                   type_dims: Mapping[str, int] | None = None, train_clip_l: bool = False,
                   train_t5xxl: bool = False, clip_l_lr: float = 0.0, t5xxl_lr: float = 0.0,
                   loraplus_lr_ratio: float = 0.0, loraplus_unet_lr_ratio: float = 0.0,
                   loraplus_text_encoder_lr_ratio: float = 0.0, network_dropout: float = 0.0,
                   rank_dropout: float = 0.0, module_dropout: float = 0.0, network_args: str = "",
                   network_weights: str | None = None, dim_from_weights: bool = False) -> NetworkChoice:
    """The network node -> its LoRAConfig, the LoRA it continues from and the text encoders' learning rates.

    Sentinels: a per-type rank of -1 is the main rank (the core's None), 0 is no LoRA there; a ratio, dropout or
    learning rate of 0 is "not set" (None; for the text-encoder rates: the learning rate).
    `in_dims` ("4,0,0,0,4") and `network_args` (key=value lines: network_reg_dims ...) are read by the core's
    own --network_args parser, so they take the CLI's syntax and give its messages."""
    if block_preset not in BLOCK_PRESETS:
        raise ConfigError(f"block_preset: expected one of {', '.join(BLOCK_PRESETS)}, not {block_preset!r}")
    if BLOCK_PRESETS[block_preset] is not None:
        train_double_block_indices, train_single_block_indices = BLOCK_PRESETS[block_preset]
    typed: dict[str, Any] = {
        "train_double_block_indices": _blocks(train_double_block_indices),
        "train_single_block_indices": _blocks(train_single_block_indices),
        "train_blocks": train_blocks, "split_qkv": bool(split_qkv), "train_t5xxl": bool(train_t5xxl),
        "network_train_unet_only": not (train_clip_l or train_t5xxl),
        "loraplus_lr_ratio": _none_if(loraplus_lr_ratio, 0, 0.0),
        "loraplus_unet_lr_ratio": _none_if(loraplus_unet_lr_ratio, 0, 0.0),
        "loraplus_text_encoder_lr_ratio": _none_if(loraplus_text_encoder_lr_ratio, 0, 0.0),
        "rank_dropout": _none_if(rank_dropout, 0, 0.0), "module_dropout": _none_if(module_dropout, 0, 0.0),
    }
    for name, value in (type_dims or {}).items():
        typed[name] = None if value is None or value < 0 else int(value)
    args = option_lines(network_args)
    if (in_dims or "").strip():
        args.append(f"in_dims={in_dims.strip()}")
    network = LoRAConfig.from_network_args(args, network_dim=int(network_dim), network_alpha=float(network_alpha),
                                           network_dropout=_none_if(network_dropout, 0, 0.0), **typed)
    te_lr = None
    if train_clip_l or train_t5xxl:
        te_lr = ((_none_if(clip_l_lr, 0, 0.0) if train_clip_l else 0.0), _none_if(t5xxl_lr, 0, 0.0))
    return NetworkChoice(network, network_weights or None, bool(dim_from_weights), te_lr)


def _blocks(text: str) -> str | None:
    text = (text or "").strip()
    return None if text.lower() == "all" else text


# ------------------------------------------------------------------------------------------ optimizer

def optimizer_fields(*, optimizer_type: str, learning_rate: float, lr_scheduler: str, lr_warmup_steps: float = 0,
                     lr_scheduler_num_cycles: int = 1, lr_scheduler_power: float = 1.0,
                     lr_scheduler_min_lr_ratio: float = 0.0, max_grad_norm: float = 1.0,
                     gradient_accumulation_steps: int = 1,
                     optimizer_args: str = "") -> tuple[OptimizerConfig, list[str]]:
    """The optimizer node -> (its OptimizerConfig, notes). Warmup below 1 is a fraction of the steps, from 1 a step
    count (sd-scripts). `optimizer_args`: key=value, one per line or separated by spaces; empty with Adafactor
    means the guide's recipe (ADAFACTOR_RECOMMENDED_ARGS)."""
    name = canonical_optimizer(optimizer_type)
    check_named_only(name, "", "optimizer node")
    args = tuple(token for line in option_lines(optimizer_args) for token in split_line(line, "optimizer_args"))
    notes = []
    if name == "Adafactor" and not args:
        args = tuple(ADAFACTOR_RECOMMENDED_ARGS)
        notes.append(f"Adafactor with the guide's arguments: {' '.join(args)}")
    warmup = float(lr_warmup_steps)
    section = replace(recommended().optimizer, optimizer_type=name, learning_rate=float(learning_rate),
                      optimizer_args=args, lr_scheduler=lr_scheduler,
                      lr_warmup_steps=warmup if warmup < 1 else int(warmup),
                      lr_scheduler_num_cycles=int(lr_scheduler_num_cycles),
                      lr_scheduler_power=float(lr_scheduler_power),
                      lr_scheduler_min_lr_ratio=_none_if(lr_scheduler_min_lr_ratio, 0, 0.0),
                      max_grad_norm=float(max_grad_norm), gradient_accumulation_steps=int(gradient_accumulation_steps))
    return section, notes


# ------------------------------------------------------------------------------------------ memory

def memory_fields(*, mode: str = "manual", gradient_checkpointing: bool, blocks_to_swap: int = 0,
                  cpu_offload_checkpointing: bool = False, fp8_base: bool = False, latent_cache: str = "memory",
                  text_cache: str = "memory", cache_beside_images: bool = False) -> MemoryChoice:
    """The memory node -> its sections, or `auto` (the train node plans after it has unloaded ComfyUI's models,
    and the other widgets are unused)."""
    if mode not in MEMORY_MODES:
        raise ConfigError(f"memory mode: expected one of {', '.join(MEMORY_MODES)}, not {mode!r}")
    for option, value in (("latent_cache", latent_cache), ("text_cache", text_cache)):
        if value not in CACHE_MODES:
            raise ConfigError(f"{option}: expected one of {', '.join(CACHE_MODES)}, not {value!r}")
    if mode == "auto":
        return MemoryChoice(auto=True, cache_beside_images=bool(cache_beside_images))
    rec = recommended()
    memory = replace(rec.memory, gradient_checkpointing=bool(gradient_checkpointing),
                     blocks_to_swap=_none_if(int(blocks_to_swap), 0),
                     cpu_offload_checkpointing=bool(cpu_offload_checkpointing), fp8_base=bool(fp8_base))
    caching = replace(rec.caching, cache_latents=latent_cache != "off", cache_latents_to_disk=latent_cache == "disk",
                      cache_text_encoder_outputs=text_cache != "off",
                      cache_text_encoder_outputs_to_disk=text_cache == "disk")
    return MemoryChoice(False, memory, caching, bool(cache_beside_images))


# ------------------------------------------------------------------------------------------ train

# options the nodes set: never taken from the train node's extra options (files and folders stay inside ComfyUI's,
# the network comes from its node); every dataset option is refused as well (the datasets are typed)
NODE_OWNED = {
    **dict.fromkeys(("pretrained_model_name_or_path", "clip_l", "t5xxl", "ae", "clip_l_tokenizer", "t5xxl_tokenizer",
                     "model_type"), "the models node (from ComfyUI's model folders and the transformer file)"),
    **dict.fromkeys(("network_dim", "network_alpha", "network_dropout", "network_train_unet_only", "network_args",
                     "network_module", "network_weights", "dim_from_weights"), "the network node"),
    **dict.fromkeys(("output_dir", "output_name", "logging_dir", "cache_dir", "resume", "sample_prompts", "device"),
                    "the train node (its widgets and ComfyUI's folders)"),
}
FLOW_WIDGETS = ("timestep_sampling", "discrete_flow_shift", "sigmoid_scale", "model_prediction_type",
                "guidance_scale", "loss_type")


def parse_extra_options(text: str) -> Source:
    """The train node's `extra_options`: any other sd-scripts option in command-line syntax, read by the core."""
    return extra_options_source(text, refused=NODE_OWNED, typed_datasets=True)


@dataclass(frozen=True)
class RunPlan:
    config: TrainConfig
    notes: tuple[str, ...]
    memory: MemoryPlan | None


def train_config(*, models: ModelFiles, datasets: tuple, network: NetworkChoice | None = None,
                 optimizer: OptimizerConfig | None = None, memory: MemoryChoice | None = None, flow: Mapping,
                 max_train_steps: int, max_train_epochs: int = 0, seed: int = -1, save_every_n_steps: int = 0,
                 save_state: bool = False, sample_prompts: str = "", sample_every_n_steps: int = 0,
                 apply_t5_attn_mask: bool = False, t5xxl_max_token_length: int = 0, extra_options: str = "",
                 output_dir: str | os.PathLike, output_name: str, cache_dir: str | os.PathLike | None,
                 resume: str | os.PathLike | None = None, device: str | None = None,
                 free_memory: float | None = None, device_type: str = "cuda", free_host: float | None = None,
                 transformer: TransformerSize | None = None) -> RunPlan:
    """The nodes' pieces, in order (memory, models, optimizer, network, datasets, the train node's widgets, its
    extra options), resolved by the core over the recommended values (`combine`); with the memory node's auto, the
    plan for `free_memory` fills what none of them set."""
    if not datasets:
        raise ConfigError("datasets: connect a dataset node (or the TOML node) to the train node")
    pieces = piece_sources(models=models, network=network, optimizer=optimizer, memory=memory)
    prompts = tuple(option_lines(sample_prompts))
    widgets = _train_widgets(flow, max_train_steps=int(max_train_steps), max_train_epochs=int(max_train_epochs),
                             seed=int(seed), save_every_n_steps=int(save_every_n_steps), save_state=bool(save_state),
                             sample_every_n_steps=int(sample_every_n_steps), apply_t5_attn_mask=apply_t5_attn_mask,
                             t5xxl_max_token_length=int(t5xxl_max_token_length))
    folders = {"output_dir": str(output_dir), "output_name": output_name, "device": device,
               "cache_dir": None if (memory and memory.cache_beside_images) or cache_dir is None else str(cache_dir),
               "resume": None if resume is None else str(resume),
               "sample_prompt_lines": prompts or None}
    widgets.update({k: v for k, v in folders.items() if v is not None})
    sources = [*pieces, Source("the dataset nodes", {"datasets": tuple(datasets)}), Source("the train node", widgets),
               parse_extra_options(extra_options)]
    measure = None
    if memory is not None and memory.auto:
        measure = _measured(Machine(free_memory, device_type, free_host, transformer or FLUX_DEV))
    resolved = combine(sources, defaults=RECOMMENDED, measure=measure)
    config = resolved.config
    check_named_only(config.optimizer.optimizer_type, config.optimizer.lr_scheduler_type, "train node")
    return RunPlan(config, (*resolved.notes, *config.advice()), resolved.memory)


def _measured(machine: Machine):
    """The train node measured the machine itself, after unloading ComfyUI's models."""
    if machine.free_bytes is None:
        raise ConfigError("memory auto: the free memory is unknown")
    return lambda draft: machine


def _train_widgets(flow: Mapping, **widgets) -> dict:
    """The train node's own widgets as options: sentinels (0, -1) are "not set", and a widget left at its default
    is no choice (so --model_type chroma may still set its own guidance and T5 mask)."""
    unknown = set(flow) - set(FLOW_WIDGETS)
    if unknown:
        raise TypeError(f"unknown flow widgets: {sorted(unknown)}")
    values = {**widgets, **flow}
    values["max_train_epochs"] = _none_if(values["max_train_epochs"], 0)
    values["seed"] = None if values["seed"] < 0 else values["seed"]
    for name in ("save_every_n_steps", "sample_every_n_steps", "t5xxl_max_token_length"):
        values[name] = _none_if(values[name], 0)
    values["apply_t5_attn_mask"] = bool(values["apply_t5_attn_mask"])
    rec = recommended()
    current = {**rec.flags(), **asdict(rec.flow)}
    return {name: value for name, value in values.items() if value != current[name]}
