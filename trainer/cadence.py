"""What is due when: sd-scripts' cadence of saves, previews and validation as one pure function.

`due(cadence, moment, written)` answers for one moment of a run (its start, the end of an optimizer step, the end of
an epoch, the end of the run) what to do there: save the LoRA (which file, with a state folder or not, and which
earlier saves of this training fall out of --save_last_n_*), render the previews (named by step or by epoch),
measure the validation loss. `Cadence` is what the config asks, --save_n_epoch_ratio already turned into an epoch
cadence. The loop does what `Due` says in sd-scripts' order: after a step the save, previews, validation; at an
epoch's end the validation, then the save and previews; at the run's end the final save, then the previews.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .config.sections import PreviewConfig, SavingConfig, ValidationConfig
from .output_names import (
    LORA_SUFFIX,
    STATE_SUFFIX,
    epoch_lora_name,
    final_lora_name,
    state_name,
    step_lora_name,
    step_of,
)

# ------------------------------------------------------------------------------------------ the question


@dataclass(frozen=True)
class ValidationSchedule:
    """When sd-scripts validates (train_network.py): after optimizer step N when N % validate_every_n_steps == 0, and
    after each epoch (1-based number E) when validate_every_n_epochs is None or E % validate_every_n_epochs == 0."""
    every_n_steps: int | None = None
    every_n_epochs: int | None = None

    def at_step(self, global_step: int) -> bool:
        return _every(self.every_n_steps, global_step)

    def at_epoch_end(self, epoch_number: int) -> bool:
        return self.every_n_epochs is None or epoch_number % self.every_n_epochs == 0


@dataclass(frozen=True)
class Cadence:
    """What the config asks of the cadence, under sd-scripts' option names."""
    stem: str = "last"
    save_every_n_steps: int | None = None
    save_every_n_epochs: int | None = None  # --save_n_epoch_ratio included
    save_last_n_steps: int | None = None
    save_last_n_epochs: int | None = None
    save_last_n_steps_state: int | None = None
    save_last_n_epochs_state: int | None = None
    save_state: bool = False
    save_state_on_train_end: bool = False
    sample_every_n_steps: int | None = None
    sample_every_n_epochs: int | None = None
    sample_at_first: bool = False
    sample_at_end: bool = False
    validation: ValidationSchedule | None = None  # None: no images held out, nothing to validate

    @classmethod
    def of(cls, saving: SavingConfig, previews: PreviewConfig, validation: ValidationConfig, epochs: int,
           validating: bool = False) -> Cadence:
        """From the config's sections; `epochs` is the run's length (for --save_n_epoch_ratio), `validating`
        whether images are held out."""
        return cls(
            stem=saving.name, save_every_n_steps=saving.save_every_n_steps,
            save_every_n_epochs=epoch_save_cadence(saving, epochs), save_last_n_steps=saving.save_last_n_steps,
            save_last_n_epochs=saving.save_last_n_epochs, save_last_n_steps_state=saving.save_last_n_steps_state,
            save_last_n_epochs_state=saving.save_last_n_epochs_state, save_state=saving.save_state,
            save_state_on_train_end=saving.save_state_on_train_end,
            sample_every_n_steps=previews.sample_every_n_steps, sample_every_n_epochs=previews.sample_every_n_epochs,
            sample_at_first=previews.sample_at_first, sample_at_end=previews.sample_at_end,
            validation=ValidationSchedule(validation.validate_every_n_steps, validation.validate_every_n_epochs)
            if validating else None)


def epoch_save_cadence(saving: SavingConfig, epochs: int) -> int | None:
    """--save_n_epoch_ratio N: about N epoch saves over the run (sd-scripts: every floor(epochs / N), at least 1);
    else --save_every_n_epochs."""
    if saving.save_n_epoch_ratio:
        return max(1, epochs // saving.save_n_epoch_ratio)
    return saving.save_every_n_epochs


@dataclass(frozen=True)
class Moment:
    """A point of the run where something may be due. `kind`: "start" (before the first step), "step" (after
    optimizer step `step`, in epoch `epoch`, 1-based), "epoch" (epoch `epoch` ended at step `step`; `final`: the
    run's last epoch, whose save is the final one) or "end" (the run ended at step `step` after `epoch` epochs
    seen; `stopped`: by a stop request; `last_sampled`: the step the previews were last rendered at)."""
    kind: str
    step: int
    epoch: int = 0
    final: bool = False
    stopped: bool = False
    last_sampled: int | None = None

    @classmethod
    def start(cls, step: int) -> Moment:
        return cls("start", step)

    @classmethod
    def after_step(cls, step: int, epoch: int) -> Moment:
        return cls("step", step, epoch)

    @classmethod
    def epoch_end(cls, epoch: int, step: int, final: bool) -> Moment:
        return cls("epoch", step, epoch, final=final)

    @classmethod
    def end(cls, step: int, epochs_seen: int, stopped: bool, last_sampled: int | None) -> Moment:
        return cls("end", step, epochs_seen, stopped=stopped, last_sampled=last_sampled)


# ------------------------------------------------------------------------------------------ the answer


@dataclass(frozen=True)
class Save:
    """A LoRA file to write (`kind` "step", "epoch" or "final"; `step` and `epoch` go into its metadata), the state
    folder saved with it (or None), and the earlier files and folders of this training it retires: `retired` after
    the LoRA is written, `retired_states` after the state."""
    kind: str
    lora: str
    step: int
    epoch: int
    state: str | None = None
    retired: tuple[str, ...] = ()
    retired_states: tuple[str, ...] = ()


@dataclass(frozen=True)
class Previews:
    """Previews to render, their files named by `epoch` when given, else by `step`."""
    step: int
    epoch: int | None = None


@dataclass(frozen=True)
class Due:
    save: Save | None = None
    previews: Previews | None = None
    validation: bool = False


def due(cadence: Cadence, moment: Moment, written: Sequence[str] = ()) -> Due:
    """What is due at `moment`. `written`: the step and epoch saves this training wrote so far (a resumed one's
    state lists those of the runs before): rotation retires only these, never a file another run left."""
    if moment.kind == "start":
        return Due(previews=Previews(moment.step) if cadence.sample_at_first and moment.step == 0 else None)
    if moment.kind == "step":
        return Due(save=_step_save(cadence, moment, written),
                   previews=Previews(moment.step) if previews_due_at(cadence, step=moment.step) else None,
                   validation=cadence.validation is not None and cadence.validation.at_step(moment.step))
    if moment.kind == "epoch":
        saves = cadence.save_every_n_epochs and moment.epoch % cadence.save_every_n_epochs == 0 and not moment.final
        return Due(save=_epoch_save(cadence, moment, written) if saves else None,
                   previews=Previews(moment.step, moment.epoch) if previews_due_at(cadence, epoch=moment.epoch)
                   else None,
                   validation=cadence.validation is not None and cadence.validation.at_epoch_end(moment.epoch))
    if moment.kind == "end":
        return Due(save=_final_save(cadence, moment),
                   previews=Previews(moment.step) if (cadence.sample_at_end and not moment.stopped
                                                      and moment.last_sampled != moment.step) else None)
    raise ValueError(f"moment kind {moment.kind!r}: expected start, step, epoch or end")


def previews_due_at(cadence: Cadence, step: int | None = None, epoch: int | None = None) -> bool:
    """sd-scripts' rule: with --sample_every_n_epochs previews come at the end of those epochs only (the step
    cadence is then ignored); else every --sample_every_n_steps steps; never without either."""
    if cadence.sample_every_n_epochs:
        return epoch is not None and epoch % cadence.sample_every_n_epochs == 0
    if cadence.sample_every_n_steps:
        return epoch is None and step is not None and step % cadence.sample_every_n_steps == 0
    return False


def previews_due(config, step: int | None = None, epoch: int | None = None) -> bool:
    """`previews_due_at` for a TrainConfig (reads its previews section only)."""
    previews = config.previews
    return previews_due_at(Cadence(sample_every_n_steps=previews.sample_every_n_steps,
                                   sample_every_n_epochs=previews.sample_every_n_epochs), step, epoch)


def _every(n: int | None, value: int) -> bool:
    return bool(n) and value % n == 0


def _step_save(cadence: Cadence, moment: Moment, written: Sequence[str]) -> Save | None:
    """Every --save_every_n_steps steps, the run's last step too (as sd-scripts)."""
    if not _every(cadence.save_every_n_steps, moment.step):
        return None
    lora = step_lora_name(cadence.stem, moment.step)
    keep_states = cadence.save_last_n_steps_state or cadence.save_last_n_steps
    return Save("step", lora, moment.step, moment.epoch, state_name(lora) if cadence.save_state else None,
                _older_steps(cadence.stem, written, LORA_SUFFIX, moment.step, cadence.save_last_n_steps),
                _older_steps(cadence.stem, written, STATE_SUFFIX, moment.step, keep_states)
                if cadence.save_state else ())


def _older_steps(stem: str, written: Sequence[str], suffix: str, step: int, keep: int | None) -> tuple[str, ...]:
    """--save_last_n_steps N: what was saved more than N steps before `step` (the save N steps ago is kept, as
    sd-scripts), among this training's saves named `<stem>-stepNNNNNNNN<suffix>` exactly."""
    if not keep:
        return ()
    return tuple(name for name in written if (n := step_of(name, stem, suffix)) is not None and n < step - keep)


def _epoch_save(cadence: Cadence, moment: Moment, written: Sequence[str]) -> Save:
    lora = epoch_lora_name(cadence.stem, moment.epoch)
    keep_states = cadence.save_last_n_epochs_state or cadence.save_last_n_epochs
    return Save("epoch", lora, moment.step, moment.epoch, state_name(lora) if cadence.save_state else None,
                _expired_epoch(cadence, written, moment.epoch, cadence.save_last_n_epochs, epoch_lora_name),
                _expired_epoch(cadence, written, moment.epoch, keep_states,
                               lambda stem, epoch: state_name(epoch_lora_name(stem, epoch)))
                if cadence.save_state else ())


def _expired_epoch(cadence: Cadence, written: Sequence[str], epoch: int, keep: int | None,
                   name_of) -> tuple[str, ...]:
    """--save_last_n_epochs N: the save that falls out of the last N when epoch `epoch` is saved."""
    old = epoch - cadence.save_every_n_epochs * keep if keep else 0
    name = name_of(cadence.stem, old) if old > 0 else None
    return (name,) if name in written else ()


def _final_save(cadence: Cadence, moment: Moment) -> Save:
    """The LoRA of the last step; the resumable state with --save_state, --save_state_on_train_end, or when a stop
    request ended the run (so it can go on)."""
    lora = final_lora_name(cadence.stem)
    keeps_state = cadence.save_state or cadence.save_state_on_train_end or moment.stopped
    return Save("final", lora, moment.step, moment.epoch, state_name(lora) if keeps_state else None)


__all__ = ["Cadence", "Due", "Moment", "Previews", "Save", "ValidationSchedule", "due", "epoch_save_cadence",
           "previews_due", "previews_due_at", "step_lora_name", "epoch_lora_name", "final_lora_name", "state_name"]
