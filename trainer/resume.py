"""Where a run starts: the state folder --resume names (the LoRA, optimizer, schedule, random states and loss
scaler restored into the session's objects), then --initial_step / --initial_epoch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .checkpoint import Position, load_state, network_shapes, restore_rng, restoring
from .config import canonical_optimizer
from .config.sections import RunConfig
from .errors import ConfigError
from .events import Message, Reporter


@dataclass(frozen=True)
class Resumed:
    """What a state folder gives the loop besides the restored objects."""
    position: Position
    losses: tuple[float, ...]
    written: tuple  # the step/epoch saves the training it continues wrote (the writer adopts the plain names)


def restore(folder: Path, session, scaler, reporter: Reporter) -> Resumed:
    """Load the state saved in `folder` into the session's network, optimizer and scheduler, the random states and
    `scaler` (fp16 loss scaling, or None)."""
    network, parts, position = load_state(
        folder, network_shapes(session.network),
        optimizer=canonical_optimizer(session.config.optimizer.optimizer_type),
        warn=lambda text: reporter.emit(Message(text, "warning")))
    with restoring(folder, "LoRA"):
        session.network.load_kohya(network)
    with restoring(folder, "optimizer"):
        session.optimizer.load_state_dict(parts["optimizer"])
    with restoring(folder, "scheduler"):
        session.scheduler.load_state_dict(parts["scheduler"])
    restore_rng(parts, folder)
    if scaler is not None and "scaler" in parts:
        with restoring(folder, "loss scaler"):
            scaler.load_state_dict(parts["scaler"])
    if parts.get("seed") != session.seed:
        reporter.emit(Message(f"resume: the state was trained with seed {parts.get('seed')}, this run uses "
                              f"{session.seed}; the continuation will differ from an uninterrupted run", "warning"))
    reporter.emit(Message(f"resumed from {folder} at step {position.global_step} (epoch {position.epoch + 1})"))
    return Resumed(position, tuple(parts["losses"]), tuple(parts.get("written", [])))


def initial_position(run: RunConfig, resumed_step: int | None, steps_per_epoch: int, total_steps: int,
                     batches: int, accumulation: int) -> tuple[Position, Message | None, Message]:
    """--initial_step N / --initial_epoch E (step (E-1) x steps per epoch): with --skip_until_initial_step the run
    starts at step N itself, its batches before N skipped, so it sees the data an uninterrupted run would; without
    it, at the start of the epoch that holds step N. Either replaces a resumed state's step (`resumed_step`, None
    when nothing was resumed); the learning-rate schedule is not advanced (it is the resumed state's, or starts
    from its beginning). Returns the position, the warning about the replaced step, and what the run says."""
    step = run.initial_step if run.initial_step is not None else (run.initial_epoch - 1) * steps_per_epoch
    if step >= total_steps:
        raise ConfigError(f"initial_step {step}: must be below the run's {total_steps} training steps "
                          "(--max_train_steps)")
    replaced = (Message(f"initial_step {step} replaces the resumed state's step {resumed_step}", "warning")
                if resumed_step is not None else None)
    epoch = step // steps_per_epoch
    if run.skip_until_initial_step:
        within = step - epoch * steps_per_epoch
        batch = min(within * accumulation, batches)
        return (Position(global_step=step, epoch=epoch, next_batch=batch), replaced,
                Message(f"skipping {step} steps: training starts at step {step + 1} (epoch {epoch + 1}, batch "
                        f"{batch + 1})"))
    return (Position(global_step=epoch * steps_per_epoch, epoch=epoch, next_batch=0), replaced,
            Message(f"initial step {step}: training starts with epoch {epoch + 1} at step "
                    f"{epoch * steps_per_epoch + 1}; --skip_until_initial_step starts at step {step + 1} itself"))
