"""A real tiny run emits exactly the events (steps, epoch ends, validations, previews, saves with their file names)
and leaves exactly the files the old loop's decisions give (tests/cadence_oracle.py, checked against runs recorded
from the old code): the loop on one screen changed nothing a run does."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from cadence_oracle import PREVIEWS, SAVING, VALIDATION, old_run

from trainer.events import EpochEnd, Finished, Samples, Saved, SilentReporter, StepEnd, ValidationEnd
from trainer.loop import train

from trainspace import config, make_workspace

# ------------------------------------------------------------------------------------------ a real run


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("ws"), batch_size=4)  # 8 images: 2 steps per epoch


class StopAfter(SilentReporter):
    def __init__(self, step):
        super().__init__()
        self.step = step

    def should_stop(self):
        return self.step is not None and any(isinstance(e, StepEnd) and e.step >= self.step for e in self.events)


def event_rows(events) -> list:
    rows = []
    for e in events:
        if isinstance(e, StepEnd):
            rows.append(("step", e.step, e.epoch))
        elif isinstance(e, EpochEnd):
            rows.append(("epoch", e.epoch, e.step))
        elif isinstance(e, ValidationEnd):
            rows.append(("validation", e.step, e.epoch, e.per_epoch))
        elif isinstance(e, Samples):
            tags = {re.match(r"test_lora_(e?\d{6})_\d\d_\d{14}_\d+\.png$", Path(p).name).group(1) for p in e.paths}
            assert len(tags) == 1
            rows.append(("samples", e.step, tags.pop()))
        elif isinstance(e, Saved):
            rows.append(("saved", e.kind, Path(e.path).name, e.step))
        elif isinstance(e, Finished):
            rows.append(("finished", Path(e.lora).name, e.steps, e.stopped_early))
    return rows


RUNS = {
    # 6 images trained (2 held out), 2 steps per epoch; 9 steps: the fifth epoch is cut by the last step
    "steps": (dict(max_train_steps=9, validation_split=0.25, save_every_n_steps=3, save_last_n_steps=3,
                   save_state=True, save_last_n_steps_state=5, sample_every_n_steps=4, validate_every_n_steps=2,
                   validate_every_n_epochs=2, sample_at_first=True, sample_at_end=True),
              dict(per_epoch=2, total=9, epochs=5, validating=True, stop_after=None)),
    # epochs of 2 steps; --save_n_epoch_ratio 3 of 6 epochs saves every 2; stopped at the end of epoch 5
    "epochs": (dict(max_train_epochs=6, save_n_epoch_ratio=3, save_last_n_epochs=1, save_state=True,
                    save_last_n_epochs_state=2, sample_every_n_epochs=2, sample_every_n_steps=1, sample_at_end=True),
               dict(per_epoch=2, total=12, epochs=6, validating=False, stop_after=10)),
}


@pytest.mark.parametrize("name", list(RUNS))
def test_a_run_emits_the_events_the_old_loop_did(ws, tokenizer_dirs, tmp_path, name):
    options, shape = RUNS[name]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --w 32 --h 32 --s 1\n")
    out = tmp_path / "out"
    reporter = StopAfter(shape["stop_after"])
    train(config(ws, tokenizer_dirs, out, sample_prompts=str(prompts), **options), reporter)
    oracle = {k: v for k, v in options.items() if k in SAVING | PREVIEWS | VALIDATION}
    expected, writer = old_run(dict(stem="test_lora", **oracle), shape["per_epoch"], shape["total"],
                               shape["epochs"], shape["validating"], shape["stop_after"])
    assert event_rows(reporter.events) == [row for row in expected if row[0] != "removed"]
    on_disk = {p.name for p in out.iterdir() if p.name.startswith("test_lora") and p.suffix != ".jsonl"}
    assert on_disk == writer.files
