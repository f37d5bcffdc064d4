"""The cadence's oracle: the decision logic the loop and LoRAWriter had before the cadence became one pure function
(issue 17), copied as it was. `old_run` walks a run the way the old loop did and records its events, files and
removals; `new_run` walks it the same way with every decision from `cadence.due`. On the runs recorded from the old
code (eight, a resume among them) `old_run` gives exactly the recorded events and files."""

from __future__ import annotations

from types import SimpleNamespace

from trainer.cadence import Cadence, Moment, Previews, Save, due
from trainer.config.sections import PreviewConfig, SavingConfig, ValidationConfig

# ------------------------------------------------------------------------------------------ the oracle (old code)


class OldWriter:
    """The old LoRAWriter's names and rotation, on names only (`files`: what is on disk)."""

    def __init__(self, o: dict, epochs: int, written=()):
        self.o = o
        self.every_n_epochs = (max(1, epochs // o["save_n_epoch_ratio"]) if o.get("save_n_epoch_ratio")
                               else o.get("save_every_n_epochs"))
        self.name = o["stem"]
        self.written = [n for n in written]
        self.files: set[str] = set()
        self.removed: list[str] = []

    def epoch_path(self, epoch):
        return f"{self.name}-{epoch:06d}.safetensors"

    def step_path(self, step):
        return f"{self.name}-step{step:08d}.safetensors"

    def state_folder_for_epoch(self, epoch):
        return f"{self.name}-{epoch:06d}-state"

    def state_folder_for_step(self, step):
        return f"{self.name}-step{step:08d}-state"

    def _mark(self, *names):
        self.written += [name for name in names if name not in self.written]

    def _remove(self, name):
        if name in self.written:
            self.files.discard(name)
            self.removed.append(name)
            self.written.remove(name)

    def save_epoch(self, epoch):
        self.files.add(self.epoch_path(epoch))
        self._mark(self.epoch_path(epoch))
        old = self._expired_epoch(epoch)
        if old:
            self._remove(self.epoch_path(old))

    def save_step(self, step):
        self.files.add(self.step_path(step))
        self._mark(self.step_path(step))
        self._drop_old_steps(step, ".safetensors")

    def rotate_states_for_epoch(self, epoch):
        self._mark(self.state_folder_for_epoch(epoch))
        old = self._expired_epoch(epoch, self.o.get("save_last_n_epochs_state") or self.o.get("save_last_n_epochs"))
        if old:
            self._remove(self.state_folder_for_epoch(old))

    def _expired_epoch(self, epoch, keep=None):
        keep = self.o.get("save_last_n_epochs") if keep is None else keep
        every = self.every_n_epochs
        if not keep or not every:
            return None
        old = epoch - every * keep
        return old if old > 0 else None

    def rotate_states_for_step(self, step):
        self._mark(self.state_folder_for_step(step))
        self._drop_old_steps(step, "-state", self.o.get("save_last_n_steps_state") or self.o.get("save_last_n_steps"))

    def _drop_old_steps(self, step, suffix, keep=None):
        keep = self.o.get("save_last_n_steps") if keep is None else keep
        if not keep:
            return
        prefix = f"{self.name}-step"
        for name in list(self.written):
            digits = name[len(prefix):-len(suffix)]
            if (name.startswith(prefix) and name.endswith(suffix) and len(digits) == 8 and digits.isascii()
                    and digits.isdigit() and int(digits) < step - keep):
                self._remove(name)


def old_previews_due(o, step=None, epoch=None):
    if o.get("sample_every_n_epochs"):
        return epoch is not None and epoch % o["sample_every_n_epochs"] == 0
    if o.get("sample_every_n_steps"):
        return epoch is None and step is not None and step % o["sample_every_n_steps"] == 0
    return False


def old_run(o: dict, steps_per_epoch: int, total: int, epochs: int, validating: bool, stop_after=None,
            start=(0, 0, 0), written=(), losses: bool = False) -> tuple[list, OldWriter]:
    """The old loop's events for a run starting at `start` (step, epoch, steps already done in that epoch: a
    resumed state's position), stopped after step `stop_after` (None: never); rows as `event_rows` gives them, with
    ("removed", name) rows for rotation."""
    events, writer = [], OldWriter(o, epochs, written)
    state = SimpleNamespace(step=start[0], epoch=start[1], last_sampled=None, losses=losses)

    def removals(before):
        events.extend(("removed", name) for name in writer.removed[before:])

    def sample(step=None, epoch=None):
        state.last_sampled = state.step
        events.append(("samples", step if step is not None else state.step,
                       f"e{epoch:06d}" if epoch is not None else f"{step:06d}"))

    def step_cadence(epoch):  # old _step_saves_and_previews, then the step validation
        step = state.step
        if o.get("save_every_n_steps") and step % o["save_every_n_steps"] == 0:
            before = len(writer.removed)
            writer.save_step(step)
            events.append(("saved", "lora", writer.step_path(step), step))
            removals(before)
            if o.get("save_state"):
                before = len(writer.removed)
                writer.files.add(writer.state_folder_for_step(step))
                events.append(("saved", "state", writer.state_folder_for_step(step), step))
                writer.rotate_states_for_step(step)
                removals(before)
        if old_previews_due(o, step=step):
            sample(step=step)
        if validating and o.get("validate_every_n_steps") and step % o["validate_every_n_steps"] == 0:
            events.append(("validation", step, epoch + 1, False))

    def end_of_epoch(number, final, stopped):
        if stopped:
            return
        if validating and (o.get("validate_every_n_epochs") is None or number % o["validate_every_n_epochs"] == 0):
            events.append(("validation", state.step, number, True))
        if state.losses:
            events.append(("epoch", number, state.step))
        every = writer.every_n_epochs
        if every and number % every == 0 and not final:
            before = len(writer.removed)
            writer.save_epoch(number)
            events.append(("saved", "lora", writer.epoch_path(number), state.step))
            removals(before)
            if o.get("save_state"):
                before = len(writer.removed)
                writer.files.add(writer.state_folder_for_epoch(number))
                events.append(("saved", "state", writer.state_folder_for_epoch(number), state.step))
                writer.rotate_states_for_epoch(number)
                removals(before)
        if old_previews_due(o, epoch=number):
            sample(epoch=number)

    def finish(stopped):
        final = f"{writer.name}.safetensors"
        writer.files.add(final)
        events.append(("saved", "lora", final, state.step))
        if o.get("save_state") or o.get("save_state_on_train_end") or stopped:
            writer.files.add(f"{writer.name}-state")
            events.append(("saved", "state", f"{writer.name}-state", state.step))
        if o.get("sample_at_end") and not stopped and state.last_sampled != state.step:
            sample(step=state.step)
        events.append(("finished", final, state.step, stopped))
        return events, writer

    if state.step >= total:
        return finish(False)
    if o.get("sample_at_first") and state.step == 0:
        sample(step=0)
    stopped = False
    for epoch in range(state.epoch, epochs):
        state.epoch, done_in_epoch = epoch, start[2] if epoch == start[1] else 0
        for _ in range(done_in_epoch, steps_per_epoch):
            state.step += 1
            done_in_epoch += 1
            state.losses = True
            events.append(("step", state.step, epoch + 1))
            if stop_after is not None and state.step >= stop_after:
                stopped = True
                break
            step_cadence(epoch)
            if state.step >= total:
                break
        if done_in_epoch == steps_per_epoch:  # the epoch ran to its end
            state.epoch = epoch + 1
            end_of_epoch(epoch + 1, final=state.step >= total or epoch + 1 == epochs, stopped=stopped)
        elif not stopped and state.step >= total:
            end_of_epoch(epoch + 1, final=True, stopped=False)
        if stopped or state.step >= total:
            break
    return finish(stopped)


# ------------------------------------------------------------------------------------------ the new function, walked


def new_run(o: dict, steps_per_epoch: int, total: int, epochs: int, validating: bool, stop_after=None,
            start=(0, 0, 0), written=(), losses: bool = False) -> tuple[list, list]:
    """The same walk with every decision from `due`: the rows and the names left in `written`."""
    cadence = Cadence.of(SavingConfig(**{k: v for k, v in o.items() if k in SAVING}, output_name=o["stem"]),
                         PreviewConfig(**{k: v for k, v in o.items() if k in PREVIEWS}),
                         ValidationConfig(**{k: v for k, v in o.items() if k in VALIDATION}), epochs, validating)
    events, written = [], list(written)
    step, last_sampled, any_loss = start[0], None, losses

    def save(s: Save | None):
        if s is None:
            return
        events.append(("saved", "lora", s.lora, s.step))
        if s.kind != "final":
            _remember(written, s.lora)
        for name in s.retired:
            written.remove(name)
            events.append(("removed", name))
        if s.state:
            events.append(("saved", "state", s.state, s.step))
            if s.kind != "final":
                _remember(written, s.state)
            for name in s.retired_states:
                written.remove(name)
                events.append(("removed", name))

    def sample(p: Previews | None):
        nonlocal last_sampled
        if p is not None:
            last_sampled = step
            events.append(("samples", p.step, f"e{p.epoch:06d}" if p.epoch is not None else f"{p.step:06d}"))

    def end(stopped):
        epochs_seen = step // steps_per_epoch + (1 if step % steps_per_epoch else 0)
        last = due(cadence, Moment.end(step, epochs_seen, stopped, last_sampled))
        save(last.save)
        sample(last.previews)
        events.append(("finished", last.save.lora, step, stopped))
        return events, written

    if step >= total:
        return end(False)
    sample(due(cadence, Moment.start(step)).previews)
    stopped = False
    for epoch in range(start[1], epochs):
        done_in_epoch = start[2] if epoch == start[1] else 0
        for _ in range(done_in_epoch, steps_per_epoch):
            step += 1
            done_in_epoch += 1
            any_loss = True
            events.append(("step", step, epoch + 1))
            if stop_after is not None and step >= stop_after:
                stopped = True
                break
            now = due(cadence, Moment.after_step(step, epoch + 1), written)
            save(now.save)
            sample(now.previews)
            if now.validation:
                events.append(("validation", step, epoch + 1, False))
            if step >= total:
                break
        last = step >= total
        if not stopped and (done_in_epoch == steps_per_epoch or last):
            now = due(cadence, Moment.epoch_end(epoch + 1, step, last or epoch + 1 == epochs), written)
            if now.validation:
                events.append(("validation", step, epoch + 1, True))
            if any_loss:
                events.append(("epoch", epoch + 1, step))
            save(now.save)
            sample(now.previews)
        if stopped or last:
            break
    return end(stopped)


SAVING = {"save_every_n_steps", "save_every_n_epochs", "save_n_epoch_ratio", "save_last_n_steps", "save_last_n_epochs",
          "save_last_n_steps_state", "save_last_n_epochs_state", "save_state", "save_state_on_train_end"}
PREVIEWS = {"sample_every_n_steps", "sample_every_n_epochs", "sample_at_first", "sample_at_end"}
VALIDATION = {"validate_every_n_steps", "validate_every_n_epochs"}


def _remember(written: list[str], name: str) -> None:
    if name not in written:
        written.append(name)
