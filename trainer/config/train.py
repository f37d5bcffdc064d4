"""Every training option, typed and validated at construction; errors name the option.

Field names are sd-scripts' option names and the defaults are its defaults (the CLI keeps them); the ComfyUI nodes
start from `TrainConfig.recommended()`, which differs only where the README says why.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from ..errors import ConfigError
from .finite import check_dataclass_finite
from .flow import FlowConfig
from .lora import LoRAConfig
from .model_type import CHROMA_GUIDANCE_SCALE
from .optim import canonical_optimizer
from .sections import (
    CachingConfig,
    DataConfig,
    DistributedConfig,
    LoggingConfig,
    MemoryConfig,
    ModelsConfig,
    OptimizerConfig,
    PreviewConfig,
    RunConfig,
    SavingConfig,
    ValidationConfig,
)

SECTIONS = {"models": ModelsConfig, "memory": MemoryConfig, "caching": CachingConfig, "data": DataConfig,
            "optimizer": OptimizerConfig, "run": RunConfig, "validation": ValidationConfig, "saving": SavingConfig,
            "previews": PreviewConfig, "logging": LoggingConfig, "distributed": DistributedConfig}
# the one table from a flat flag (sd-scripts' option name) to the section that holds it; `network` and `flow` are
# sections of their own (LoRAConfig, FlowConfig) with their own flags
FLAG_SECTIONS: dict[str, str] = {f.name: section for section, cls in SECTIONS.items() for f in fields(cls)}


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    models: ModelsConfig
    data: DataConfig
    network: LoRAConfig = field(default_factory=LoRAConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    caching: CachingConfig = field(default_factory=CachingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    run: RunConfig = field(default_factory=RunConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    saving: SavingConfig = field(default_factory=SavingConfig)
    previews: PreviewConfig = field(default_factory=PreviewConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def __post_init__(self):
        """What no single section can check alone."""
        for name, cls in {**SECTIONS, "network": LoRAConfig, "flow": FlowConfig}.items():
            if not isinstance(getattr(self, name), cls):
                raise ConfigError(f"{name}: expected a {cls.__name__}, not {type(getattr(self, name)).__name__}")
        check_dataclass_finite(self.flow)
        if self.models.base_weights and self.memory.fp8:
            raise ConfigError("base_weights are merged into the transformer's weights, which fp8_base keeps in fp8: "
                              "merge them into a bf16 model first, or train without fp8_base")
        if self.network.train_t5xxl and self.caching.cache_text_encoder_outputs:
            raise ConfigError("train_t5xxl trains T5 itself, so its outputs cannot be cached: drop "
                              "--cache_text_encoder_outputs or train_t5xxl")
        if self.network.train_t5xxl and self.network.network_train_unet_only:
            raise ConfigError("train_t5xxl and network_train_unet_only contradict each other")

    @classmethod
    def from_flags(cls, *, network: LoRAConfig | None = None, flow: FlowConfig | None = None,
                   **flags) -> "TrainConfig":
        """A config from flat options under their sd-scripts names (what the CLI and extra options speak), placed
        into their sections by FLAG_SECTIONS."""
        grouped: dict[str, dict] = {name: {} for name in SECTIONS}
        for flag, value in flags.items():
            if flag not in FLAG_SECTIONS:
                raise ConfigError(f"{flag}: not a training option")
            grouped[FLAG_SECTIONS[flag]][flag] = value
        sections = {name: SECTIONS[name](**values) for name, values in grouped.items()}
        return cls(network=network or LoRAConfig(), flow=flow or FlowConfig(), **sections)

    def flags(self) -> dict:
        """Every flat option and its value (the inverse of from_flags, without network and flow)."""
        return {f.name: getattr(getattr(self, section), f.name) for section, cls in SECTIONS.items()
                for f in fields(cls)}

    def with_flags(self, **changes) -> "TrainConfig":
        """A copy with some flat options (or `network=`/`flow=`) changed, checked again as a whole."""
        return TrainConfig.from_flags(**{"network": self.network, "flow": self.flow, **self.flags(), **changes})

    def advice(self) -> list[str]:
        """Values that are legal but unwise, said the same way by every front end."""
        notes = []
        if self.models.model_type == "chroma":
            if self.flow.guidance_scale != CHROMA_GUIDANCE_SCALE:
                notes.append(f"guidance_scale {self.flow.guidance_scale} is used as given; Chroma is trained with "
                             "0.0 (sd-scripts' guide)")
        elif self.flow.guidance_scale != 1.0:
            notes.append(f"guidance_scale {self.flow.guidance_scale}: 1.0 is recommended for training FLUX.1-dev "
                         "(dev takes the guidance as an input; schnell ignores it)")
        optimizer = canonical_optimizer(self.optimizer.optimizer_type)
        if self.memory.full_fp16 and optimizer in ("AdamW", "Adafactor"):
            notes.append(f"full_fp16 with {optimizer}: its moments are then fp16 tensors, in which eps (1e-8) is 0, "
                         "so the first step can divide 0 by 0; AdamW8bit (sd-scripts' usual pairing with full_fp16; "
                         "its state is not fp16) or mixed_precision bf16 avoid it")
        if self.memory.mixed_precision == "fp16":
            notes.append("mixed_precision fp16: FLUX.1 was trained in bf16 and its activations can overflow fp16; "
                         "bf16 is recommended where the GPU has it")
        return notes

    @classmethod
    def recommended(cls, **overrides) -> "TrainConfig":
        """What the ComfyUI nodes start from (RECOMMENDED, below); the model files and data come in `overrides`."""
        return cls.from_flags(**{**RECOMMENDED, **overrides})


# Where the nodes' defaults differ from sd-scripts' (the CLI's): guidance 1.0, raw prediction, flux_shift sampling,
# AdamW at 1e-4, bf16, gradient checkpointing, rank 16, caches in memory, previews of the finished LoRA. Readable
# without any model file.
RECOMMENDED: dict = dict(
    flow=FlowConfig(guidance_scale=1.0, model_prediction_type="raw", timestep_sampling="flux_shift"),
    network=LoRAConfig(network_dim=16, network_alpha=16, network_train_unet_only=True),
    learning_rate=1e-4, mixed_precision="bf16", gradient_checkpointing=True, save_precision="bf16",
    cache_latents=True, cache_text_encoder_outputs=True, max_train_steps=1000, sample_at_end=True)


