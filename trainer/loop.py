"""The training run: one entry point, `train(config, reporter)`, for the CLI and the ComfyUI nodes alike.

`train` owns what a host process shares with it: it runs with inference mode off and gradients on, leaves the
global random states as it found them, never picks a CUDA device itself when one is given, and on every way out
(finished, stopped, failed) detaches the LoRA, releases the block runner, drops every model and frees the memory.
Out of memory in any phase is an `OutOfMemoryError` that says what to change, with the last good step saved
(`oom.py`); with `step_down` (`--memory auto`) the run goes on one setting leaner instead. `Loop` is the run
itself: epochs -> batches -> step -> optimizer (`update.py`) -> what the cadence says is due (`cadence.py`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import random
import time
import traceback
from pathlib import Path

import torch

from . import memory, oom
from .cadence import Cadence, Moment, Previews, Save, due
from .cadence import previews_due as previews_due  # the loop's public rule since sd-scripts' fix 6
from .checkpoint import Position, capture_rng, save_state
from .config import TrainConfig, canonical_optimizer
from .distributed import init_world, pick_device
from .errors import Stopped
from .events import EpochEnd, Finished, GroupLR, Message, Reporter, Samples, Saved, StepEnd, ValidationEnd
from .metrics import Fanout, MetricsLog, check_trackers
from .optim import optimizer_eval_mode, optimizer_train_mode
from .preflight import check
from .resume import initial_position, restore
from .sampling import generate, sample_filename, with_seed
from .saving import SAVE_DTYPES, LoRAWriter
from .session import Session, prepare
from .step import StepContext, TrainStep
from .update import Updater
from .validation import Validator


def train(config: TrainConfig, reporter: Reporter, *, step_down: bool = False) -> Finished:
    """Train the LoRA `config` describes; events go to `reporter`, which is asked `should_stop()` wherever time is
    spent. Returns the result (also emitted as the last event). A stop before the first step raises `Stopped`; out
    of memory raises `OutOfMemoryError`, or with `step_down` continues from the last good step one setting leaner
    (more blocks swapped, then the fp8 base), saying what it changed, until nothing leaner is left."""
    for note in config.advice():
        reporter.emit(Message(note, "warning"))
    # cheap file reads: bad input fails here, before any model loads; a prompt's ignored flag is said here too
    check(config, warn=lambda text: reporter.emit(Message(text, "warning")))
    check_trackers(config)
    return oom.stepping_down(config, lambda leaner: _train_once(leaner, reporter), step_down, reporter.emit)


def _train_once(config: TrainConfig, reporter: Reporter) -> Finished:
    device = pick_device(config.memory.device)
    python_rng = random.getstate()
    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    session = loop = metrics = None
    where = oom.Where()
    failed = False
    try:
        with torch.random.fork_rng(devices=cuda_devices), torch.inference_mode(False), torch.enable_grad():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)  # an out-of-memory message reports this run's peak
            world = init_world(device, config.distributed.ddp_timeout)
            if world.is_main:
                metrics = MetricsLog.from_config(config, reporter.emit)
            events = Fanout(reporter, metrics)
            try:
                session = prepare(config, events, world, device, where)
                loop = Loop(session, events, where)
                loop.start()
                if metrics is not None:  # the steps from here on are trained (and logged) again; a new run logs all
                    metrics.truncate_after(loop.position.global_step)
                return loop.run()
            except torch.OutOfMemoryError as e:
                raise oom.handled(e, where, config, device, session, loop) from None
    except BaseException as e:
        failed = True
        traceback.clear_frames(e.__traceback__)  # the traceback stays readable but no longer holds the models
        raise
    finally:
        random.setstate(python_rng)
        if metrics is not None:
            metrics.close()
        if session is not None:
            session.network.detach()
            _release_block_runner(session.flux, failed)
        session = loop = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            if hasattr(torch, "accelerator") and hasattr(torch.accelerator, "empty_host_cache"):
                torch.accelerator.empty_host_cache()  # block swap's pinned host copies


def _release_block_runner(flux: torch.nn.Module, failed: bool) -> None:
    """Release the runner instead of dropping it: block swap waits for copies in flight on its side stream before
    its slots and pinned host copies are freed, also after a failed step. A failure to release while the run is
    already failing must not hide why it failed."""
    try:
        memory.teardown(flux, device="cpu")  # the model is dropped after the run: never copy blocks back to the GPU
    except Exception:
        if not failed:
            raise
    finally:
        flux.block_runner = None


class Loop:
    """The run over a prepared (immutable) `Session`; what changes while it runs is the loop's own: the position,
    the losses, the files it wrote, the optimizer's and the scaler's state, and when it last rendered previews."""

    def __init__(self, session: Session, reporter: Reporter, where: oom.Where | None = None):
        self.session = session
        self.reporter = reporter
        self.where = where or oom.Where()
        self.config = session.config
        self.step_module = TrainStep(StepContext(
            flux=session.flux, network=session.network, flow=self.config.flow, seed=session.seed,
            weight_dtype=session.weight_dtype, device=session.device,
            apply_t5_attn_mask=self.config.models.apply_t5_attn_mask, ae=session.ae, clip_l=session.clip_l,
            t5=session.t5, train_clip=session.train_clip, train_t5=session.train_t5))
        self.ddp_step = self.step_module
        self.validator = Validator.from_session(session, self.step_module.context)
        if session.world.enabled:
            ids = [session.device.index] if session.device.type == "cuda" else None
            distributed = self.config.distributed
            self.ddp_step = torch.nn.parallel.DistributedDataParallel(  # module_dropout may skip a LoRA for a step
                self.step_module, device_ids=ids, find_unused_parameters=bool(self.config.network.module_dropout),
                gradient_as_bucket_view=distributed.ddp_gradient_as_bucket_view,
                static_graph=distributed.ddp_static_graph)
        self.updater = Updater(session, reporter, self.where)
        self.writer = LoRAWriter(session)
        self.losses: list[float] = []
        self.position = Position(global_step=0, epoch=0, next_batch=0)
        self.started = time.perf_counter()
        self.last_sampled: int | None = None
        self._started = False

    @property
    def cadence(self) -> Cadence:
        """What the config asks of the cadence (validation only when images are held out)."""
        c = self.config
        return Cadence.of(c.saving, c.previews, c.validation, self.session.epochs, self.validator is not None)

    # ------------------------------------------------------------------------------------------ the run

    def run(self) -> Finished:
        if not self._started:
            self.start()
        s, position = self.session, self.position
        if position.global_step >= s.total_steps:
            self.reporter.emit(Message(f"the run starts at step {position.global_step}, and it has "
                                       f"{s.total_steps} steps: nothing left to train (raise --max_train_steps or "
                                       "--max_train_epochs to go on)", "warning"))
            return self._finish(stopped=False)
        self._begin()
        stopped = False
        for epoch in range(position.epoch, s.epochs):
            s.datasets.set_epoch(epoch)
            position.epoch = epoch
            stopped = self._train_epoch(epoch)
            ran_to_its_end = position.next_batch >= len(s.datasets)
            if ran_to_its_end:
                position.epoch, position.next_batch = epoch + 1, 0
            last = position.global_step >= s.total_steps
            if not stopped and (ran_to_its_end or last):  # sd-scripts ends an epoch cut by the last step the same way
                self._at_epoch_end(epoch + 1, final=last or epoch + 1 == s.epochs)
            if stopped or last:
                break
        return self._finish(stopped)

    def _begin(self) -> None:
        """Say what is trained, render the --sample_at_first previews, then switch everything to training."""
        s = self.session
        self.reporter.emit(Message(
            f"training {len(s.network.loras)} LoRA layers for {s.total_steps} steps ({s.epochs} epochs of "
            f"{s.steps_per_epoch}), {len(s.datasets)} batches per epoch, device {s.device}"))
        first = due(self.cadence, Moment.start(self.position.global_step))
        if first.previews:
            with self._optimizer_evaluating():
                self._sample(first.previews)
        if self.reporter.should_stop():
            raise Stopped("stopped before the first training step: nothing was trained or saved")
        s.flux.train()
        s.network.train()
        optimizer_train_mode(s.optimizer)
        self.where.enter("step", "training")

    def _train_epoch(self, epoch: int) -> bool:
        """Train from `position.next_batch` to the end of the epoch (or the last step); True if asked to stop."""
        s, position, accumulation = self.session, self.position, self.config.optimizer.gradient_accumulation_steps
        micro_losses, paths = [], []
        for index in range(position.next_batch, len(s.datasets)):
            sync = (len(micro_losses) + 1) % accumulation == 0 or index == len(s.datasets) - 1
            step = position.global_step
            batch = s.datasets.batch(index, step, s.total_steps, (s.world.rank, s.world.size))
            no_sync = self.ddp_step.no_sync() if (s.world.enabled and not sync) else contextlib.nullcontext()
            with no_sync:
                loss = self.ddp_step(batch, step)
                oom.inject("step", step + 1)
                self.updater.backward(loss / accumulation)
            micro_losses.append(loss.detach())
            paths += batch.paths
            if not sync:
                continue
            mean_loss, applied = self.updater.apply(micro_losses, step + 1)
            position.global_step, position.next_batch = step + 1, index + 1
            if applied:
                self._report_step(mean_loss, epoch)
            else:
                self.updater.skip(mean_loss, paths, step + 1)
            micro_losses, paths = [], []
            if self.reporter.should_stop():
                return True  # saving is left to `_finish`, and no previews are rendered
            self._after_step(epoch + 1)
            if position.global_step >= s.total_steps:
                return False
        return False

    # ------------------------------------------------------------------------------------------ what is due

    def _after_step(self, epoch_number: int) -> None:
        step = self.position.global_step
        now = due(self.cadence, Moment.after_step(step, epoch_number), self.writer.written)
        with self._optimizer_evaluating():
            self._save(now.save)
            if now.previews:
                self._sample(now.previews)
            if now.validation:
                self._validate(epoch_number, per_epoch=False)

    def _at_epoch_end(self, number: int, final: bool) -> None:
        """After epoch `number` (1-based); the position already points at the next epoch's first batch."""
        now = due(self.cadence, Moment.epoch_end(number, self.position.global_step, final), self.writer.written)
        # two evaluation windows, as the loop always had them: schedule-free weights round-trip each time
        with self._optimizer_evaluating():
            if now.validation:
                self._validate(number, per_epoch=True)
        if self.losses:
            self.reporter.emit(EpochEnd(number, self.position.global_step, self._average_loss()))
        with self._optimizer_evaluating():
            self._save(now.save)
            if now.previews:
                self._sample(now.previews)

    def _finish(self, stopped: bool) -> Finished:
        """Save first (the LoRA is safe before any slow preview), then the previews of the finished LoRA."""
        s, step = self.session, self.position.global_step
        path = self.save_final_files(stopped)
        state_dict = None
        if s.world.is_main:
            dtype = SAVE_DTYPES[self.config.saving.save_precision]
            state_dict = {k: v.detach().to("cpu", dtype, copy=True)
                          for k, v in s.network.kohya_state_dict(dtype).items()}
        last = due(self.cadence, self._end(stopped))
        if last.previews:
            self._sample(last.previews)
        s.network.eval()
        finished = Finished(path, step, stopped, tuple(self.losses), state_dict,
                            self.writer.last_metadata if s.world.is_main else None)
        self.reporter.emit(finished)
        return finished

    def _end(self, stopped: bool) -> Moment:
        epochs_seen = self.position.epoch + (1 if self.position.next_batch else 0)
        return Moment.end(self.position.global_step, epochs_seen, stopped, self.last_sampled)

    def save_final_files(self, stopped: bool) -> Path | None:
        """The LoRA of the last step, and the resumable state a stopped run (or --save_state) keeps."""
        optimizer_eval_mode(self.session.optimizer)  # the LoRA saved from here on is the schedule-free evaluation point
        return self._save(due(self.cadence, self._end(stopped)).save)

    def _save(self, save: Save | None) -> Path | None:
        if save is None:
            return None
        with self.where.doing("saving", "saving the LoRA"):
            if save.kind == "step":
                oom.inject("saving", save.step)
            path = self.writer.save(save, self.reporter)
            if save.state:
                self.save_state(self.writer.folder / save.state)
                self.writer.state_saved(save)
        return path

    def _validate(self, epoch_number: int, per_epoch: bool) -> None:
        """The held-out loss at fixed timesteps and noise, on every process (each computes its share)."""
        with self.where.doing("validation", "computing the validation loss"):
            oom.inject("validation", self.position.global_step)
            loss = self.validator.loss()
        self.reporter.emit(ValidationEnd(self.position.global_step, epoch_number, loss, per_epoch=per_epoch))

    @contextlib.contextmanager
    def _optimizer_evaluating(self):
        """Schedule-free optimizers hold the weights at their training point between steps: previews, validation
        and saves see the evaluation point, and training goes on from the training point (no-ops for the rest)."""
        optimizer_eval_mode(self.session.optimizer)
        try:
            yield
        finally:
            optimizer_train_mode(self.session.optimizer)

    # ------------------------------------------------------------------------------------------ reporting

    def _average_loss(self) -> float:
        """sd-scripts' average: over the steps of the last epoch's length (all steps so far in the first epoch)."""
        window = self.losses[-self.session.steps_per_epoch:]
        return sum(window) / len(window) if window else float("nan")

    def _report_step(self, loss: float, epoch: int) -> None:
        s, step = self.session, self.position.global_step
        self.losses.append(loss)
        lr = s.optimizer.param_groups[0].get("lr") or 0.0
        groups = tuple(GroupLR(g.get("name", ""), float(g.get("lr") or 0.0), g.get("d"))
                       for g in s.optimizer.param_groups)
        norms = self.updater.max_norm
        self.reporter.emit(StepEnd(step, s.total_steps, epoch + 1, loss, self._average_loss(), float(lr),
                                   time.perf_counter() - self.started, groups=groups,
                                   keys_scaled=norms.keys_scaled if norms else None,
                                   mean_norm=norms.average_norm if norms else None,
                                   max_norm=norms.max_norm if norms else None))

    def _sample(self, previews: Previews) -> None:
        """Render the preview prompts; a stop request ends it between two prompts."""
        s = self.session
        if not s.prompts or not s.world.is_main or s.ae is None:
            return
        self.last_sampled = self.position.global_step
        folder = Path(self.config.saving.output_dir) / "sample"
        folder.mkdir(parents=True, exist_ok=True)
        ae_device = next(s.ae.parameters()).device
        s.ae.to(s.device)
        s.flux.eval()
        s.network.eval()
        paths, images, rendered = [], [], []
        try:
            for prompt, (cond, negative) in zip(s.prompts, s.prompt_conds):
                if self.reporter.should_stop():
                    break
                prompt = with_seed(prompt, s.seed + prompt.index)
                with self.where.doing("previews", "rendering previews"):
                    oom.inject("previews", self.position.global_step)
                    image = generate(s.flux, s.ae, cond, prompt, negative, s.device, s.weight_dtype)
                path = folder / sample_filename(self.config.saving.output_name, prompt.index, prompt.seed,
                                                epoch=previews.epoch,
                                                step=previews.step if previews.epoch is None else None)
                image.save(path)
                paths.append(path)
                images.append(image)
                rendered.append(prompt)
        finally:
            s.ae.to(ae_device)
            s.flux.train()
            s.network.train()
        if paths:
            self.reporter.emit(Samples(previews.step, tuple(paths), tuple(images),
                                       prompts=tuple(p.prompt for p in rendered),
                                       indices=tuple(p.index for p in rendered)))

    # ------------------------------------------------------------------------------------------ state

    def start(self) -> None:
        """Where the run starts: a resumed state's position, then --initial_step / --initial_epoch."""
        s, run = self.session, self.config.run
        if self.config.saving.resume:
            resumed = restore(Path(self.config.saving.resume), s, self.updater.scaler, self.reporter)
            self.losses = list(resumed.losses)
            self.writer.adopt(resumed.written)  # rotated like this run's own saves
            self.position = resumed.position
        if run.initial_step is not None or run.initial_epoch is not None:
            self.position, replaced, said = initial_position(
                run, self.position.global_step if self.config.saving.resume else None, s.steps_per_epoch,
                s.total_steps, len(s.datasets), self.config.optimizer.gradient_accumulation_steps)
            for message in (replaced, said):
                if message is not None:
                    self.reporter.emit(message)
        self._started = True

    def save_state(self, folder: Path) -> None:
        """The resumable state of this step (main process only)."""
        s, scaler = self.session, self.updater.scaler
        if not s.world.is_main:
            return
        network = s.network.kohya_state_dict(torch.float32)
        parts = {"optimizer": s.optimizer.state_dict(), "scheduler": s.scheduler.state_dict(), **capture_rng(),
                 "losses": self.losses, "seed": s.seed, "written": list(self.writer.written)}
        if scaler is not None:
            parts["scaler"] = scaler.state_dict()
        save_state(folder, network, parts, self.position,
                   optimizer=canonical_optimizer(self.config.optimizer.optimizer_type),
                   network_config=dataclasses.asdict(self.config.network))
        self.reporter.emit(Saved(folder, "state", self.position.global_step))


__all__ = ["Loop", "train", "previews_due"]
