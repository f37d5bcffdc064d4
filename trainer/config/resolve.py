"""Where the datasets come from: a dataset TOML (or JSON), DreamBooth-style folders, a fine-tune metadata file, or
typed values, resolved in one place.

sd-scripts' lookup order is kept: subset > dataset > [general] > command line > default. The "command line" layer is
every dataset and subset option of `TrainConfig` (resolution, batch size, buckets, caption handling, augmentation,
validation split ...), as sd-scripts' BlueprintGenerator falls back on its argparse namespace
(library/config_util.py); `--dataset_repeats` is that layer's `num_repeats`. `--train_data_dir` (with
`--reg_data_dir`) and `--train_data_dir` + `--in_json` are turned into the same kind of document as a dataset file
(train_network.py does the same), so one code path reads all of them. Typed datasets (what the ComfyUI nodes build)
are taken as they are.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import ConfigError
from .data import DatasetConfig, datasets_from_dict, load_dataset_config
from .train import TrainConfig

log = logging.getLogger(__name__)

# TrainConfig fields that are dataset or subset options under the same name (the command-line fallback layer)
FALLBACK_OPTIONS = (
    "caption_extension", "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps",
    "bucket_no_upscale", "prior_loss_weight", "shuffle_caption", "caption_separator", "keep_tokens",
    "keep_tokens_separator", "secondary_separator", "enable_wildcard", "caption_prefix", "caption_suffix", "color_aug",
    "flip_aug", "random_crop", "resize_interpolation", "token_warmup_min", "token_warmup_step", "alpha_mask",
    "caption_dropout_rate", "caption_dropout_every_n_epochs", "caption_tag_dropout_rate", "cache_info",
    "validation_split", "validation_seed",
)

# every TrainConfig field that feeds the datasets: the fallback layer, and where the images come from. Typed datasets
# (the nodes') carry their own values for all of them, so a front end building typed datasets must not take these.
DATASET_LAYER_OPTIONS = (*FALLBACK_OPTIONS, "dataset_repeats", "face_crop_aug_range", "resolution", "train_batch_size",
                         "train_data_dir", "reg_data_dir", "in_json", "dataset_config", "datasets", "masked_loss")


def face_crop_range(text: str | None) -> tuple[float, float] | None:
    """`--face_crop_aug_range "MIN,MAX"` as sd-scripts' prepare_dataset_args reads it: two numbers, MIN <= MAX."""
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in str(text).split(","))
    except ValueError:
        values = ()
    if len(values) != 2 or values[0] > values[1]:
        raise ConfigError(f"face_crop_aug_range: expected MIN,MAX (two numbers, MIN <= MAX), not {text!r}")
    return values


def command_line_dataset_options(config: TrainConfig) -> dict:
    """The command-line layer of the lookup; None means "not given" (the next layer down decides)."""
    data = config.data
    options = {name: getattr(data, name) for name in FALLBACK_OPTIONS}
    options.update(resolution=data.resolution, batch_size=data.train_batch_size, num_repeats=data.dataset_repeats,
                   face_crop_aug_range=face_crop_range(data.face_crop_aug_range))
    return {k: v for k, v in options.items() if v is not None}


def resolve_datasets(config: TrainConfig) -> list[DatasetConfig]:
    """The datasets `config` trains on, with every value settled. Batch sizes are per process."""
    datasets = _datasets(config)
    masks = any(s.conditioning_data_dir or s.alpha_mask for d in datasets for s in d.subsets)
    if config.data.masked_loss and not masks:
        log.warning("--masked_loss: no subset has mask images (conditioning_data_dir in the dataset config) or "
                    "alpha_mask, so the loss is not masked")
    return datasets


def _datasets(config: TrainConfig) -> list[DatasetConfig]:
    if config.data.datasets:
        return list(config.data.datasets)
    command_line = command_line_dataset_options(config)
    if config.data.dataset_config:
        ignored = [f"--{name}" for name in ("train_data_dir", "reg_data_dir", "in_json") if getattr(config.data, name)]
        if ignored:
            log.warning("ignoring %s: the dataset config %s says where the images are", ", ".join(ignored),
                        config.data.dataset_config)
        return load_dataset_config(config.data.dataset_config, command_line, masked_loss=config.data.masked_loss)
    return [_folder_dataset(config, command_line)]


def _folder_dataset(config: TrainConfig, command_line: dict) -> DatasetConfig:
    """--train_data_dir in sd-scripts' DreamBooth convention (subfolders `<repeats>_<class tokens>`, and the same
    under --reg_data_dir as regularisation subsets), or with --in_json one fine-tune style subset."""
    root = Path(config.data.train_data_dir)
    if config.data.resolution is None:
        raise ConfigError("--train_data_dir needs --resolution")
    if not root.is_dir():
        raise ConfigError(f"train_data_dir: {root} is not a folder")
    if config.data.in_json:
        if config.data.reg_data_dir:
            log.warning("ignoring --reg_data_dir: --in_json trains fine-tune style, without regularisation images")
        subsets = [{"image_dir": str(root), "metadata_file": str(config.data.in_json)}]
    else:
        subsets = _dreambooth_subsets(root, is_reg=False)
        if not subsets:  # ours: a plain folder of images is one subset (sd-scripts finds no images there)
            subsets = [{"image_dir": str(root)}]
        if config.data.reg_data_dir:
            reg_root = Path(config.data.reg_data_dir)
            if not reg_root.is_dir():
                raise ConfigError(f"reg_data_dir: {reg_root} is not a folder")
            reg = _dreambooth_subsets(reg_root, is_reg=True)
            if not reg:
                log.warning("reg_data_dir %s: no subfolders named <repeats>_<class tokens>; no regularisation images",
                            reg_root)
            subsets += reg
    (dataset,) = datasets_from_dict({"datasets": [{"subsets": subsets}]}, command_line,
                                    source=f"--train_data_dir {root}")
    return dataset


def _dreambooth_subsets(root: Path, is_reg: bool) -> list[dict]:
    """Subfolders `<repeats>_<class tokens>` of `root` (sd-scripts' generate_dreambooth_subsets_config_by_subdirs):
    folders without a leading number, or with fewer than 1 repeat, are skipped."""
    option = "reg_data_dir" if is_reg else "train_data_dir"
    subsets = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        repeats, _, tokens = folder.name.partition("_")
        if not repeats.isdigit() or int(repeats) < 1:
            log.warning("%s: skipping %s (not named <repeats>_<class tokens> with repeats >= 1)", option, folder)
            continue
        subset = {"image_dir": str(folder), "num_repeats": int(repeats), "is_reg": is_reg}
        if tokens:
            subset["class_tokens"] = tokens
        subsets.append(subset)
    return subsets
