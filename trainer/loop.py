"""The training loop: one entry point, `train(config, reporter)`, for the CLI and the ComfyUI nodes alike.

Each sample's noise and timestep come from a generator seeded by (seed, step, position in the whole batch), so a
resumed run, or several processes splitting each batch, compute exactly what one uninterrupted process would.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch
from torch import Tensor

from . import flow
from .checkpoint import Position, load_state, save_state
from .config import TrainConfig
from .distributed import init_world, pick_device
from .events import Finished, Message, Reporter, Samples, Saved, StepEnd
from .saving import LoRAWriter
from .session import Session, prepare
from .sampling import generate, sample_filename, with_seed


class _TrainStep(torch.nn.Module):
    """What DistributedDataParallel wraps: only the LoRA network is registered (its gradients are synchronised);
    the frozen transformer is reached through the LoRA hooks, never copied or broadcast."""

    def __init__(self, session: Session):
        super().__init__()
        self.network = session.network
        self.__dict__["session"] = session

    def forward(self, batch, step: int) -> Tensor:
        return _loss(self.session, batch, step)


def train(config: TrainConfig, reporter: Reporter) -> Path | None:
    device = pick_device(config.device)
    world = init_world(device)
    session = prepare(config, reporter, world, device)
    return Loop(session, reporter).run()


def _sample_noise(session: Session, step: int, positions: list[int], shape: tuple,
                  posterior: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Per sample: the noise, the normal and uniform draws for its timestep, and (when latents are encoded now)
    the draw for sampling the autoencoder's posterior; each from its own generator."""
    noises, normals, uniforms, posteriors = [], [], [], []
    for position in positions:
        g = torch.Generator().manual_seed((session.seed * 1_000_003 + step * 65_537 + position) % 2**63)
        normals.append(torch.randn((), generator=g))
        uniforms.append(torch.rand((), generator=g))
        noises.append(torch.randn(shape, generator=g))
        if posterior:
            posteriors.append(torch.randn(shape, generator=g))
    return (torch.stack(noises), torch.stack(normals), torch.stack(uniforms),
            torch.stack(posteriors) if posterior else None)


def _text(session: Session, batch) -> tuple[Tensor, Tensor, Tensor | None]:
    """pooled [B, 768], T5 [B, L, 4096], T5 mask [B, L] for the batch: cached, or encoded now (with gradients
    through an encoder whose LoRA is being trained)."""
    device, apply_mask = session.device, session.config.apply_t5_attn_mask
    if batch.text is not None:
        pooled, hidden, mask = (t.to(device) for t in batch.text)
    else:
        with torch.set_grad_enabled(session.train_t5):
            ids, mask = session.t5.tokenize(batch.captions)
            hidden = session.t5(ids, mask if apply_mask else None)
        mask = mask.to(device)
        pooled = None
    if pooled is None or session.train_clip:
        with torch.set_grad_enabled(session.train_clip):
            pooled = session.clip_l.encode(batch.captions)
    return pooled, hidden, mask


def _loss(session: Session, batch, step: int) -> Tensor:
    cfg, device = session.config.flow, session.device
    encode_now = batch.latents is None
    if encode_now:
        b, _, height, width = batch.images.shape
        shape = (session.ae.params.z_channels, height // 8, width // 8)
    else:
        shape = tuple(batch.latents.shape[1:])
    noise, n, u, posterior = _sample_noise(session, step, batch.positions, shape, posterior=encode_now)
    if encode_now:
        with torch.no_grad():
            latents = session.ae.encode(batch.images.to(device), noise=posterior.to(device)).float()
    else:
        latents = batch.latents.to(device, torch.float32)
    b, _, h, w = latents.shape
    noise = noise.to(device)
    sigmas = flow.sample_sigmas(cfg, n, u, h, w).to(device)
    noisy = flow.noisy_latents(latents, noise, sigmas)
    pooled, hidden, mask = _text(session, batch)
    session.network.set_multiplier(batch.network_multiplier)
    dtype = session.weight_dtype
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        output = session.flux(flow.pack_latents(noisy).to(dtype), flow.image_ids(b, h, w, device=device),
                              hidden.to(dtype), flow.text_ids(b, hidden.shape[1], device=device), sigmas,
                              pooled.to(dtype), flow.guidance_vector(b, cfg.guidance_scale, device),
                              mask if session.config.apply_t5_attn_mask else None)
    output = flow.unpack_latents(output.float(), h, w)
    prediction, weighting = flow.apply_prediction_type(output, noisy, sigmas, cfg)
    alpha = None
    if batch.alpha_masks is not None:
        alpha = flow.alpha_mask_for_latents(batch.alpha_masks.to(device), h, w)
    return flow.batch_loss(prediction, flow.target(latents, noise, cfg), cfg, sigmas, weighting, alpha,
                           batch.loss_weights.to(device))


class Loop:
    def __init__(self, session: Session, reporter: Reporter):
        self.s = session
        self.reporter = reporter
        self.config = session.config
        self.step_module = _TrainStep(session)
        self.model = self.step_module
        if session.world.enabled:
            ids = [session.device.index] if session.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(  # module_dropout may skip a LoRA for a step
                self.step_module, device_ids=ids, find_unused_parameters=bool(self.config.network.module_dropout))
        self.scaler = torch.amp.GradScaler(session.device.type) if self.config.mixed_precision == "fp16" else None
        self.writer = LoRAWriter(session)
        self.losses: list[float] = []
        self.position = Position(global_step=0, epoch=0, next_batch=0)
        self.started = time.perf_counter()
        self.metrics = None
        self.last_sampled: int | None = None

    # ------------------------------------------------------------------------------------------ state

    def _parts(self) -> dict:
        import random as pyrandom

        parts = {"optimizer": self.s.optimizer.state_dict(), "scheduler": self.s.scheduler.state_dict(),
                 "torch_rng": torch.get_rng_state(), "python_rng": pyrandom.getstate(), "losses": self.losses,
                 "seed": self.s.seed}
        if torch.cuda.is_available():
            parts["cuda_rng"] = torch.cuda.get_rng_state_all()
        if self.scaler is not None:
            parts["scaler"] = self.scaler.state_dict()
        return parts

    def save_state(self, folder: Path) -> None:
        if self.s.world.is_main:
            save_state(folder, self.s.network.kohya_state_dict(torch.float32), self._parts(), self.position)
            self.reporter.emit(Saved(folder, "state", self.position.global_step))

    def resume(self, folder: Path) -> None:
        import random as pyrandom

        network, parts, position = load_state(folder)
        self.s.network.load_kohya(network)
        self.s.optimizer.load_state_dict(parts["optimizer"])
        self.s.scheduler.load_state_dict(parts["scheduler"])
        torch.set_rng_state(parts["torch_rng"])
        pyrandom.setstate(parts["python_rng"])
        if "cuda_rng" in parts and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(parts["cuda_rng"])
        if self.scaler is not None and "scaler" in parts:
            self.scaler.load_state_dict(parts["scaler"])
        if parts.get("seed") != self.s.seed:
            self.reporter.emit(Message(f"resume: the state was trained with seed {parts.get('seed')}, this run uses "
                                       f"{self.s.seed}; the continuation will differ from an uninterrupted run", "warning"))
        self.losses = list(parts["losses"])
        self.position = position
        self.reporter.emit(Message(f"resumed from {folder} at step {position.global_step} (epoch {position.epoch + 1})"))

    # ------------------------------------------------------------------------------------------ running

    def run(self) -> Path | None:
        cfg, s = self.config, self.s
        if cfg.resume:
            self.resume(Path(cfg.resume))
        self._open_metrics()
        self.reporter.emit(Message(
            f"training {len(s.network.loras)} LoRA layers for {s.total_steps} steps ({s.epochs} epochs of "
            f"{s.steps_per_epoch}), {len(s.datasets)} batches per epoch, device {s.device}"))
        if cfg.sample_at_first and self.position.global_step == 0:
            self._sample(step=0)
        s.flux.train()
        s.network.train()
        stopped = False
        for epoch in range(self.position.epoch, s.epochs):
            s.datasets.set_epoch(epoch)
            self.position.epoch = epoch
            stopped = self._train_epoch(epoch)
            if self.position.next_batch >= len(s.datasets):  # the epoch ran to its end
                self.position.epoch, self.position.next_batch = epoch + 1, 0
                done = self.position.global_step >= s.total_steps or epoch + 1 == s.epochs
                self._end_of_epoch(epoch + 1, final=done)
            if stopped or self.position.global_step >= s.total_steps:
                break
        return self._finish(stopped)

    def _train_epoch(self, epoch: int) -> bool:
        """Train from `position.next_batch` to the end of the epoch (or the last step); True if asked to stop."""
        s, accumulation = self.s, self.config.gradient_accumulation_steps
        micro, micro_losses = 0, 0.0
        for index in range(self.position.next_batch, len(s.datasets)):
            sync = (micro + 1) % accumulation == 0 or index == len(s.datasets) - 1
            step = self.position.global_step
            batch = s.datasets.batch(index, step, s.total_steps, (s.world.rank, s.world.size))
            no_sync = self.model.no_sync() if (s.world.enabled and not sync) else contextlib.nullcontext()
            with no_sync:
                loss = self.model(batch, step)
                scaled = loss / accumulation
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            micro_losses += loss.detach().item()
            micro += 1
            if not sync:
                continue
            self._optimizer_step()
            self.position.global_step += 1
            self.position.next_batch = index + 1
            self._after_step(micro_losses / micro, epoch)
            micro, micro_losses = 0, 0.0
            if self.reporter.should_stop():
                return True
            if self.position.global_step >= s.total_steps:
                return False
        return False

    def _optimizer_step(self) -> None:
        cfg, s = self.config, self.s
        params = [p for group in s.optimizer.param_groups for p in group["params"]]
        if self.scaler is not None:
            self.scaler.unscale_(s.optimizer)
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(s.optimizer)
            self.scaler.update()
        else:
            s.optimizer.step()
        s.scheduler.step()
        s.optimizer.zero_grad(set_to_none=True)

    def _after_step(self, loss: float, epoch: int) -> None:
        cfg, s, step = self.config, self.s, self.position.global_step
        self.losses.append(loss)
        window = self.losses[-50:]
        lr = s.optimizer.param_groups[0].get("lr") or 0.0
        self.reporter.emit(StepEnd(step, s.total_steps, epoch + 1, loss, sum(window) / len(window), float(lr),
                                   time.perf_counter() - self.started))
        self._log_metrics({"step": step, "epoch": epoch + 1, "loss": loss, "average_loss": sum(window) / len(window),
                           "lr": float(lr)})
        if cfg.save_every_n_steps and step % cfg.save_every_n_steps == 0 and step < s.total_steps:
            self.writer.save_step(step, epoch + 1, self.reporter)
            if cfg.save_state:
                self.save_state(self.writer.state_folder_for_step(step))
                self.writer.rotate_states_for_step(step)
        if cfg.sample_every_n_steps and step % cfg.sample_every_n_steps == 0:
            self._sample(step=step)

    def _end_of_epoch(self, number: int, final: bool) -> None:
        """After epoch `number` (1-based); the position already points at the next epoch's first batch."""
        cfg = self.config
        if cfg.save_every_n_epochs and number % cfg.save_every_n_epochs == 0 and not final:
            self.writer.save_epoch(number, self.position.global_step, self.reporter)
            if cfg.save_state:
                self.save_state(self.writer.state_folder_for_epoch(number))
                self.writer.rotate_states_for_epoch(number)
        if cfg.sample_every_n_epochs and number % cfg.sample_every_n_epochs == 0:
            self._sample(epoch=number)

    def _finish(self, stopped: bool) -> Path | None:
        s, cfg = self.s, self.config
        if self.last_sampled != self.position.global_step:
            self._sample(step=self.position.global_step)  # previews of the finished LoRA
        epochs_seen = self.position.epoch + (1 if self.position.next_batch else 0)
        path = self.writer.save_final(self.position.global_step, epochs_seen, self.reporter)
        if cfg.save_state_on_train_end or stopped or (cfg.save_state and not cfg.save_every_n_epochs and not cfg.save_every_n_steps):
            self.save_state(self.writer.final_state_folder())
        if self.metrics:
            self.metrics.close()
        self.reporter.emit(Finished(path, self.position.global_step, stopped, tuple(self.losses)))
        s.network.eval()
        return path

    # ------------------------------------------------------------------------------------------ previews and logs

    def _sample(self, step: int | None = None, epoch: int | None = None) -> None:
        s = self.s
        if not s.prompts or not s.world.is_main or s.ae is None:
            return
        self.last_sampled = self.position.global_step
        folder = Path(self.config.output_dir) / "sample"
        folder.mkdir(parents=True, exist_ok=True)
        ae_device = next(s.ae.parameters()).device
        s.ae.to(s.device)
        s.flux.eval()
        s.network.eval()
        paths, images = [], []
        try:
            for prompt, (cond, negative) in zip(s.prompts, s.prompt_conds):
                prompt = with_seed(prompt, s.seed + prompt.index)
                image = generate(s.flux, s.ae, cond, prompt, negative, s.device, s.weight_dtype)
                path = folder / sample_filename(self.config.output_name, prompt.index, prompt.seed, epoch=epoch,
                                                step=step if epoch is None else None)
                image.save(path)
                paths.append(path)
                images.append(image)
        finally:
            s.ae.to(ae_device)
            s.flux.train()
            s.network.train()
        self.reporter.emit(Samples(step if step is not None else self.position.global_step, tuple(paths), tuple(images)))

    def _open_metrics(self) -> None:
        if not self.s.world.is_main:
            return
        folder = Path(self.config.logging_dir or self.config.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        self.metrics = open(folder / f"{self.config.name}_metrics.jsonl", "a", encoding="utf-8")
        self.tensorboard = None
        if self.config.log_with in ("tensorboard", "all"):
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(str(folder / "tensorboard"))
            except ImportError:
                self.reporter.emit(Message("log_with tensorboard: tensorboard is not installed; metrics go to the "
                                           "jsonl file only", "warning"))

    def _log_metrics(self, values: dict) -> None:
        if self.metrics:
            self.metrics.write(json.dumps(values) + "\n")
            self.metrics.flush()
        if getattr(self, "tensorboard", None):
            for key in ("loss", "average_loss", "lr"):
                self.tensorboard.add_scalar(key, values[key], values["step"])
