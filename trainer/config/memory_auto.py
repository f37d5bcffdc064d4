"""`--memory auto` / the memory node's `auto`, decided once for both front ends: the plan for the datasets' largest
resolution x batch, minus what the user's own options rule out or already set. Torch-free."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .memory_plan import FLUX_DEV, MemoryPlan, TransformerSize, drop_impossible_caches, plan_memory


def allowed_settings(options: Mapping[str, Any]) -> dict[str, bool]:
    """What a plan or a step-down may turn on, given the user's options (name -> value): no fp8 base with
    `base_weights` (merged weights are not fp8) or `mixed_precision` "no"; no block swap with
    `cpu_offload_checkpointing` (two ways of moving the same blocks) or a cudagraphs-compiled model (its replays
    need fixed device addresses)."""
    no_fp8 = bool(options.get("base_weights")) or options.get("mixed_precision") == "no"
    no_swap = bool(options.get("cpu_offload_checkpointing")) or (
        bool(options.get("torch_compile")) and options.get("dynamo_backend") == "cudagraphs")
    return {"allow_fp8": not no_fp8, "allow_swap": not no_swap}


@dataclass(frozen=True)
class AutoMemory:
    plan: MemoryPlan
    fields: dict  # the TrainConfig fields the plan sets: none of them was given by the user
    notes: tuple[str, ...]  # the plan's explanation and what was left out, for the user


def auto_memory(free_bytes: float, device_type: str, *, datasets: Sequence, given: Mapping[str, Any],
                train_t5xxl: bool = False, size: TransformerSize = FLUX_DEV,
                host_free_bytes: float | None = None) -> AutoMemory:
    """`given`: the options the user set explicitly (name -> value). fp8 is left out with `base_weights` or
    `mixed_precision` "no" (fp8 needs a mixed precision, and merged base weights are not fp8); block swap with
    `cpu_offload_checkpointing` (they are two ways of moving the same blocks); with `host_free_bytes` no swap count
    whose pinned host memory exceeds it. Caches the plan would turn on are turned off where a dataset or
    a trained T5 changes what would be cached."""
    largest = max(datasets, key=lambda d: d.resolution[0] * d.resolution[1] * d.batch_size)
    allowed = allowed_settings(given)
    plan = plan_memory(free_bytes, device_type, resolution=tuple(largest.resolution), batch_size=largest.batch_size,
                       size=size, host_free_bytes=host_free_bytes, **allowed)
    fields = {name: value for name, value in plan.fields.items() if name not in given}
    if not allowed["allow_swap"]:
        fields.pop("blocks_to_swap", None)
    notes = drop_impossible_caches(fields, datasets, train_t5xxl)
    return AutoMemory(plan, fields, (*plan.lines, *notes))
