"""The core's events -> ComfyUI: the node's progress bar (with the newest preview image), websocket messages for the
web extension's loss chart, status line and memory node (each built and checked by trainer/event_schema.py, which
js/event_schema.js mirrors), and ComfyUI's Cancel as the core's stop request.

ComfyUI's progress hook raises InterruptProcessingException (and clears the flag) when Cancel was pressed; raised
inside the core, that would skip the LoRA and state the core saves on a stop. So the reporter never lets it
through: it skips progress updates once Cancel is seen, catches the exception if Cancel lands in between, and puts
the flag back so the train node ends the prompt as interrupted after `train()` returns.
"""

from __future__ import annotations

from typing import Any, Callable

from ..trainer.event_schema import event_name, payload
from ..trainer.events import EpochEnd, Finished, MemoryPlanned, Message, Phase, Samples, Saved, StepEnd, ValidationEnd

STEP_EVENT = event_name("step")
STATUS_EVENT = event_name("status")
PREVIEW_SIZE = 512
NOT_SENT = (EpochEnd,)  # the chart draws steps; an epoch's average is the metrics log's


class ComfyReporter:
    """The core's Reporter for one train node. Every ComfyUI call is injected, so tests run it with fakes;
    `for_node(node_id)` wires ComfyUI's own."""

    def __init__(self, node_id: str | None, *, progress_bar: Callable[[int], Any], send: Callable[[str, dict], None],
                 interrupted: Callable[[], bool], interrupt: Callable[[], None],
                 interrupt_error: type[BaseException] | tuple = (), prompt_id: str | None = None):
        self.node_id = node_id
        self.prompt_id = prompt_id
        self._new_bar = progress_bar
        self._bar = None
        self._send = send
        self._interrupted = interrupted
        self._interrupt = interrupt
        self._interrupt_error = interrupt_error
        self.cancelled = False
        self.value, self.total = 0, 1
        self.first_step: tuple[int, float] | None = None  # (step, seconds) of the first step of this run
        self.last_step: StepEnd | None = None
        self.previews: list = []  # PIL images of the newest Samples
        self.log: list[str] = []  # messages, warnings and saves, for the node's status text

    @classmethod
    def for_node(cls, node_id: str | None) -> "ComfyReporter":
        import comfy.model_management as mm
        import comfy.utils
        from comfy_execution.utils import get_executing_context
        from server import PromptServer

        def send(event: str, data: dict) -> None:
            server = PromptServer.instance
            server.send_sync(event, data, server.client_id)

        context = get_executing_context()
        return cls(node_id, progress_bar=lambda total: comfy.utils.ProgressBar(total, node_id=node_id), send=send,
                   interrupted=mm.processing_interrupted, interrupt=lambda: mm.interrupt_current_processing(True),
                   interrupt_error=mm.InterruptProcessingException,
                   prompt_id=context.prompt_id if context is not None else None)

    # ------------------------------------------------------------------------------------------ Reporter

    def should_stop(self) -> bool:
        if not self.cancelled and self._interrupted():
            self.cancelled = True
        return self.cancelled

    def emit(self, event) -> None:
        if isinstance(event, StepEnd):
            self._step(event)
            return
        message = self.message_of(event)
        if message is not None:
            self._send(*payload(message[0], node=self.node_id, prompt_id=self.prompt_id, **message[1]))
        if isinstance(event, Phase) and event.total > 0:
            self._progress(event.done, event.total)
        elif isinstance(event, Samples):
            self.previews = list(event.images)
            if self.previews:
                self._progress(self.value, self.total, ("JPEG", self.previews[0].convert("RGB"), PREVIEW_SIZE))
        elif isinstance(event, Message):
            self.log.append(event.text if event.level == "info" else f"{event.level}: {event.text}")
        elif isinstance(event, Saved):
            self.log.append(f"saved {event.kind} at step {event.step}: {event.path}")

    @staticmethod
    def message_of(event) -> tuple[str, dict] | None:
        """(websocket message type, its fields) of a core event other than StepEnd; None for NOT_SENT."""
        if isinstance(event, Phase):
            return "phase", {"phase": event.name, "done": event.done, "total": event.total}
        if isinstance(event, ValidationEnd):
            return "validation", {"step": event.step, "epoch": event.epoch, "loss": event.average_loss,
                                  "per_epoch": event.per_epoch}
        if isinstance(event, Samples):
            return "previews", {"step": event.step, "paths": [str(p) for p in event.paths]}
        if isinstance(event, Message):
            return "status", {"text": event.text, "level": event.level}
        if isinstance(event, Saved):
            return "saved", {"path": str(event.path), "kind": event.kind, "step": event.step}
        if isinstance(event, Finished):
            return "finished", {"steps": event.steps, "stopped_early": event.stopped_early}
        if isinstance(event, MemoryPlanned):
            return "memory_plan", {"free_gib": event.free_gib, "guide_row": event.guide_row,
                                   "estimate_gib": event.estimate_gib, "settings": event.settings,
                                   "lines": list(event.lines)}
        return None

    # ------------------------------------------------------------------------------------------ helpers

    def eta(self, event: StepEnd) -> float | None:
        """Seconds left, from the pace of the steps this run has made (a resumed run starts counting anew)."""
        if self.first_step is None:
            self.first_step = (event.step - 1, 0.0)
        start_step, start_seconds = self.first_step
        done = event.step - start_step
        if done <= 0:
            return None
        return (event.seconds - start_seconds) / done * max(event.total_steps - event.step, 0)

    def _step(self, event: StepEnd) -> None:
        self.last_step = event
        eta = self.eta(event)
        self._progress(event.step, event.total_steps)
        self._send(*payload("step", node=self.node_id, prompt_id=self.prompt_id, step=event.step,
                            total=event.total_steps, epoch=event.epoch, loss=event.loss,
                            average_loss=event.average_loss, lr=event.lr, eta_seconds=eta))

    def _progress(self, value: int, total: int, preview=None) -> None:
        self.value, self.total = value, max(int(total), 1)
        if self.should_stop():
            return  # the hook would raise and clear the flag; the core stops at its next check
        if self._bar is None:
            self._bar = self._new_bar(self.total)
        try:
            self._bar.update_absolute(value, self.total, preview)
        except self._interrupt_error:
            self.cancelled = True
            self._interrupt()  # the hook cleared the flag: set it again for after train() returns
