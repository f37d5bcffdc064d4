"""How the core reports to its front ends (CLI, ComfyUI nodes) and asks whether to stop."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol, Union


@dataclass(frozen=True)
class Message:
    text: str
    level: str = "info"  # info | warning


@dataclass(frozen=True)
class Phase:
    """A stage before or after training (loading, caching ...), with progress when it has any."""
    name: str
    done: int = 0
    total: int = 0


class GroupLR(NamedTuple):
    """One optimizer group's learning rate after a step: `name` as `LoRANetwork.param_groups` names the group
    ("lora_unet", "lora_te1 plus", "lora_unet reg_lr_0" ...), `lr` the scheduler's last lr for it, `d` the group's
    "d" (D-Adaptation, Prodigy), else None."""
    name: str
    lr: float
    d: float | None = None


@dataclass(frozen=True)
class StepEnd:
    step: int
    total_steps: int
    epoch: int
    loss: float
    average_loss: float
    lr: float
    seconds: float  # since training began
    groups: tuple[GroupLR, ...] = ()  # every optimizer group's lr (the trackers' lr/... tags); () = `lr` alone
    # --scale_weight_norms: keys scaled, mean and maximum key norm (the trackers' max_norm/... and norm/... tags)
    keys_scaled: int | None = None
    mean_norm: float | None = None
    max_norm: float | None = None


@dataclass(frozen=True)
class EpochEnd:
    """After an epoch (1-based `epoch`; also the last, partial one): the average loss of the last epoch's steps."""
    epoch: int
    step: int
    average_loss: float


@dataclass(frozen=True)
class ValidationEnd:
    """A validation pass after optimizer step `step` (per_epoch False) or at the end of epoch `epoch` (True):
    `average_loss` over the held-out batches; `divergence` = validation minus training average (None: the metrics
    log takes the last StepEnd's average_loss)."""
    step: int
    epoch: int
    average_loss: float
    per_epoch: bool = False
    divergence: float | None = None


@dataclass(frozen=True)
class Samples:
    step: int
    paths: tuple[Path, ...]
    images: tuple = field(default=(), compare=False)  # PIL images, for previews in a UI
    prompts: tuple[str, ...] = ()  # each image's prompt (the wandb caption), when known
    indices: tuple[int, ...] = ()  # each image's prompt number in the file (0-based; wandb's sample_{i})


@dataclass(frozen=True)
class Saved:
    path: Path
    kind: str  # "lora" | "state"
    step: int


@dataclass(frozen=True)
class Finished:
    """The end of a run, and what `train()` returns: the saved LoRA file (None on processes other than the main
    one), the LoRA as a kohya-format state dict in the save precision (main process only), the optimizer steps done,
    whether a stop request ended it early, and the loss of each step."""
    lora: Path | None
    steps: int
    stopped_early: bool
    losses: tuple[float, ...] = ()
    state_dict: dict | None = field(default=None, compare=False, repr=False)
    metadata: dict | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class MemoryPlanned:
    """What memory `auto` picked (trainer/config/memory_plan.py MemoryPlan), as data for a UI: the free memory it
    planned for, the guide's table row, the estimated peak, the settings it sets and the explanation's lines."""
    free_gib: float
    guide_row: int | None
    estimate_gib: float | None
    settings: dict = field(hash=False)
    lines: tuple[str, ...] = ()

    @classmethod
    def of(cls, plan) -> "MemoryPlanned":
        return cls(plan.free_gib, plan.row, plan.estimate_gib, dict(plan.fields), tuple(plan.lines))


Event = Union[Message, Phase, StepEnd, EpochEnd, ValidationEnd, Samples, Saved, Finished, MemoryPlanned]


class Reporter(Protocol):
    def emit(self, event: Event) -> None: ...

    def should_stop(self) -> bool: ...


class SilentReporter:
    """Collects events; never asks to stop (tests, library use)."""

    def __init__(self) -> None:
        self.events: list = []
        self.stop_requested = False

    def emit(self, event: Event) -> None:
        self.events.append(event)

    def should_stop(self) -> bool:
        return self.stop_requested

    def of(self, kind) -> list:
        return [e for e in self.events if isinstance(e, kind)]
