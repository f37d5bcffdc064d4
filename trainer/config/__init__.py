"""Every option of the trainer, its default, its choices and its checks, in one torch-free package.

The CLI builds its parser from these dataclasses and the ComfyUI nodes read their widget choices and defaults from
them, so a default is written once.
"""

from ..errors import ConfigError, DatasetConfigError, LoRAConfigError, TrainerError
from .data import DatasetConfig, SubsetConfig, datasets_from_dict, load_dataset_config, single_folder_dataset
from .flow import HUBER_SCHEDULES, LOSS_TYPES, PREDICTION_TYPES, TIMESTEP_SAMPLINGS, WEIGHTING_SCHEMES, FlowConfig
from .lora import IN_DIM_TARGETS, TRAIN_BLOCKS, TYPE_DIM_OPTIONS, LoRAConfig, parse_block_selection
from .optim import ADAFACTOR_RECOMMENDED_ARGS, OPTIMIZERS, SCHEDULERS, canonical_optimizer, parse_optimizer_args
from .resolve import resolve_datasets
from .sections import LOG_WITH, MIXED_PRECISION, SAVE_PRECISION
from .train import FLAG_SECTIONS, RECOMMENDED, SECTIONS, TrainConfig

__all__ = ["TrainerError", "ConfigError", "DatasetConfigError", "LoRAConfigError", "DatasetConfig", "SubsetConfig",
           "datasets_from_dict", "load_dataset_config", "single_folder_dataset", "FlowConfig", "TIMESTEP_SAMPLINGS",
           "PREDICTION_TYPES", "WEIGHTING_SCHEMES", "LOSS_TYPES", "HUBER_SCHEDULES", "LoRAConfig", "TYPE_DIM_OPTIONS",
           "IN_DIM_TARGETS", "TRAIN_BLOCKS", "parse_block_selection", "OPTIMIZERS", "SCHEDULERS",
           "ADAFACTOR_RECOMMENDED_ARGS", "canonical_optimizer", "parse_optimizer_args", "resolve_datasets",
           "TrainConfig", "FLAG_SECTIONS", "SECTIONS", "RECOMMENDED", "MIXED_PRECISION", "SAVE_PRECISION", "LOG_WITH"]
