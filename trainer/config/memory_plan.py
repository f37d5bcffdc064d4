"""The memory plan: from the free memory of the device, the row of sd-scripts' guide (24/16/12/10/8 GB) and the
settings that run today, with the explanation a user reads. Torch-free; the ComfyUI memory node's `auto` uses it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# The core refuses blocks_to_swap and cpu_offload_checkpointing on a GPU until their machinery lands (session.py
# _check_memory_options); the plan says what it would pick and picks what runs.
SWAP_RUNS_ON_GPU = False


@dataclass(frozen=True)
class MemoryPlan:
    """What `auto` picked from the free memory: the fields it sets, what it would set if block swap ran on a GPU,
    and the explanation shown on the node."""
    free_gib: float
    row: int | None  # the guide's table row (GB), None on the CPU or above the table
    fields: dict
    would: dict = field(default_factory=dict)
    lines: tuple[str, ...] = ()

    def text(self) -> str:
        return "\n".join(self.lines)


# the guide's table (sd-scripts README, FLUX.1 LoRA): card size -> what it needs
GUIDE_ROWS: tuple[tuple[int, dict, str], ...] = (
    (24, {}, "the base settings work (batch size 2 fits)"),
    (16, {"blocks_to_swap": 8}, "block swap (the guide names no count; 8 keeps about 2 GiB spare in our "
                                "reference measurements)"),
    (12, {"blocks_to_swap": 16, "optimizer_type": "AdamW8bit"}, "--blocks_to_swap 16 with 8-bit AdamW"),
    (10, {"blocks_to_swap": 22, "t5xxl_fp8": True}, "--blocks_to_swap 22 and T5-XXL in fp8"),
    (8, {"blocks_to_swap": 28, "t5xxl_fp8": True}, "--blocks_to_swap 28 and T5-XXL in fp8"),
)
BF16_BASE_GIB = 28  # measured peak 25.6 GiB at 1024² with a bf16 base and checkpointing (DESIGN.md)
FP8_PEAK_GIB = 14.6  # measured fp8 base + checkpointing at 1024² (13.1 at 512²)
ROW_SHARE = 0.9  # a card of N GB has somewhat less than N GiB free


def plan_memory(free_bytes: float, device_type: str = "cuda") -> MemoryPlan:
    """The memory node's `auto`: from the free memory, the guide's row and the settings that run today."""
    gib = free_bytes / 2**30
    base = {"gradient_checkpointing": True, "cpu_offload_checkpointing": False, "blocks_to_swap": None,
            "cache_latents": True, "cache_latents_to_disk": False, "cache_text_encoder_outputs": True,
            "cache_text_encoder_outputs_to_disk": False}
    if device_type == "cpu":
        return MemoryPlan(gib, None, {**base, "fp8_base": False}, {}, (
            f"auto: training on the CPU ({gib:.1f} GiB free RAM): nothing to move off a GPU; gradient checkpointing "
            "on, latents and text-encoder outputs cached in memory, bf16 base",))
    if gib >= BF16_BASE_GIB:
        return MemoryPlan(gib, None, {**base, "fp8_base": False}, {}, (
            f"auto: {gib:.1f} GiB free, more than the guide's largest row (24 GB): bf16 base (peak about 25.6 GiB "
            "at 1024² in our reference), gradient checkpointing, caches in memory",))
    row, would, why = next(((r, w, y) for r, w, y in GUIDE_ROWS if gib >= ROW_SHARE * r), GUIDE_ROWS[-1])
    fields_ = {**base, "fp8_base": True}
    lines = [f"auto: {gib:.1f} GiB free -> the guide's {row} GB row: {why}"
             + ("" if gib >= ROW_SHARE * row else " (below its smallest row: expect out-of-memory errors)")]
    swap = would.get("blocks_to_swap")
    if swap and SWAP_RUNS_ON_GPU:
        fields_["blocks_to_swap"] = swap
    elif swap:
        fits = FP8_PEAK_GIB < gib
        lines.append(f"would pick --blocks_to_swap {swap}, but this trainer refuses block swap on a GPU until its "
                     "machinery lands; running with fp8 base + gradient checkpointing instead (peak about "
                     f"{FP8_PEAK_GIB} GiB at 1024²): "
                     + ("it should fit" if fits else "more than is free: lower the resolution or expect an "
                        "out-of-memory error"))
    if "optimizer_type" in would:
        lines.append(f"the guide also uses {would['optimizer_type']}: choose it on the optimizer node")
    if would.get("t5xxl_fp8"):
        lines.append("the guide also keeps T5-XXL in fp8: turn on t5xxl_fp8 on the models node")
    lines.append("settings: fp8 base, gradient checkpointing, latents and text-encoder outputs cached in memory")
    return MemoryPlan(gib, row, fields_, dict(would), tuple(lines))
