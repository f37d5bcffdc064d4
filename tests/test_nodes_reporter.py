"""nodes/reporter.py with fakes for ComfyUI's progress bar, websocket and interrupt flag; nodes/images.py."""

import math
import typing

import pytest
from packimport import PACK, REPO, pack  # noqa: F401
from PIL import Image

reporter_module = pack("nodes.reporter")
images = pack("nodes.images")
events = pack("trainer.events")
schema = pack("trainer.event_schema")
memory_plan = pack("trainer.config.memory_plan")


class Interrupted(Exception):
    pass


class FakeComfy:
    """ComfyUI's side: a progress bar whose hook raises (and clears the flag) when Cancel was pressed, like
    main.py's hook; the websocket; the interrupt flag."""

    def __init__(self):
        self.flag = False
        self.updates, self.sent, self.bars = [], [], []

    def bar(self, total):
        self.bars.append(total)
        return self

    def update_absolute(self, value, total=None, preview=None):
        if self.flag:
            self.flag = False
            raise Interrupted()
        self.updates.append((value, total, preview))

    def reporter(self):
        return reporter_module.ComfyReporter("7", progress_bar=self.bar, send=lambda e, d: self.sent.append((e, d)),
                                             interrupted=lambda: self.flag, interrupt=self.set_flag,
                                             interrupt_error=Interrupted)

    def set_flag(self):
        self.flag = True


def step(n, total=10, seconds=None):
    return events.StepEnd(step=n, total_steps=total, epoch=1, loss=0.5 / n, average_loss=0.4, lr=1e-4,
                          seconds=seconds if seconds is not None else 2.0 * n)


def test_steps_move_the_progress_bar_and_send_the_loss_event_with_node_and_eta():
    comfy = FakeComfy()
    r = comfy.reporter()
    r.emit(events.Phase("caching latents", 2, 8))
    r.emit(step(1))
    r.emit(step(2))
    assert comfy.updates == [(2, 8, None), (1, 10, None), (2, 10, None)]
    name, data = comfy.sent[-1]
    assert name == reporter_module.STEP_EVENT
    assert data == {"node": "7", "prompt_id": None, "step": 2, "total": 10, "loss": 0.25, "average_loss": 0.4,
                    "lr": 1e-4, "eta_seconds": pytest.approx(16.0), "epoch": 1}
    assert comfy.sent[0] == ("flux_lora_trainer.phase", {"node": "7", "prompt_id": None,
                                                         "phase": "caching latents", "done": 2, "total": 8})
    assert not r.should_stop()


def test_eta_counts_from_the_first_step_of_a_resumed_run():
    r = FakeComfy().reporter()
    assert r.eta(step(41, total=50, seconds=3.0)) == pytest.approx(27.0)
    assert r.eta(step(42, total=50, seconds=6.0)) == pytest.approx(24.0)


def test_samples_become_the_progress_preview_and_messages_go_to_the_log(tmp_path):
    comfy = FakeComfy()
    r = comfy.reporter()
    r.emit(step(3))
    picture = Image.new("RGBA", (32, 16), (255, 0, 0, 255))
    r.emit(events.Samples(3, (tmp_path / "a.png",), (picture,)))
    value, total, preview = comfy.updates[-1]
    assert (value, total, preview[0], preview[1].mode, preview[2]) == (3, 10, "JPEG", "RGB", 512)
    assert r.previews == [picture]
    r.emit(events.Message("careful", "warning"))
    r.emit(events.Saved(tmp_path / "x.safetensors", "lora", 3))
    assert r.log[0] == "warning: careful" and "saved lora at step 3" in r.log[1]


def test_cancel_is_a_stop_request_and_never_escapes_into_the_core():
    comfy = FakeComfy()
    r = comfy.reporter()
    r.emit(step(1))
    comfy.flag = True  # Cancel pressed: the progress hook would raise
    assert r.should_stop()
    r.emit(step(2))  # no update, no exception, the flag stays for the train node
    assert comfy.updates == [(1, 10, None)] and comfy.flag


def test_cancel_between_the_check_and_the_update_is_caught_and_the_flag_put_back():
    comfy = FakeComfy()
    r = comfy.reporter()
    checks = iter([False, True])
    r._interrupted = lambda: next(checks, True)
    comfy.flag = True
    r.emit(step(1))  # the check said no, the hook raised
    assert r.cancelled and r.should_stop() and comfy.flag


def test_loss_curve_draws_any_series():
    for losses in ([], [0.3], [0.2] * 5, [0.5, float("nan"), 0.4], [1.0 / (i + 1) for i in range(500)]):
        picture = images.loss_curve(losses)
        assert picture.size == (768, 384) and picture.mode == "RGB"
    assert images.moving_average([1, 2, 3, 4], window=2) == [1, 1.5, 2.5, 3.5]
    assert len(images.same_size([Image.new("RGB", (8, 8)), Image.new("L", (4, 6))])) == 2
    assert all(im.size == (8, 8) and im.mode == "RGB"
               for im in images.same_size([Image.new("RGB", (8, 8)), Image.new("L", (4, 6))]))
    assert not math.isnan(images.moving_average([0.1, 0.2])[-1])


def test_validation_reaches_the_websocket_with_its_step():
    comfy = FakeComfy()
    r = comfy.reporter()
    r.emit(step(4))
    r.emit(events.ValidationEnd(step=4, epoch=1, average_loss=0.31, per_epoch=False, divergence=-0.09))
    assert comfy.sent[-1] == ("flux_lora_trainer.validation", {"node": "7", "prompt_id": None, "step": 4, "epoch": 1,
                                                              "loss": 0.31, "per_epoch": False})
    assert comfy.updates == [(4, 10, None)]  # no progress of its own


def test_the_memory_plan_is_sent_as_data():
    plan = memory_plan.plan_memory(11.5 * 2**30, "cuda")
    comfy = FakeComfy()
    comfy.reporter().emit(events.MemoryPlanned.of(plan))
    name, data = comfy.sent[-1]
    assert name == "flux_lora_trainer.memory_plan"
    assert data == {"node": "7", "prompt_id": None, "free_gib": pytest.approx(11.5), "guide_row": plan.row,
                    "estimate_gib": plan.estimate_gib, "settings": plan.fields, "lines": list(plan.lines)}
    assert data["settings"]["fp8_base"] is True and data["settings"]["blocks_to_swap"] > 0
    assert data["lines"][0].startswith("auto: 11.5 GiB free")


def sample_events(tmp_path) -> dict:
    """One of each core event."""
    plan = memory_plan.plan_memory(30 * 2**30, "cuda")
    return {events.Message: events.Message("hello"), events.Phase: events.Phase("loading", 1, 2),
            events.StepEnd: step(1), events.EpochEnd: events.EpochEnd(1, 5, 0.3),
            events.ValidationEnd: events.ValidationEnd(5, 1, 0.3),
            events.Samples: events.Samples(5, (tmp_path / "a.png",)),
            events.Saved: events.Saved(tmp_path / "l.safetensors", "lora", 5),
            events.Finished: events.Finished(tmp_path / "l.safetensors", 5, False),
            events.MemoryPlanned: events.MemoryPlanned.of(plan)}


def test_every_core_event_is_sent_through_the_schema_or_named_as_not_sent(tmp_path):
    samples = sample_events(tmp_path)
    assert set(samples) == set(typing.get_args(events.Event)), "a new core event: add it here and to the reporter"
    sent_types = {}
    for kind, event in samples.items():
        comfy = FakeComfy()
        comfy.reporter().emit(event)
        if kind in reporter_module.NOT_SENT:
            assert comfy.sent == [], kind
            continue
        assert len(comfy.sent) == 1, kind
        name, data = comfy.sent[0]
        message_type = name.removeprefix(schema.PREFIX)
        assert (name, data) == schema.payload(message_type, **data), kind  # exactly the schema's fields and types
        sent_types[kind.__name__] = message_type
    assert set(sent_types.values()) == set(schema.MESSAGES)  # and every message type has its core event
    assert reporter_module.NOT_SENT == (events.EpochEnd,)


def test_a_diverged_step_is_sent_with_a_null_loss():
    comfy = FakeComfy()
    comfy.reporter().emit(events.StepEnd(step=1, total_steps=2, epoch=1, loss=math.nan, average_loss=math.nan,
                                         lr=1e-4, seconds=1.0))
    assert comfy.sent[-1][1]["loss"] is None and comfy.sent[-1][1]["average_loss"] is None
