"""The training run: one entry point, `train(config, reporter)`, for the CLI and the ComfyUI nodes alike.

`train` owns what a host process shares with it: it runs with inference mode off and gradients on, leaves the
global random states as it found them, never picks a CUDA device itself when one is given, and on every way out
(finished, stopped, failed) detaches the LoRA, releases the block runner, drops every model and frees the memory.
Out of memory in any phase is an `OutOfMemoryError` that says what to change, with the last good step saved
(`oom.py`); with `step_down` (`--memory auto`) the run goes on one setting leaner instead. `Loop` is the run
itself: epochs -> batches -> step -> optimizer -> the cadence of saves and previews.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import random
import time
import traceback
from pathlib import Path

import torch

from . import memory, oom
from .checkpoint import (
    Position,
    capture_rng,
    load_state,
    network_shapes,
    restore_rng,
    restoring,
    save_state,
)
from .config import TrainConfig, canonical_optimizer
from .distributed import init_world, pick_device
from .errors import ConfigError, NonFiniteError, OutOfMemoryError, Stopped
from .events import EpochEnd, Finished, GroupLR, Message, Reporter, Samples, Saved, StepEnd, ValidationEnd
from .lora.max_norm import CappedNorms, MaxNormResult, cap_weight_norms
from .metrics import Fanout, MetricsLog, check_trackers
from .nonfinite_diagnosis import NonFiniteFacts
from .nonfinite_diagnosis import describe as describe_nonfinite
from .optim import optimizer_eval_mode, optimizer_train_mode
from .preflight import check
from .sampling import generate, sample_filename, with_seed
from .saving import SAVE_DTYPES, LoRAWriter
from .session import Session, prepare
from .step import StepContext, TrainStep
from .step_checks import all_finite, gradient_norm, read_back
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
    while True:
        try:
            return _train_once(config, reporter)
        except OutOfMemoryError as e:
            leaner = oom.leaner_config(config, e) if step_down else None
            if leaner is None:
                raise
            config, change = leaner
            reporter.emit(Message(change, "warning"))


def _train_once(config: TrainConfig, reporter: Reporter) -> Finished:
    device = pick_device(config.device)
    python_rng = random.getstate()
    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    session = loop = metrics = None
    where = oom.Where()
    failed = False
    try:
        with torch.random.fork_rng(devices=cuda_devices), torch.inference_mode(False), torch.enable_grad():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)  # an out-of-memory message reports this run's peak
            world = init_world(device, config.ddp_timeout)
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


def previews_due(config: TrainConfig, step: int | None = None, epoch: int | None = None) -> bool:
    """sd-scripts' rule: with --sample_every_n_epochs previews come at the end of those epochs only (the step
    cadence is then ignored); else every --sample_every_n_steps steps; never without either."""
    if config.sample_every_n_epochs:
        return epoch is not None and epoch % config.sample_every_n_epochs == 0
    if config.sample_every_n_steps:
        return epoch is None and step is not None and step % config.sample_every_n_steps == 0
    return False


class Fp16GradScaler(torch.amp.GradScaler):
    """--full_fp16: the LoRA weights themselves are fp16, so their gradients are too; the stock scaler refuses to
    unscale fp16 gradients, sd-scripts' patch lets it (allow_fp16), and so does this."""

    def _unscale_grads_(self, optimizer, inv_scale, found_inf, allow_fp16):
        return super()._unscale_grads_(optimizer, inv_scale, found_inf, True)


class Loop:
    def __init__(self, session: Session, reporter: Reporter, where: oom.Where | None = None):
        self.session = session
        self.reporter = reporter
        self.where = where or oom.Where()
        self.config = session.config
        self.step_module = TrainStep(StepContext(
            flux=session.flux, network=session.network, flow=self.config.flow, seed=session.seed,
            weight_dtype=session.weight_dtype, device=session.device, apply_t5_attn_mask=self.config.apply_t5_attn_mask,
            ae=session.ae, clip_l=session.clip_l, t5=session.t5, train_clip=session.train_clip,
            train_t5=session.train_t5))
        self.ddp_step = self.step_module
        self.validator = Validator.from_session(session, self.step_module.context)
        if session.world.enabled:
            ids = [session.device.index] if session.device.type == "cuda" else None
            self.ddp_step = torch.nn.parallel.DistributedDataParallel(  # module_dropout may skip a LoRA for a step
                self.step_module, device_ids=ids, find_unused_parameters=bool(self.config.network.module_dropout),
                gradient_as_bucket_view=self.config.ddp_gradient_as_bucket_view,
                static_graph=self.config.ddp_static_graph)
        self.scaler = None
        if self.config.mixed_precision == "fp16":
            self.scaler = (Fp16GradScaler if self.config.full_fp16 else torch.amp.GradScaler)(session.device.type)
        self.writer = LoRAWriter(session)
        self.losses: list[float] = []
        self.position = Position(global_step=0, epoch=0, next_batch=0)
        self.started = time.perf_counter()
        self.last_sampled: int | None = None
        self.nonfinite_steps = 0
        self.max_norm: MaxNormResult | None = None
        self._gradient_norm: torch.Tensor | None = None
        self._started = False

    # ------------------------------------------------------------------------------------------ state

    def _parts(self) -> dict:
        s = self.session
        parts = {"optimizer": s.optimizer.state_dict(), "scheduler": s.scheduler.state_dict(), **capture_rng(),
                 "losses": self.losses, "seed": s.seed, "written": list(self.writer.written)}
        if self.scaler is not None:
            parts["scaler"] = self.scaler.state_dict()
        return parts

    def save_state(self, folder: Path) -> None:
        if self.session.world.is_main:
            save_state(folder, self.session.network.kohya_state_dict(torch.float32), self._parts(), self.position,
                       optimizer=canonical_optimizer(self.config.optimizer_type),
                       network_config=dataclasses.asdict(self.config.network))
            self.reporter.emit(Saved(folder, "state", self.position.global_step))

    def resume(self, folder: Path) -> None:
        s = self.session
        network, parts, position = load_state(
            folder, network_shapes(s.network), optimizer=canonical_optimizer(self.config.optimizer_type),
            warn=lambda text: self.reporter.emit(Message(text, "warning")))
        with restoring(folder, "LoRA"):
            s.network.load_kohya(network)
        with restoring(folder, "optimizer"):
            s.optimizer.load_state_dict(parts["optimizer"])
        with restoring(folder, "scheduler"):
            s.scheduler.load_state_dict(parts["scheduler"])
        restore_rng(parts, folder)
        if self.scaler is not None and "scaler" in parts:
            with restoring(folder, "loss scaler"):
                self.scaler.load_state_dict(parts["scaler"])
        if parts.get("seed") != s.seed:
            self.reporter.emit(Message(f"resume: the state was trained with seed {parts.get('seed')}, this run uses "
                                       f"{s.seed}; the continuation will differ from an uninterrupted run", "warning"))
        self.losses = list(parts["losses"])
        self.writer.adopt(parts.get("written", []))  # rotated like this run's own saves
        self.position = position
        self.reporter.emit(Message(f"resumed from {folder} at step {position.global_step} "
                                   f"(epoch {position.epoch + 1})"))

    def _start_at_initial_step(self) -> None:
        """--initial_step N / --initial_epoch E (step (E-1) x steps per epoch): with --skip_until_initial_step the run
        starts at step N itself, its batches before N skipped, so it sees the data an uninterrupted run would; without
        it, at the start of the epoch that holds step N. Either replaces a resumed state's step; the learning-rate
        schedule is not advanced (it is the resumed state's, or starts from its beginning)."""
        cfg, s = self.config, self.session
        step = cfg.initial_step if cfg.initial_step is not None else (cfg.initial_epoch - 1) * s.steps_per_epoch
        if step >= s.total_steps:
            raise ConfigError(f"initial_step {step}: must be below the run's {s.total_steps} training steps "
                              "(--max_train_steps)")
        if cfg.resume:
            self.reporter.emit(Message(f"initial_step {step} replaces the resumed state's step "
                                       f"{self.position.global_step}", "warning"))
        epoch = step // s.steps_per_epoch
        if cfg.skip_until_initial_step:
            within = step - epoch * s.steps_per_epoch
            batch = min(within * cfg.gradient_accumulation_steps, len(s.datasets))
            self.position = Position(global_step=step, epoch=epoch, next_batch=batch)
            self.reporter.emit(Message(f"skipping {step} steps: training starts at step {step + 1} (epoch "
                                       f"{epoch + 1}, batch {batch + 1})"))
        else:
            self.position = Position(global_step=epoch * s.steps_per_epoch, epoch=epoch, next_batch=0)
            self.reporter.emit(Message(f"initial step {step}: training starts with epoch {epoch + 1} at step "
                                       f"{epoch * s.steps_per_epoch + 1}; --skip_until_initial_step starts at step "
                                       f"{step + 1} itself"))

    # ------------------------------------------------------------------------------------------ running

    def start(self) -> None:
        """Where the run starts: a resumed state's position, then --initial_step / --initial_epoch."""
        cfg = self.config
        if cfg.resume:
            self.resume(Path(cfg.resume))
        if cfg.initial_step is not None or cfg.initial_epoch is not None:
            self._start_at_initial_step()
        self._started = True

    def run(self) -> Finished:
        cfg, s = self.config, self.session
        if not self._started:
            self.start()
        if self.position.global_step >= s.total_steps:
            self.reporter.emit(Message(f"the run starts at step {self.position.global_step}, and it has "
                                       f"{s.total_steps} steps: nothing left to train (raise --max_train_steps or "
                                       "--max_train_epochs to go on)", "warning"))
            return self._finish(stopped=False)
        self.reporter.emit(Message(
            f"training {len(s.network.loras)} LoRA layers for {s.total_steps} steps ({s.epochs} epochs of "
            f"{s.steps_per_epoch}), {len(s.datasets)} batches per epoch, device {s.device}"))
        if cfg.sample_at_first and self.position.global_step == 0:
            with self._optimizer_evaluating():
                self._sample(step=0)
        if self.reporter.should_stop():
            raise Stopped("stopped before the first training step: nothing was trained or saved")
        s.flux.train()
        s.network.train()
        optimizer_train_mode(s.optimizer)
        self.where.enter("step", "training")
        stopped = False
        for epoch in range(self.position.epoch, s.epochs):
            s.datasets.set_epoch(epoch)
            self.position.epoch = epoch
            stopped = self._train_epoch(epoch)
            if self.position.next_batch >= len(s.datasets):  # the epoch ran to its end
                self.position.epoch, self.position.next_batch = epoch + 1, 0
                done = self.position.global_step >= s.total_steps or epoch + 1 == s.epochs
                self._end_of_epoch(epoch + 1, final=done, stopped=stopped)
            elif not stopped and self.position.global_step >= s.total_steps:
                self._end_of_epoch(epoch + 1, final=True, stopped=False)  # sd-scripts ends a cut epoch the same way
            if stopped or self.position.global_step >= s.total_steps:
                break
        return self._finish(stopped)

    def _train_epoch(self, epoch: int) -> bool:
        """Train from `position.next_batch` to the end of the epoch (or the last step); True if asked to stop."""
        s, accumulation = self.session, self.config.gradient_accumulation_steps
        micro, micro_losses, paths = 0, [], []
        for index in range(self.position.next_batch, len(s.datasets)):
            sync = (micro + 1) % accumulation == 0 or index == len(s.datasets) - 1
            step = self.position.global_step
            batch = s.datasets.batch(index, step, s.total_steps, (s.world.rank, s.world.size))
            no_sync = self.ddp_step.no_sync() if (s.world.enabled and not sync) else contextlib.nullcontext()
            with no_sync:
                loss = self.ddp_step(batch, step)
                oom.inject("step", step + 1)
                scaled = loss / accumulation
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            micro_losses.append(loss.detach())
            paths += batch.paths
            micro += 1
            if not sync:
                continue
            total, finite = self._read_step(micro_losses)
            if finite:
                self._check_weights_finite(total / micro, self._optimizer_step())
            self.position.global_step += 1
            self.position.next_batch = index + 1
            if not finite:
                self._skip_nonfinite(total / micro, paths)
            else:
                self._report_step(total / micro, epoch)
            micro, micro_losses, paths = 0, [], []
            if self.reporter.should_stop():
                return True  # saving is left to `_finish`, and no previews are rendered
            self._step_cadence(epoch)
            if self.position.global_step >= s.total_steps:
                return False
        return False

    def _read_step(self, losses: list[torch.Tensor]) -> tuple[float, bool]:
        """The step's one read from the device: the sum of its micro-batch losses, and whether they and the
        gradients are finite on every process (with fp16 loss scaling an overflow is the scaler's to handle: it
        skips that step and lowers the scale). The gradients' norm is kept for clipping."""
        self._gradient_norm = gradient_norm(self.session.optimizer) if self.scaler is None else None
        *values, norm = read_back([*losses, self._gradient_norm])
        total = sum(values)
        finite = math.isfinite(total) and (norm is None or math.isfinite(norm))
        return total, not self.session.world.any(not finite, self.session.device)

    def _check_weights_finite(self, loss: float, capped: CappedNorms | None) -> None:
        """The optimizer step's one read: whether the LoRA weights are finite, and the max-norm figures."""
        flag = all_finite(list(self.session.network.parameters()))
        finite, figures = read_back([flag, capped.values() if capped is not None else None])
        if figures is not None:
            self.max_norm = MaxNormResult.from_values(figures)
        if finite is not None and not finite:
            causes = describe_nonfinite(self.config, NonFiniteFacts("weights", loss))
            raise NonFiniteError(f"step {self.position.global_step + 1}: the LoRA weights became NaN or infinite in "
                                 f"the optimizer step (loss {loss:.4g}). {causes} Training stopped; the files saved "
                                 "before are kept.")

    def _skip_nonfinite(self, loss: float, paths: list) -> None:
        """Skip a step whose loss or gradients are not finite while the --skip_nonfinite_steps budget lasts, else
        stop the run: nothing non-finite is ever applied or saved, so the files written so far stay good."""
        self.session.optimizer.zero_grad(set_to_none=True)
        cfg, step = self.config, self.position.global_step
        self.nonfinite_steps += 1
        files = ", ".join(Path(p).name for p in paths[:4]) + (" ..." if len(paths) > 4 else "")
        what = (f"step {step}: the loss is {loss}" if not math.isfinite(loss)
                else f"step {step}: the gradients hold NaN or infinite values (loss {loss:.4g})")
        if self.nonfinite_steps <= cfg.skip_nonfinite_steps:
            self.reporter.emit(Message(f"{what}; step skipped ({self.nonfinite_steps} of --skip_nonfinite_steps "
                                       f"{cfg.skip_nonfinite_steps}); batch: {files}", "warning"))
            return
        facts = NonFiniteFacts("gradients" if math.isfinite(loss) else "loss", loss, tuple(str(p) for p in paths))
        raise NonFiniteError(f"{what}. {describe_nonfinite(cfg, facts)} Training stopped; nothing non-finite was "
                             "saved, and the files saved before this step are kept. --skip_nonfinite_steps N skips "
                             "up to N such steps.")

    def _optimizer_step(self) -> CappedNorms | None:
        """Clip, step, schedule; the max-norm cap's figures stay on the device for `_check_weights_finite`."""
        cfg, s = self.config, self.session
        params = [p for group in s.optimizer.param_groups for p in group["params"]]
        if self.scaler is not None:
            self.scaler.unscale_(s.optimizer)
        if cfg.max_grad_norm > 0 and self._gradient_norm is not None:  # the norm `_read_step` computed
            torch.nn.utils.clip_grads_with_norm_(params, cfg.max_grad_norm, self._gradient_norm)
        elif cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        s.network.update_ggpo_norms()  # GGPO reads the final gradients and the weights before the step
        self.where.optimizer_step = True  # from here until the step's end the weights and optimizer state change
        if self.scaler is not None:
            self.scaler.step(s.optimizer)
            self.scaler.update()
        else:
            s.optimizer.step()
        s.scheduler.step()
        s.optimizer.zero_grad(set_to_none=True)
        self._gradient_norm = None
        capped = cap_weight_norms(s.network, cfg.scale_weight_norms) if cfg.scale_weight_norms else None
        self.where.optimizer_step = False
        return capped

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
        norms = self.max_norm
        self.reporter.emit(StepEnd(step, s.total_steps, epoch + 1, loss, self._average_loss(), float(lr),
                                   time.perf_counter() - self.started, groups=groups,
                                   keys_scaled=norms.keys_scaled if norms else None,
                                   mean_norm=norms.average_norm if norms else None,
                                   max_norm=norms.max_norm if norms else None))

    @contextlib.contextmanager
    def _optimizer_evaluating(self):
        """Schedule-free optimizers hold the weights at their training point between steps: previews, validation
        and saves see the evaluation point, and training goes on from the training point (no-ops for the rest)."""
        optimizer_eval_mode(self.session.optimizer)
        try:
            yield
        finally:
            optimizer_train_mode(self.session.optimizer)

    def _step_cadence(self, epoch: int) -> None:
        with self._optimizer_evaluating():
            self._step_saves_and_previews(epoch)
            if self.validator is not None and self.validator.schedule.at_step(self.position.global_step):
                self._validate(epoch + 1, per_epoch=False)

    def _validate(self, epoch_number: int, per_epoch: bool) -> None:
        """The held-out loss at fixed timesteps and noise, on every process (each computes its share)."""
        with self.where.doing("validation", "computing the validation loss"):
            oom.inject("validation", self.position.global_step)
            loss = self.validator.loss()
        self.reporter.emit(ValidationEnd(self.position.global_step, epoch_number, loss, per_epoch=per_epoch))

    def _step_saves_and_previews(self, epoch: int) -> None:
        """Saves and previews every N steps."""
        cfg, step = self.config, self.position.global_step
        if cfg.save_every_n_steps and step % cfg.save_every_n_steps == 0:  # the last step too, as sd-scripts
            with self.where.doing("saving", "saving the LoRA"):
                oom.inject("saving", step)
                self.writer.save_step(step, epoch + 1, self.reporter)
                if cfg.save_state:
                    self.save_state(self.writer.state_folder_for_step(step))
                    self.writer.rotate_states_for_step(step)
        if previews_due(cfg, step=step):
            self._sample(step=step)

    def _end_of_epoch(self, number: int, final: bool, stopped: bool) -> None:
        """After epoch `number` (1-based); the position already points at the next epoch's first batch."""
        cfg, every = self.config, self.writer.every_n_epochs
        if stopped:
            return
        with self._optimizer_evaluating():
            if self.validator is not None and self.validator.schedule.at_epoch_end(number):
                self._validate(number, per_epoch=True)
        if self.losses:
            self.reporter.emit(EpochEnd(number, self.position.global_step, self._average_loss()))
        with self._optimizer_evaluating():
            self._epoch_saves_and_previews(number, final, cfg, every)

    def _epoch_saves_and_previews(self, number: int, final: bool, cfg: TrainConfig, every: int | None) -> None:
        if every and number % every == 0 and not final:
            with self.where.doing("saving", "saving the LoRA"):
                self.writer.save_epoch(number, self.position.global_step, self.reporter)
                if cfg.save_state:
                    self.save_state(self.writer.state_folder_for_epoch(number))
                    self.writer.rotate_states_for_epoch(number)
        if previews_due(cfg, epoch=number):
            self._sample(epoch=number)

    def _saves_final_state(self, stopped: bool) -> bool:
        cfg = self.config
        return cfg.save_state or cfg.save_state_on_train_end or stopped

    def _finish(self, stopped: bool) -> Finished:
        """Save first (the LoRA is safe before any slow preview), then the previews of the finished LoRA."""
        s, step = self.session, self.position.global_step
        path = self._save_final_files(stopped)
        state_dict = None
        if s.world.is_main:
            dtype = SAVE_DTYPES[self.config.save_precision]
            state_dict = {k: v.detach().to("cpu", dtype, copy=True)
                          for k, v in s.network.kohya_state_dict(dtype).items()}
        if self.config.sample_at_end and not stopped and self.last_sampled != step:
            self._sample(step=step)
        s.network.eval()
        finished = Finished(path, step, stopped, tuple(self.losses), state_dict,
                            self.writer.last_metadata if s.world.is_main else None)
        self.reporter.emit(finished)
        return finished

    def _save_final_files(self, stopped: bool) -> Path | None:
        """The LoRA of the last step, and the resumable state a stopped run (or --save_state) keeps."""
        optimizer_eval_mode(self.session.optimizer)  # the LoRA saved from here on is the schedule-free evaluation point
        epochs_seen = self.position.epoch + (1 if self.position.next_batch else 0)
        with self.where.doing("saving", "saving the LoRA"):
            path = self.writer.save_final(self.position.global_step, epochs_seen, self.reporter)
            if self._saves_final_state(stopped):
                self.save_state(self.writer.final_state_folder())
        return path

    def save_after_out_of_memory(self, where: oom.Where) -> tuple[Path | None, Path | None, str]:
        """After out of memory, what a stop saves: the LoRA and a resumable state of the last good step. Returns
        (LoRA, state folder, why nothing was saved)."""
        step = self.position.global_step
        if where.optimizer_step:
            return None, None, (f"the optimizer step after step {step} was cut short, so the weights are half "
                                "updated; the files saved before are kept")
        if step == 0:
            return None, None, "no step was trained yet"
        self.session.optimizer.zero_grad(set_to_none=True)  # the failed step's partial gradients
        try:
            lora = self._save_final_files(stopped=True)
        except torch.OutOfMemoryError:
            return None, None, "saving ran out of memory too; the files saved before are kept"
        return lora, self.writer.final_state_folder() if self.session.world.is_main else None, ""

    # ------------------------------------------------------------------------------------------ previews

    def _sample(self, step: int | None = None, epoch: int | None = None) -> None:
        """Render the preview prompts; a stop request ends it between two prompts."""
        s = self.session
        if not s.prompts or not s.world.is_main or s.ae is None:
            return
        self.last_sampled = self.position.global_step
        folder = Path(self.config.output_dir) / "sample"
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
                path = folder / sample_filename(self.config.output_name, prompt.index, prompt.seed, epoch=epoch,
                                                step=step if epoch is None else None)
                image.save(path)
                paths.append(path)
                images.append(image)
                rendered.append(prompt)
        finally:
            s.ae.to(ae_device)
            s.flux.train()
            s.network.train()
        if paths:
            self.reporter.emit(Samples(step if step is not None else self.position.global_step, tuple(paths),
                                       tuple(images), prompts=tuple(p.prompt for p in rendered),
                                       indices=tuple(p.index for p in rendered)))
