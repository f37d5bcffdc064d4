"""What every node file shares: the category, our socket types, ComfyUI's folders, and how a core error becomes
the message ComfyUI shows on the node. Imports ComfyUI's API (and folder_paths, which is torch-free), never torch."""

from __future__ import annotations

import contextlib
from importlib.util import find_spec
from pathlib import Path

from comfy_api.latest import io

from ..trainer.errors import TrainerError
from .translate import FROM_CHECKPOINT, NONE

CATEGORY = "FLUX LoRA Trainer"
PREFIX = "FluxLoraTrainer"

# our sockets: frozen, already checked Python values, made by one node and read by the next (nothing in them is
# loaded); the types are in nodes/pieces.py and the core's config sections
Models = io.Custom("FLUX_TRAIN_MODELS")  # pieces.ModelFiles: a ModelsConfig and the precisions asked for
Datasets = io.Custom("FLUX_TRAIN_DATASETS")  # tuple of trainer.config.DatasetConfig
Network = io.Custom("FLUX_TRAIN_NETWORK")  # pieces.NetworkChoice: a LoRAConfig, the LoRA to continue from ...
Optimizer = io.Custom("FLUX_TRAIN_OPTIMIZER")  # trainer.config.sections.OptimizerConfig
Memory = io.Custom("FLUX_TRAIN_MEMORY")  # pieces.MemoryChoice: auto, or a MemoryConfig and a CachingConfig
Checkpoints = io.Custom("FLUX_TRAIN_CHECKPOINTS")  # tuple of nodes.checkpoint_list.Checkpoint, oldest first


@contextlib.contextmanager
def node_errors():
    """A TrainerError (bad input) becomes a plain ValueError carrying only the core's message, which ComfyUI shows
    on the node; anything else is a bug and keeps its traceback."""
    try:
        yield
    except TrainerError as e:
        raise ValueError(str(e)) from None


def files(folder: str, *extra: str) -> list[str]:
    """ComfyUI's file list for `folder` (diffusion_models, text_encoders, vae, checkpoints, loras), `extra`
    choices after the files."""
    import folder_paths

    return [*folder_paths.get_filename_list(folder), *extra]


def model_choices(folder: str) -> list[str]:
    return files(folder, FROM_CHECKPOINT)


def optional_file_choices(folder: str) -> list[str]:
    import folder_paths

    return [NONE, *folder_paths.get_filename_list(folder)]


def first(options: list[str], preferred: tuple[str, ...] = ()) -> str:
    """The default of a file combo: the first file whose name contains one of `preferred` (e.g. "t5"), else the
    first entry."""
    for word in preferred:
        for option in options:
            if word in option.lower() and option not in (NONE, FROM_CHECKPOINT):
                return option
    return options[0] if options else NONE


def comfy_package_dir() -> Path:
    """Where ComfyUI's `comfy` package lives (its tokenizer folders are in it), found without importing it."""
    spec = find_spec("comfy")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("ComfyUI's comfy package was not found: the pack runs inside ComfyUI")
    return Path(list(spec.submodule_search_locations)[0])


def input_dir() -> str:
    import folder_paths

    return folder_paths.get_input_directory()


def output_dir() -> str:
    import folder_paths

    return folder_paths.get_output_directory()
