"""The metrics log (`<name>_metrics.jsonl`, and TensorBoard with --log_with tensorboard) as a Reporter beside the
front end's: it listens to step events and writes one line per optimizer step."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .atomic import SaveError, atomic_path, failure_reason, remove_stale_temporaries, save_error, write_bytes
from .events import Event, Finished, Message, StepEnd


class MetricsLog:
    def __init__(self, folder: Path, name: str, log_with: str | None, warn) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{name}_metrics.jsonl"
        remove_stale_temporaries(self.path)  # left by a process killed while it rewrote the log
        self.file = open(self.path, "a", encoding="utf-8")
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
            whole = os.fstat(self.file.fileno()).st_size  # the log ends with a whole line here
            try:
                self.file.write(json.dumps(values) + "\n")
                self.file.flush()
            except OSError as e:
                raise self._write_failed(e, event.step, whole) from e
            if self.tensorboard:
                for key in ("loss", "average_loss", "lr"):
                    self.tensorboard.add_scalar(key, values[key], event.step)
        elif isinstance(event, Finished):
            self.close()

    def _write_failed(self, error: OSError, step: int, whole: int) -> SaveError:
        """Close the log dropping what could not be written, cut a half-written line, and say so (a full disk)."""
        try:
            self.file.close()
        except OSError:
            pass  # the rest of the buffer could not be written either: dropped
        try:
            os.truncate(self.path, whole)
        except OSError:
            pass
        return save_error(self.path, error, text=f"{self.path}: the metrics line of step {step} could not be written "
                                                 f"({failure_reason(error)}); the lines before it are intact")

    def truncate_after(self, step: int) -> int:
        """Drop the lines of steps after `step` (a resumed run trains them again) and any damaged line (a kill
        while writing); returns how many lines were dropped. The file is replaced in one rename."""
        self.file.flush()
        kept, dropped = [], 0
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    values = json.loads(line)
                    keep = line.endswith("\n") and isinstance(values, dict) and int(values["step"]) <= step
                except (ValueError, KeyError, TypeError):
                    keep = False
                if keep:
                    kept.append(line)
                else:
                    dropped += 1
        if dropped:
            self.file.close()
            try:
                with atomic_path(self.path) as tmp:
                    write_bytes(tmp, "".join(kept).encode("utf-8"))
            finally:
                self.file = open(self.path, "a", encoding="utf-8")
        return dropped

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
