"""Out of memory, handled: a `torch.OutOfMemoryError` in any phase of a run (loading, caching, a training step,
previews, validation, saving) becomes one `OutOfMemoryError` (a TrainerError) whose message says where it happened,
what was resident, peak and free memory and the setting to change; the LoRA and a resumable state of the last good
step are saved first and the device memory is given back. `stepping_down` is `--memory auto`'s way on: the run
again with `leaner_config`, one setting leaner.

`inject` is the test hook: FLUX_TRAINER_FAULT_OOM="<phase>@<step>[*<times>]" raises torch.OutOfMemoryError when the
run reaches that phase at that step (a step's number while it trains; the last finished step for previews,
validation and saving; 0 while loading and caching), the first <times> times (1) in this process.
"""

from __future__ import annotations

import contextlib
import gc
import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from .config import TrainConfig, resolve_datasets
from .config.memory_auto import allowed_settings
from .config.memory_plan import GIB, TransformerSize, available_host_bytes, leaner_options, step_down
from .errors import OutOfMemoryError
from .events import Message

PHASES = ("loading", "caching", "step", "previews", "validation", "saving")
FAULT_ENV = "FLUX_TRAINER_FAULT_OOM"
_injected: dict[str, int] = {}  # fault spec -> times it fired in this process
T = TypeVar("T")


@dataclass
class Where:
    """What the run is doing: `kind` one of PHASES, `phase` in words; `optimizer_step` while the weights and the
    optimizer's state change (a half-done step is not saved)."""
    kind: str = "loading"
    phase: str = "loading the models"
    optimizer_step: bool = False

    def enter(self, kind: str, phase: str) -> None:
        self.kind, self.phase = kind, phase

    @contextlib.contextmanager
    def doing(self, kind: str, phase: str):
        """`kind` and `phase` inside the block; the phase before it after (not after an error: its handler reads
        where it happened)."""
        before = self.kind, self.phase
        self.enter(kind, phase)
        yield
        self.kind, self.phase = before


def inject(kind: str, step: int) -> None:
    """Raise torch.OutOfMemoryError here if FLUX_TRAINER_FAULT_OOM asks for this phase and step."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    what, _, rest = spec.partition("@")
    at, _, times = rest.partition("*")
    if what not in PHASES or not at.isdigit() or not (times or "1").isdigit():
        raise ValueError(f"{FAULT_ENV}={spec!r}: expected <phase>@<step>[*<times>], phase one of {', '.join(PHASES)}")
    if what == kind and int(at) == step and _injected.get(spec, 0) < int(times or 1):
        _injected[spec] = _injected.get(spec, 0) + 1
        raise torch.OutOfMemoryError(f"CUDA out of memory (injected by {FAULT_ENV}={spec})")


def give_back(device: torch.device) -> None:
    """Free what nothing references any more and hand the cached device memory back (ComfyUI goes on)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def memory_figures(device: torch.device) -> tuple[str, float | None]:
    """("peak X GiB allocated, Y GiB free of Z GiB", the bytes a new run could use) on CUDA; unknown elsewhere."""
    if device.type != "cuda":
        return f"peak and free memory unknown (on {device.type}, torch does not count them)", None
    peak = torch.cuda.max_memory_allocated(device)
    free, total = torch.cuda.mem_get_info(device)
    usable = free + torch.cuda.memory_reserved(device)  # what this run holds is free again once it ends
    return (f"peak {peak / GIB:.1f} GiB allocated, {free / GIB:.1f} GiB free of {total / GIB:.1f} GiB "
            f"({usable / GIB:.1f} GiB once this run's memory is given back)"), usable


def resident(config: TrainConfig, session, device: torch.device) -> str:
    """What the run held on the device, in words."""
    if session is None:
        return f"the models loaded so far for a run on {device}"
    memory = config.memory
    base = "fp8" if memory.fp8 else str(session.weight_dtype).removeprefix("torch.")
    swap = f"{memory.blocks_to_swap} blocks swapped" if memory.blocks_to_swap else "no blocks swapped"
    check = ("CPU-offloaded checkpointing" if memory.cpu_offload_checkpointing else
             "gradient checkpointing" if memory.gradient_checkpointing else "no gradient checkpointing")
    parts = [f"transformer ({base} weights, {swap}, {check}) on {device}"]
    encoders = [name for name, model in (("CLIP-L", session.clip_l), ("T5-XXL", session.t5)) if model is not None]
    parts.append(f"{' and '.join(encoders)} loaded" if encoders else "text encoders freed (their outputs cached)")
    if session.ae is not None:
        parts.append(f"autoencoder on {next(session.ae.parameters()).device}")
    parts.append(f"LoRA of {len(session.network.loras)} layers")
    return ", ".join(parts)


def _allowed(config: TrainConfig) -> dict:
    return allowed_settings({name: config.flags()[name] for name in (
        "base_weights", "mixed_precision", "cpu_offload_checkpointing", "torch_compile", "dynamo_backend")})


def _shape(config: TrainConfig) -> tuple[tuple[int, int], int]:
    try:
        largest = max(resolve_datasets(config), key=lambda d: d.resolution[0] * d.resolution[1] * d.batch_size)
        return tuple(largest.resolution), largest.batch_size
    except Exception:  # the suggestion is a courtesy: a dataset that cannot be read again keeps the default shape
        return (1024, 1024), 1


def _size(config: TrainConfig) -> TransformerSize:
    from .config.memory_plan import FLUX_DEV
    from .models import read_flux_params

    try:
        return TransformerSize.of(read_flux_params(config.models.pretrained_model_name_or_path))
    except Exception:
        return FLUX_DEV


def _where_text(where: Where, step: int, total: int | None) -> str:
    if where.kind == "step":
        return f"training step {step + 1}" + (f" of {total}" if total else "")
    if where.kind in ("loading", "caching"):
        return where.phase
    return f"{where.phase} after step {step}"


def handled(error: BaseException, where: Where, config: TrainConfig, device: torch.device, session=None,
            loop=None) -> OutOfMemoryError:
    """The OutOfMemoryError that replaces torch's: the failed step's memory given back, the last good step saved."""
    torch_text = str(error).strip().splitlines()[0] if str(error).strip() else "out of memory"
    traceback.clear_frames(error.__traceback__)  # the frames hold the failed step's activations
    error.__traceback__ = None
    give_back(device)
    step = loop.position.global_step if loop is not None else 0
    total = session.total_steps if session is not None else None
    phase = _where_text(where, step, total)
    lora = state = None
    if loop is not None:
        lora, state, why_not = _save_last_good_step(loop, where)
        give_back(device)
    else:
        why_not = "nothing was trained yet"
    figures, usable = memory_figures(device)
    resolution, batch = _shape(config)
    fp8 = config.memory.fp8_base or config.memory.fp8_base_unet
    options = leaner_options(usable, config.memory.blocks_to_swap, fp8, resolution=resolution, batch_size=batch,
                             size=_size(config), host_free_bytes=available_host_bytes() if device.type == "cuda"
                             else None, **_allowed(config))
    if state is not None:
        kept = (f"Saved: the LoRA of step {step} ({lora}) and a resumable state ({state}): add --resume {state} "
                f"to the changed command line to go on from step {step}.")
    else:
        kept = f"Nothing new was saved: {why_not}."
    text = (f"out of memory while {phase}. Resident: {resident(config, session, device)}. Memory: {figures}. "
            f"Next: {options}. {kept} The device memory was given back. (torch: {torch_text})")
    seed = session.seed if session is not None else config.run.seed
    return OutOfMemoryError(text, phase=phase, step=step, lora=lora, state=state, seed=seed)


def _save_last_good_step(loop, where: Where) -> tuple[Path | None, Path | None, str]:
    """After out of memory, what a stop saves: the LoRA and a resumable state of the last good step. Returns
    (LoRA, state folder, why nothing was saved)."""
    step = loop.position.global_step
    if where.optimizer_step:
        return None, None, (f"the optimizer step after step {step} was cut short, so the weights are half "
                            "updated; the files saved before are kept")
    if step == 0:
        return None, None, "no step was trained yet"
    loop.session.optimizer.zero_grad(set_to_none=True)  # the failed step's partial gradients
    try:
        lora = loop.save_final_files(stopped=True)
    except torch.OutOfMemoryError:
        return None, None, "saving ran out of memory too; the files saved before are kept"
    return lora, loop.writer.final_state_folder() if loop.session.world.is_main else None, ""


def stepping_down(config: TrainConfig, run_once: Callable[[TrainConfig], T], step_down: bool,
                  emit: Callable[[Message], None]) -> T:
    """`run_once(config)`; with `step_down` (--memory auto) an OutOfMemoryError runs it again one setting leaner
    (`leaner_config`), saying what changed, until it finishes or nothing leaner is left."""
    while True:
        try:
            return run_once(config)
        except OutOfMemoryError as e:
            leaner = leaner_config(config, e) if step_down else None
            if leaner is None:
                raise
            config, change = leaner
            emit(Message(change, "warning"))


def leaner_config(config: TrainConfig, error: OutOfMemoryError) -> tuple[TrainConfig, str] | None:
    """`--memory auto` after an out-of-memory error: the config one setting leaner, continuing from the saved state
    of the last good step (or from the start when nothing was trained), and what changed; None when nothing leaner
    is left, or trained steps could not be saved."""
    if error.state is None and error.step > 0:
        return None
    memory = config.memory
    change = step_down(memory.blocks_to_swap, memory.fp8, size=_size(config),
                       host_free_bytes=available_host_bytes() if memory.device != "cpu" else None, **_allowed(config))
    if change is None:
        return None
    fields, what = change
    fields["seed"] = error.seed if error.seed is not None else config.run.seed
    if error.state is not None:
        fields.update(resume=str(error.state), initial_step=None, initial_epoch=None, skip_until_initial_step=False,
                      sample_at_first=False)
    where = f"from step {error.step}" if error.state is not None else "from the start (nothing was trained yet)"
    return config.with_flags(**fields), (f"out of memory while {error.phase}: memory auto continues {where} "
                                         f"with {what}")
