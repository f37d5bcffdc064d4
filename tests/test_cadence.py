"""The cadence as one pure function (trainer/cadence.py): what is due at each moment of a run, table-driven, and
the same decisions as the old loop's (tests/cadence_oracle.py) over a grid of settings, resumed runs among them."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
from cadence_oracle import new_run, old_run

from trainer.cadence import Cadence, Moment, Previews, ValidationSchedule, due, previews_due
from trainer.config.sections import PreviewConfig, SavingConfig, ValidationConfig

# ------------------------------------------------------------------------------------------ table-driven


def cadence(**options) -> Cadence:
    return Cadence(stem="lora", **options)


@pytest.mark.parametrize("moment,options,expected", [
    # every N steps: the LoRA (with its state under --save_state), the last step too
    (Moment.after_step(4, 2), dict(save_every_n_steps=2), ("lora-step00000004.safetensors", None)),
    (Moment.after_step(3, 2), dict(save_every_n_steps=2), None),
    (Moment.after_step(4, 2), dict(save_every_n_steps=4, save_state=True),
     ("lora-step00000004.safetensors", "lora-step00000004-state")),
    # every N epochs, never at the final epoch (the final save is that epoch's)
    (Moment.epoch_end(2, 8, final=False), dict(save_every_n_epochs=2), ("lora-000002.safetensors", None)),
    (Moment.epoch_end(2, 8, final=True), dict(save_every_n_epochs=2), None),
    (Moment.epoch_end(3, 12, final=False), dict(save_every_n_epochs=2), None),
    # the end: always the LoRA; the state with --save_state, --save_state_on_train_end or a stop
    (Moment.end(9, 3, stopped=False, last_sampled=None), {}, ("lora.safetensors", None)),
    (Moment.end(9, 3, stopped=True, last_sampled=None), {}, ("lora.safetensors", "lora-state")),
    (Moment.end(9, 3, stopped=False, last_sampled=None), dict(save_state_on_train_end=True),
     ("lora.safetensors", "lora-state")),
    (Moment.start(0), dict(save_every_n_steps=1, save_state=True), None),
])
def test_which_save_is_due(moment, options, expected):
    save = due(cadence(**options), moment).save
    assert (None if save is None else (save.lora, save.state)) == expected


@pytest.mark.parametrize("moment,options,expected", [
    (Moment.start(0), dict(sample_at_first=True), Previews(0)),
    (Moment.start(5), dict(sample_at_first=True), None),  # resumed: the first previews were rendered before
    (Moment.after_step(6, 2), dict(sample_every_n_steps=3), Previews(6)),
    (Moment.after_step(6, 2), dict(sample_every_n_steps=3, sample_every_n_epochs=1), None),  # epochs win
    (Moment.epoch_end(2, 8, final=True), dict(sample_every_n_epochs=2), Previews(8, 2)),
    (Moment.epoch_end(2, 8, final=False), dict(sample_every_n_steps=1), None),
    (Moment.end(8, 2, stopped=False, last_sampled=4), dict(sample_at_end=True), Previews(8)),
    (Moment.end(8, 2, stopped=False, last_sampled=8), dict(sample_at_end=True), None),  # rendered at 8 already
    (Moment.end(8, 2, stopped=True, last_sampled=4), dict(sample_at_end=True), None),
    (Moment.end(8, 2, stopped=False, last_sampled=None), {}, None),
])
def test_which_previews_are_due(moment, options, expected):
    assert due(cadence(**options), moment).previews == expected


@pytest.mark.parametrize("moment,schedule,expected", [
    (Moment.after_step(4, 1), ValidationSchedule(every_n_steps=2), True),
    (Moment.after_step(3, 1), ValidationSchedule(every_n_steps=2), False),
    (Moment.after_step(4, 1), ValidationSchedule(), False),
    (Moment.epoch_end(3, 9, final=False), ValidationSchedule(), True),  # every epoch by default
    (Moment.epoch_end(3, 9, final=True), ValidationSchedule(every_n_epochs=2), False),
    (Moment.epoch_end(4, 12, final=True), ValidationSchedule(every_n_epochs=2), True),
    (Moment.epoch_end(4, 12, final=True), None, False),  # nothing held out
])
def test_when_validation_is_due(moment, schedule, expected):
    assert due(cadence(validation=schedule), moment).validation is expected


def test_rotation_retires_only_what_this_training_wrote():
    written = ["lora-step00000002.safetensors", "lora-step00000002-state", "lora-000001.safetensors",
               "lora-step00000004.safetensors", "other-step00000001.safetensors"]
    save = due(cadence(save_every_n_steps=2, save_last_n_steps=2, save_state=True), Moment.after_step(6, 1),
               written).save
    assert save.retired == ("lora-step00000002.safetensors",) and save.retired_states == ("lora-step00000002-state",)
    save = due(cadence(save_every_n_epochs=1, save_last_n_epochs=1, save_state=True, save_last_n_epochs_state=2),
               Moment.epoch_end(2, 8, final=False), written).save
    assert save.retired == ("lora-000001.safetensors",) and save.retired_states == ()  # its state keeps 2


def test_save_n_epoch_ratio_becomes_the_epoch_cadence():
    ratio = Cadence.of(SavingConfig(save_n_epoch_ratio=3, save_every_n_epochs=5), PreviewConfig(),
                       ValidationConfig(), epochs=10)
    assert ratio.save_every_n_epochs == 3
    assert Cadence.of(SavingConfig(save_n_epoch_ratio=30), PreviewConfig(), ValidationConfig(),
                      epochs=10).save_every_n_epochs == 1


def test_previews_due_reads_the_previews_section():
    config = SimpleNamespace(previews=PreviewConfig(sample_every_n_steps=2))
    assert previews_due(config, step=4) and not previews_due(config, step=3) and not previews_due(config, epoch=2)


def test_an_unknown_moment_is_an_error():
    with pytest.raises(ValueError, match="moment kind 'later'"):
        due(cadence(), Moment("later", 1))


# ------------------------------------------------------------------------------------------ the oracle, over a grid


def _grid():
    saves = [dict(save_every_n_steps=3, save_last_n_steps=4),
             dict(save_every_n_steps=2, save_last_n_steps=2, save_state=True, save_last_n_steps_state=4),
             dict(save_every_n_steps=2, save_state=True, save_last_n_steps=1, save_last_n_steps_state=3),
             dict(save_every_n_epochs=1, save_last_n_epochs=2),
             dict(save_every_n_epochs=2, save_state=True, save_last_n_epochs=1, save_last_n_epochs_state=2),
             dict(save_n_epoch_ratio=2, save_every_n_epochs=1, save_last_n_epochs=1, save_state=True),
             dict(save_every_n_steps=5, save_every_n_epochs=1, save_state_on_train_end=True), {}]
    previews = [{}, dict(sample_every_n_steps=2, sample_at_end=True),
                dict(sample_every_n_epochs=2, sample_at_first=True),
                dict(sample_every_n_steps=4, sample_every_n_epochs=1, sample_at_end=True, sample_at_first=True)]
    validations = [(False, {}), (True, {}), (True, dict(validate_every_n_steps=3, validate_every_n_epochs=2))]
    # steps per epoch, total, epochs, stop after, start (a resumed state's step, epoch, steps done in that epoch)
    runs = [(3, 10, 4, None, (0, 0, 0)), (4, 12, 3, None, (0, 0, 0)), (2, 7, 4, 5, (0, 0, 0)), (3, 9, 3, 6, (0, 0, 0)),
            (3, 14, 5, None, (6, 2, 0)), (3, 14, 5, None, (6, 1, 3)), (3, 11, 4, 9, (5, 1, 2)),
            (4, 8, 2, None, (8, 2, 0))]
    for save, preview, (validating, validation), run in itertools.product(saves, previews, validations, runs):
        yield dict(stem="lora", **save, **preview, **validation), validating, run


def test_due_decides_as_the_old_loop_did_over_a_grid():
    checked = 0
    for options, validating, (per_epoch, total, epochs, stop_after, start) in _grid():
        # a resumed run adopts the names the run before it wrote (the old run to `start`, through the oracle)
        before = old_run(options, per_epoch, start[0], epochs, validating)[1].written if start[0] else []
        resumed = dict(start=start, written=before, losses=bool(start[0]))
        old, writer = old_run(options, per_epoch, total, epochs, validating, stop_after, **resumed)
        new, written = new_run(options, per_epoch, total, epochs, validating, stop_after, **resumed)
        assert new == old, options
        assert written == writer.written, options
        checked += 1
    assert checked == 8 * 4 * 3 * 8
