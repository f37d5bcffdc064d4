"""What each node hands the train node through its socket: one frozen, already checked value holding the core's
section (ModelsConfig, LoRAConfig, OptimizerConfig, MemoryConfig/CachingConfig) and what only that node knows.
Each says which options it sets as a `Source` for the core's `combine`, which the train node calls. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..trainer.config.combine import Source
from ..trainer.config.lora import LoRAConfig
from ..trainer.config.sections import CachingConfig, MemoryConfig, ModelsConfig, OptimizerConfig
from ..trainer.errors import ConfigError

MODELS_NODE_FIELDS = ("pretrained_model_name_or_path", "clip_l", "t5xxl", "ae", "model_type", "clip_l_tokenizer",
                      "t5xxl_tokenizer")
OPTIMIZER_NODE_FIELDS = ("optimizer_type", "learning_rate", "optimizer_args", "lr_scheduler", "lr_warmup_steps",
                         "lr_scheduler_num_cycles", "lr_scheduler_power", "lr_scheduler_min_lr_ratio", "max_grad_norm",
                         "gradient_accumulation_steps")
MEMORY_NODE_FIELDS = ("gradient_checkpointing", "blocks_to_swap", "cpu_offload_checkpointing")
CACHE_NODE_FIELDS = ("cache_latents", "cache_latents_to_disk", "cache_text_encoder_outputs",
                     "cache_text_encoder_outputs_to_disk")


def _picked(section, names: tuple[str, ...]) -> dict:
    return {name: getattr(section, name) for name in names}


@dataclass(frozen=True)
class ModelFiles:
    """The models node: the files (and the model type its transformer file shows), and the precisions it asks for.
    fp8 is asked for or not: "not" leaves it to the memory node or its plan (either turns it on)."""
    models: ModelsConfig
    fp8_base: bool = False
    t5xxl_fp8: bool = False

    def source(self) -> Source:
        flags = {name: value for name, value in _picked(self.models, MODELS_NODE_FIELDS).items() if value is not None}
        flags.update({name: True for name in ("fp8_base", "t5xxl_fp8") if getattr(self, name)})
        return Source("the models node", flags)


@dataclass(frozen=True)
class NetworkChoice:
    """The network node: the LoRA layout, the LoRA it continues from, and the text encoders' learning rates (None:
    the learning rate)."""
    network: LoRAConfig
    network_weights: str | None = None
    dim_from_weights: bool = False
    text_encoder_lr: tuple[float | None, ...] | None = None

    def source(self) -> Source:
        flags = {"network": self.network}
        if self.network_weights:
            flags.update(network_weights=str(self.network_weights), dim_from_weights=self.dim_from_weights)
        if self.text_encoder_lr is not None:
            flags["text_encoder_lr"] = self.text_encoder_lr
        return Source("the network node", flags)


def optimizer_source(optimizer: OptimizerConfig) -> Source:
    """The optimizer node's section: the options it has widgets for."""
    return Source("the optimizer node", _picked(optimizer, OPTIMIZER_NODE_FIELDS))


@dataclass(frozen=True)
class MemoryChoice:
    """The memory node: `auto` (the train node plans, the sections are None) or the sections its widgets set, and
    whether disk caches go beside the images (sd-scripts' place) instead of the trainer's cache folder."""
    auto: bool
    memory: MemoryConfig | None = None
    caching: CachingConfig | None = None
    cache_beside_images: bool = False

    def source(self) -> Source:
        if self.auto:
            return Source("the memory node", {})
        flags = {**_picked(self.memory, MEMORY_NODE_FIELDS), **_picked(self.caching, CACHE_NODE_FIELDS)}
        if self.memory.fp8_base:  # off means "not asked": the models node's base_precision may still ask
            flags["fp8_base"] = True
        return Source("the memory node", flags)


def for_transformer(files: ModelFiles, variant: str) -> ModelFiles:
    """The models node's output for the transformer its file holds: for Chroma, `model_type` chroma and no CLIP-L
    (the slot's file is neither checked nor passed on); a FLUX file's unchanged."""
    if variant != "chroma":
        return files
    return replace(files, models=replace(files.models, model_type="chroma", clip_l=None))


def piece_sources(*, models, network, optimizer, memory) -> list[Source]:
    """What the other nodes sent the train node, as sources in the order they apply: memory, models, optimizer,
    network. Anything but their own output (a forged workflow) is refused."""
    expected = (("models", models, ModelFiles), ("network", network, NetworkChoice),
                ("optimizer", optimizer, OptimizerConfig), ("memory", memory, MemoryChoice))
    for name, piece, cls in expected:
        if piece is not None and not isinstance(piece, cls):
            raise ConfigError(f"{name}: expected the {name} node's output ({cls.__name__}), not "
                              f"{type(piece).__name__}")
    if models is None:
        raise ConfigError("models: connect the models node to the train node")
    sources = [] if memory is None else [memory.source()]
    sources.append(models.source())
    if optimizer is not None:
        sources.append(optimizer_source(optimizer))
    if network is not None:
        sources.append(network.source())
    return sources
