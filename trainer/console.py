"""The command line's voice: a tqdm progress bar with loss and ETA, messages, saves and previews, the Ctrl-C stop, and
sd-scripts' --console_log_* options for the library's log lines."""

from __future__ import annotations

import argparse
import logging
import signal

from .events import Finished, Message, Phase, Samples, Saved, StepEnd, ValidationEnd

# the CLI's exit status for a run that finished with most of its steps skipped (--skip_nonfinite_steps): a LoRA was
# saved, but it learned from few steps; 2 is bad input, 130 a stop before training
MOSTLY_SKIPPED_EXIT = 3


def skipped_steps(finished: Finished) -> int:
    """Optimizer steps of the training (resumed ones included) skipped for a non-finite loss or gradients: every
    step that was applied has its loss in `losses`."""
    return max(0, finished.steps - len(finished.losses))


def mostly_skipped(finished: Finished) -> bool:
    return skipped_steps(finished) * 2 > finished.steps


def finished_text(finished: Finished) -> str:
    state = "stopped early" if finished.stopped_early else "finished"
    text = f"training {state} after {finished.steps} steps; LoRA: {finished.lora}"
    skipped = skipped_steps(finished)
    if skipped:
        text += (f"\n{skipped} of {finished.steps} steps were skipped (non-finite loss or gradients, "
                 f"--skip_nonfinite_steps): the LoRA learned from {finished.steps - skipped} step(s)")
        if mostly_skipped(finished):
            text += "; most steps were skipped, so this run counts as failed (exit status 3)"
    return text


class ConsoleReporter:
    """tqdm progress with loss and ETA; first Ctrl-C (or SIGTERM) stops after the current step and saves."""

    def __init__(self, quiet: bool = False):
        self.stop = False
        self.bar = None
        self.quiet = quiet
        self.interrupts = 0
        self.training = False  # a step has ended: a stop from now on saves the LoRA and a state

    def install_signals(self) -> None:
        def handler(signum, frame):
            self.interrupts += 1
            if self.interrupts > 1:
                raise KeyboardInterrupt
            self.stop = True
            self._write(self.stop_text())

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)

    def stop_text(self) -> str:
        """What the first Ctrl-C will do: before the first step nothing is trained, so nothing is saved."""
        if not self.training:
            return ("stopping: no step has been trained yet, so no LoRA or training state will be saved (caches "
                    "written so far are kept for the next run)")
        return ("stopping after this step; the LoRA and the training state will be saved (press Ctrl-C again to "
                "abort without saving)")

    def should_stop(self) -> bool:
        return self.stop

    def end_progress(self) -> None:
        """End the progress bar's line, so that a message after it starts a line of its own."""
        if self.bar:
            self.bar.close()
        self.bar = None

    def _write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def emit(self, event) -> None:
        if self.quiet:
            return
        if isinstance(event, Message):
            self._write(("WARNING: " if event.level == "warning" else "") + event.text)
        elif isinstance(event, Phase) and not event.total:
            self._write(f"{event.name} ...")
        elif isinstance(event, StepEnd):
            self.training = True
            if self.bar is None:
                try:
                    from tqdm import tqdm
                except ImportError:
                    tqdm = None
                self.bar = tqdm(total=event.total_steps, desc="steps", initial=event.step - 1) if tqdm else False
            if self.bar:
                self.bar.update(1)
                norms = {} if event.keys_scaled is None else {"keys_scaled": event.keys_scaled,
                                                               "avg_norm": f"{event.mean_norm:.3g}"}
                self.bar.set_postfix(loss=f"{event.average_loss:.4f}", lr=f"{event.lr:.2e}", epoch=event.epoch,
                                     **norms)
            elif event.step % 10 == 0:
                print(f"step {event.step}/{event.total_steps} loss {event.average_loss:.4f}", flush=True)
        elif isinstance(event, ValidationEnd):
            self._write(validation_text(event))
        elif isinstance(event, Saved):
            self._write(f"saved {event.kind}: {event.path}")
        elif isinstance(event, Samples):
            self._write(f"samples: {', '.join(str(p) for p in event.paths)}")
        elif isinstance(event, Finished):
            if self.bar:
                self.bar.close()
            self.bar = None
            self._write(finished_text(event))


def validation_text(event: ValidationEnd) -> str:
    where = f"epoch {event.epoch}" if event.per_epoch else f"step {event.step}"
    divergence = "" if event.divergence is None else f" (validation - training: {event.divergence:+.4f})"
    return f"validation loss at {where}: {event.average_loss:.4f}{divergence}"


def configure_logging(ns: argparse.Namespace) -> None:
    """sd-scripts' --console_log_level / --console_log_file / --console_log_simple, for the library's log lines."""
    level = getattr(logging, getattr(ns, "console_log_level", None) or "WARNING")
    simple = getattr(ns, "console_log_simple", False)
    layout = "%(message)s" if simple else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if getattr(ns, "console_log_file", None):
        handlers.append(logging.FileHandler(ns.console_log_file, encoding="utf-8"))
    logging.basicConfig(level=level, format=layout, handlers=handlers, force=True)
