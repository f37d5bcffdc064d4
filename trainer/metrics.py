"""The metrics log (`<name>_metrics.jsonl`, and TensorBoard with --log_with tensorboard) as a Reporter beside the
front end's: it listens to step events and writes one line per optimizer step."""

from __future__ import annotations

import json
from pathlib import Path

from .events import Event, Finished, Message, StepEnd


class MetricsLog:
    def __init__(self, folder: Path, name: str, log_with: str | None, warn) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.file = open(folder / f"{name}_metrics.jsonl", "a", encoding="utf-8")
        self.tensorboard = None
        if log_with in ("tensorboard", "all"):
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(str(folder / "tensorboard"))
            except ImportError:
                warn(Message("log_with tensorboard: tensorboard is not installed; metrics go to the jsonl file only",
                             "warning"))

    def emit(self, event: Event) -> None:
        if isinstance(event, StepEnd):
            values = {"step": event.step, "epoch": event.epoch, "loss": event.loss,
                      "average_loss": event.average_loss, "lr": event.lr}
            self.file.write(json.dumps(values) + "\n")
            self.file.flush()
            if self.tensorboard:
                for key in ("loss", "average_loss", "lr"):
                    self.tensorboard.add_scalar(key, values[key], event.step)
        elif isinstance(event, Finished):
            self.close()

    def should_stop(self) -> bool:
        return False

    def close(self) -> None:
        if not self.file.closed:
            self.file.close()
        if self.tensorboard:
            self.tensorboard.close()
            self.tensorboard = None


class Fanout:
    """Events to several reporters; the first (the front end's) decides when to stop."""

    def __init__(self, front_end, *others) -> None:
        self.front_end = front_end
        self.others = [o for o in others if o is not None]

    def emit(self, event: Event) -> None:
        for other in self.others:
            other.emit(event)
        self.front_end.emit(event)

    def should_stop(self) -> bool:
        return self.front_end.should_stop()
