"""nodes/reporter.py with fakes for ComfyUI's progress bar, websocket and interrupt flag; nodes/images.py."""

import math

import pytest
from packimport import PACK, REPO, pack  # noqa: F401
from PIL import Image

reporter_module = pack("nodes.reporter")
images = pack("nodes.images")
events = pack("trainer.events")


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
    assert comfy.sent[0] == (reporter_module.STATUS_EVENT, {"node": "7", "prompt_id": None,
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
