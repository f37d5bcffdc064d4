"""How the core reports to its front ends (CLI, ComfyUI nodes) and asks whether to stop."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Union


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


@dataclass(frozen=True)
class StepEnd:
    step: int
    total_steps: int
    epoch: int
    loss: float
    average_loss: float
    lr: float
    seconds: float  # since training began


@dataclass(frozen=True)
class Samples:
    step: int
    paths: tuple[Path, ...]
    images: tuple = field(default=(), compare=False)  # PIL images, for previews in a UI


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


Event = Union[Message, Phase, StepEnd, Samples, Saved, Finished]


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
