"""Where the datasets come from: a dataset TOML, a DreamBooth-style folder, or typed values, resolved in one place.

sd-scripts' lookup order is kept for the TOML: subset > dataset > [general] > command line > default; the
"command line" layer is the dataset options of `TrainConfig` (resolution, batch size, buckets ...). Typed datasets
(what the ComfyUI nodes build) are taken as they are.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import ConfigError
from .data import DatasetConfig, SubsetConfig, load_dataset_config
from .train import TrainConfig

log = logging.getLogger(__name__)


def command_line_dataset_options(config: TrainConfig) -> dict:
    return {"resolution": config.resolution, "batch_size": config.train_batch_size,
            "caption_extension": config.caption_extension, "enable_bucket": config.enable_bucket,
            "min_bucket_reso": config.min_bucket_reso, "max_bucket_reso": config.max_bucket_reso,
            "bucket_reso_steps": config.bucket_reso_steps, "bucket_no_upscale": config.bucket_no_upscale,
            "prior_loss_weight": config.prior_loss_weight}


def resolve_datasets(config: TrainConfig) -> list[DatasetConfig]:
    """The datasets `config` trains on, with every value settled. Batch sizes are per process."""
    if config.datasets:
        return list(config.datasets)
    command_line = command_line_dataset_options(config)
    if config.dataset_config:
        return load_dataset_config(config.dataset_config, command_line)
    return [_folder_dataset(config, command_line)]


def _folder_dataset(config: TrainConfig, command_line: dict) -> DatasetConfig:
    """--train_data_dir in sd-scripts' DreamBooth convention: subfolders named `<repeats>_<class tokens>`."""
    root = Path(config.train_data_dir)
    if config.resolution is None:
        raise ConfigError("--train_data_dir needs --resolution")
    if not root.is_dir():
        raise ConfigError(f"train_data_dir: {root} is not a folder")
    subsets = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        repeats, _, tokens = folder.name.partition("_")
        if not repeats.isdigit():
            log.warning("train_data_dir: skipping %s (not named <repeats>_<class tokens>)", folder)
            continue
        subsets.append(SubsetConfig(image_dir=str(folder), num_repeats=int(repeats), class_tokens=tokens or None,
                                    caption_extension=config.caption_extension))
    if not subsets:
        subsets = [SubsetConfig(image_dir=str(root), caption_extension=config.caption_extension)]
    fields = {k: v for k, v in command_line.items() if k != "caption_extension" and v is not None}
    fields["resolution"] = tuple(config.resolution)
    return DatasetConfig(subsets=tuple(subsets), **fields)
