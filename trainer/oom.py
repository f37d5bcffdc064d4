"""Out of memory, handled: a `torch.OutOfMemoryError` in any phase of a run (loading, caching, a training step,
previews, validation, saving) becomes one `OutOfMemoryError` (a TrainerError) whose message says where it happened,
what was resident, peak and free memory and the setting to change; the LoRA and a resumable state of the last good
step are saved first and the device memory is given back. `leaner_config` is what `--memory auto` continues with.

`inject` is the test hook: FLUX_TRAINER_FAULT_OOM="<phase>@<step>[*<times>]" raises torch.OutOfMemoryError when the
run reaches that phase at that step (a step's number while it trains; the last finished step for previews,
validation and saving; 0 while loading and caching), the first <times> times (1) in this process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import traceback
from dataclasses import dataclass

import torch

from .config import TrainConfig, resolve_datasets
from .config.memory_auto import allowed_settings
from .config.memory_plan import GIB, TransformerSize, available_host_bytes, leaner_options, step_down
from .errors import OutOfMemoryError

PHASES = ("loading", "caching", "step", "previews", "validation", "saving")
FAULT_ENV = "FLUX_TRAINER_FAULT_OOM"
_injected: dict[str, int] = {}  # fault spec -> times it fired in this process


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
    base = "fp8" if config.fp8_base or config.fp8_base_unet else str(session.weight_dtype).removeprefix("torch.")
    swap = f"{config.blocks_to_swap} blocks swapped" if config.blocks_to_swap else "no blocks swapped"
    check = ("CPU-offloaded checkpointing" if config.cpu_offload_checkpointing else
             "gradient checkpointing" if config.gradient_checkpointing else "no gradient checkpointing")
    parts = [f"transformer ({base} weights, {swap}, {check}) on {device}"]
    encoders = [name for name, model in (("CLIP-L", session.clip_l), ("T5-XXL", session.t5)) if model is not None]
    parts.append(f"{' and '.join(encoders)} loaded" if encoders else "text encoders freed (their outputs cached)")
    if session.ae is not None:
        parts.append(f"autoencoder on {next(session.ae.parameters()).device}")
    parts.append(f"LoRA of {len(session.network.loras)} layers")
    return ", ".join(parts)


def _allowed(config: TrainConfig) -> dict:
    return allowed_settings({name: getattr(config, name) for name in (
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
        return TransformerSize.of(read_flux_params(config.pretrained_model_name_or_path))
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
        lora, state, why_not = loop.save_after_out_of_memory(where)
        give_back(device)
    else:
        why_not = "nothing was trained yet"
    figures, usable = memory_figures(device)
    resolution, batch = _shape(config)
    fp8 = config.fp8_base or config.fp8_base_unet
    options = leaner_options(usable, config.blocks_to_swap, fp8, resolution=resolution, batch_size=batch,
                             size=_size(config), host_free_bytes=available_host_bytes() if device.type == "cuda"
                             else None, **_allowed(config))
    if state is not None:
        kept = (f"Saved: the LoRA of step {step} ({lora}) and a resumable state ({state}): add --resume {state} "
                f"to the changed command line to go on from step {step}.")
    else:
        kept = f"Nothing new was saved: {why_not}."
    text = (f"out of memory while {phase}. Resident: {resident(config, session, device)}. Memory: {figures}. "
            f"Next: {options}. {kept} The device memory was given back. (torch: {torch_text})")
    seed = session.seed if session is not None else config.seed
    return OutOfMemoryError(text, phase=phase, step=step, lora=lora, state=state, seed=seed)


def leaner_config(config: TrainConfig, error: OutOfMemoryError) -> tuple[TrainConfig, str] | None:
    """`--memory auto` after an out-of-memory error: the config one setting leaner, continuing from the saved state
    of the last good step (or from the start when nothing was trained), and what changed; None when nothing leaner
    is left, or trained steps could not be saved."""
    if error.state is None and error.step > 0:
        return None
    fp8 = config.fp8_base or config.fp8_base_unet
    change = step_down(config.blocks_to_swap, fp8, size=_size(config),
                       host_free_bytes=available_host_bytes() if config.device != "cpu" else None, **_allowed(config))
    if change is None:
        return None
    fields, what = change
    fields["seed"] = error.seed if error.seed is not None else config.seed
    if error.state is not None:
        fields.update(resume=str(error.state), initial_step=None, initial_epoch=None, skip_until_initial_step=False,
                      sample_at_first=False)
    where = f"from step {error.step}" if error.state is not None else "from the start (nothing was trained yet)"
    return dataclasses.replace(config, **fields), (f"out of memory while {error.phase}: memory auto continues "
                                                    f"{where} with {what}")
