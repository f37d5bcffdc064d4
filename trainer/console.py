"""The command line's voice: a tqdm progress bar with loss and ETA, messages, saves and previews, the Ctrl-C stop, and
sd-scripts' --console_log_* options for the library's log lines."""

from __future__ import annotations

import argparse
import logging
import signal

from .events import Finished, Message, Phase, Samples, Saved, StepEnd


class ConsoleReporter:
    """tqdm progress with loss and ETA; first Ctrl-C (or SIGTERM) stops after the current step and saves."""

    def __init__(self, quiet: bool = False):
        self.stop = False
        self.bar = None
        self.quiet = quiet
        self.interrupts = 0

    def install_signals(self) -> None:
        def handler(signum, frame):
            self.interrupts += 1
            if self.interrupts > 1:
                raise KeyboardInterrupt
            self.stop = True
            self._write("stopping after this step; the LoRA and the training state will be saved "
                        "(press Ctrl-C again to abort without saving)")

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)

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
        elif isinstance(event, Saved):
            self._write(f"saved {event.kind}: {event.path}")
        elif isinstance(event, Samples):
            self._write(f"samples: {', '.join(str(p) for p in event.paths)}")
        elif isinstance(event, Finished):
            if self.bar:
                self.bar.close()
            state = "stopped early" if event.stopped_early else "finished"
            self._write(f"training {state} after {event.steps} steps; LoRA: {event.lora}")


def configure_logging(ns: argparse.Namespace) -> None:
    """sd-scripts' --console_log_level / --console_log_file / --console_log_simple, for the library's log lines."""
    level = getattr(logging, getattr(ns, "console_log_level", None) or "WARNING")
    simple = getattr(ns, "console_log_simple", False)
    layout = "%(message)s" if simple else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if getattr(ns, "console_log_file", None):
        handlers.append(logging.FileHandler(ns.console_log_file, encoding="utf-8"))
    logging.basicConfig(level=level, format=layout, handlers=handlers, force=True)
