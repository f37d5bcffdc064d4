"""The one error root front ends catch: a `TrainerError` is a problem with the user's input (an option, a file, a
dataset) and its message says what is wrong and what was expected. Any other exception is a bug and keeps its
traceback. Torch-free, so the option modules and the ComfyUI schemas can use it."""

from __future__ import annotations


class TrainerError(ValueError):
    """Bad input: the message names the option, file or key and what was expected."""


class ConfigError(TrainerError):
    """An option has a value it cannot take, or options conflict."""


class LoRAConfigError(TrainerError):
    """A LoRA option has a value it cannot take."""


class LoRAWeightsError(TrainerError):
    """A LoRA file does not fit the network (names, shapes)."""


class DatasetConfigError(TrainerError):
    """A dataset TOML or typed dataset has a wrong key, type or value."""


class DatasetError(TrainerError):
    """The images or captions of a dataset cannot be used."""


class CaptionError(TrainerError):
    """A caption file cannot be read."""


class ModelFileError(TrainerError):
    """A model file is missing, damaged or not what was asked for."""


class PromptFileError(TrainerError):
    """A preview prompt file cannot be read."""


class StateError(TrainerError):
    """A training state folder (for --resume) cannot be used."""


class Stopped(TrainerError):
    """The run was asked to stop before its first training step: nothing was trained or saved. Caches written so far
    are complete files and are reused by the next run."""


class NonFiniteError(TrainerError):
    """The loss or the gradients became NaN or infinite; nothing non-finite was saved."""


class SaveError(TrainerError, OSError):
    """A file could not be written; the previous file of that name is intact. Also an OSError, so code that guards
    a write with `except OSError` still catches it."""


class OutOfMemoryError(TrainerError):
    """The device ran out of memory. The message says in which phase and step, what was resident, peak and free
    memory, and the setting to change; the LoRA and a resumable state of the last good step are on disk (`lora`,
    `state`) when a step was trained, and the device memory was given back."""

    def __init__(self, message: str, *, phase: str = "", step: int = 0, lora=None, state=None, seed: int | None = None):
        super().__init__(message)
        self.phase, self.step, self.lora, self.state, self.seed = phase, step, lora, state, seed
