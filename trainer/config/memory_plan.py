"""The memory plan: from the free memory of the device, the training resolution and batch and the transformer's
size, the fastest settings whose estimated peak fits, with the explanation a user reads. Torch-free; the CLI's
`--memory auto` and the ComfyUI memory node's `auto` use it.

The estimate: the transformer's resident weights (all of them, less the blocks swapped out, plus the block-swap
slots) at 2 bytes a weight (bf16) or 1 (fp8), plus what training adds with gradient checkpointing, which grows with
the pixels of a batch. Its two constants come from the reference measurements (FLUX.1-dev, LoRA rank 16 on every
block Linear, AdamW, batch 1, one GPU; DESIGN.md): 25.6 GiB at 1024² and 24.0 GiB at 512² with a bf16 base, 14.6
and 13.1 with an fp8 base, 15.1 with 18 blocks swapped, 9.4 with fp8 and 18 swapped; the estimate is within 3% of
each (tests/test_memory_plan.py). Order of preference, fastest first (the reference's timings): bf16 base, fp8 base,
fp8 base with the fewest swapped blocks that fit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError
from .swap_split import MAX_SWAPPED_BLOCKS, freed_blocks

GIB = 2**30
# what training adds at batch 1 with gradient checkpointing, in GiB: FIXED + PER_MEGAPIXEL_SQUARE · (w·h / 1024²)
FIXED_GIB = 1.43
PER_1024_SQUARE_GIB = 2.13
HEADROOM_GIB = 0.8  # the CUDA context and allocator slack that the measured peaks do not count
T5_FP8_BELOW_GIB = 12.0  # T5-XXL takes 9.5 GB in bf16 while it encodes: below this, keep it in fp8
SWAP_SLOTS = 2  # device slots per block kind of trainer/block_swap.py (they come out of the swapped blocks)


@dataclass(frozen=True)
class TransformerSize:
    """Parameter counts of a FLUX transformer: one double block, one single block, how many of each, the rest."""
    double_block: int
    single_block: int
    double_count: int
    single_count: int
    other: int

    @classmethod
    def of(cls, params) -> "TransformerSize":
        """From FluxParams (or anything with its fields): the same arithmetic as the layers' shapes."""
        counts = getattr(params, "parameter_counts", None)
        if counts is not None:  # Chroma: no modulation layers; the approximator instead of FLUX's embedders
            double, single, other = counts()
            return cls(double, single, params.depth, params.depth_single_blocks, other)
        h, mlp, ctx = params.hidden_size, params.mlp_hidden_dim, params.context_in_dim
        bias = 1 if params.qkv_bias else 0
        head = h // params.num_heads
        stream = (h * 3 * h + 3 * h * bias + h * h + h + h * mlp + mlp + mlp * h + h + h * 6 * h + 6 * h
                  + 2 * head)  # qkv, proj, mlp in/out, modulation, q/k norm scales
        double = 2 * stream
        single = (h * (3 * h + mlp) + 3 * h + mlp + (h + mlp) * h + h + h * 3 * h + 3 * h + 2 * head)
        embed = 256 * h + h + h * h + h  # time_in
        embed += params.vec_in_dim * h + h + h * h + h  # vector_in
        embed += (256 * h + h + h * h + h) if params.guidance_embed else 0
        other = embed + params.in_channels * h + h + ctx * h + h + h * 2 * h + 2 * h + h * params.out_channels \
            + params.out_channels
        return cls(double, single, params.depth, params.depth_single_blocks, other)

    @property
    def total(self) -> int:
        return self.double_block * self.double_count + self.single_block * self.single_count + self.other


# FLUX.1-dev (hidden 3072, 19 double + 38 single blocks, guidance embedding): 11.9 B parameters
FLUX_DEV = TransformerSize(double_block=339_831_296, single_block=141_591_808, double_count=19, single_count=38,
                           other=64_124_992)


# Chroma1-Base/HD (FLUX.1-schnell's blocks without modulation layers, the 5-layer approximator): 8.9 B parameters
CHROMA_1 = TransformerSize(double_block=226_548_224, single_block=113_271_040, double_count=19, single_count=38,
                           other=291_267_648)


def swapped_blocks(blocks_to_swap: int, size: TransformerSize, slots: int = SWAP_SLOTS) -> tuple[int, int]:
    """The blocks' worth of memory that leaves the device, per kind. sd-scripts' split of --blocks_to_swap N is
    N // 2 double and (N - N // 2) · 2 single blocks; trainer/block_swap.py streams `slots` more of each kind through
    that many device slots (at most all blocks but one of a kind), so the device holds what it holds in sd-scripts
    except where that cap bites (the top counts)."""
    return tuple(max(streamed - min(slots, streamed), 0) for streamed in streamed_blocks(blocks_to_swap, size, slots))


def streamed_blocks(blocks_to_swap: int, size: TransformerSize, slots: int = SWAP_SLOTS) -> tuple[int, int]:
    """The blocks block swap streams through its slots, per kind: each has its weights in host memory."""
    double, single = (min(wanted + slots, count - 1) if wanted else 0
                      for wanted, count in zip(freed_blocks(blocks_to_swap), (size.double_count, size.single_count)))
    return double, single


def pinned_host_bytes(blocks_to_swap: int | None, fp8: bool = False, size: TransformerSize = FLUX_DEV) -> int:
    """The host memory block swap pins: the weights of every block it streams, at 2 bytes a weight (1 in fp8).
    FLUX.1-dev with 35 blocks swapped: 22.7 GB in bf16, 11.4 GB in fp8."""
    double, single = streamed_blocks(blocks_to_swap or 0, size)
    return (double * size.double_block + single * size.single_block) * (1 if fp8 else 2)


def available_host_bytes(meminfo: str = "/proc/meminfo") -> int | None:
    """The host memory a new allocation can get without swapping (the kernel's MemAvailable); None where the
    kernel does not say (not Linux)."""
    try:
        with open(meminfo, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_pinned_host_memory(blocks_to_swap: int | None, fp8: bool, size: TransformerSize,
                             device_type: str = "cuda", available: int | None = None) -> None:
    """Refuse --blocks_to_swap N before anything loads when the host memory it pins is not free (`available`:
    MemAvailable unless given). On the CPU nothing is pinned."""
    if not blocks_to_swap or device_type != "cuda":
        return
    available = available_host_bytes() if available is None else available
    pinned = pinned_host_bytes(blocks_to_swap, fp8, size)
    if available is None or pinned <= available:
        return
    fitting = max((n for n in range(1, blocks_to_swap) if pinned_host_bytes(n, fp8, size) <= available), default=0)
    raise ConfigError(f"blocks_to_swap {blocks_to_swap}: block swap pins {pinned / GIB:.1f} GiB of host memory for "
                      f"the swapped blocks' {'fp8' if fp8 else 'bf16'} weights, and {available / GIB:.1f} GiB is "
                      "available (MemAvailable): "
                      + (f"--blocks_to_swap {fitting} fits, " if fitting else "")
                      + ("" if fp8 else "--fp8_base halves it, ") + "or free host memory")


def estimate_peak_gib(size: TransformerSize = FLUX_DEV, fp8: bool = False, blocks_to_swap: int = 0,
                      resolution: tuple[int, int] = (1024, 1024), batch_size: int = 1) -> float:
    """The training peak with gradient checkpointing, in GiB (what torch's allocator reports, without headroom)."""
    double, single = swapped_blocks(blocks_to_swap, size)
    resident = size.total - double * size.double_block - single * size.single_block
    weights = resident * (1 if fp8 else 2) / GIB
    pixels = resolution[0] * resolution[1] * batch_size / 1024**2
    return weights + FIXED_GIB + PER_1024_SQUARE_GIB * pixels


@dataclass(frozen=True)
class MemoryPlan:
    """What `auto` picked: the fields it sets, the guide's suggestions it leaves to the user (`would`), the estimated
    peak and the explanation shown to the user."""
    free_gib: float
    row: int | None  # the guide's table row (GB), None on the CPU or above the table
    fields: dict
    would: dict = field(default_factory=dict)
    lines: tuple[str, ...] = ()
    estimate_gib: float | None = None

    def text(self) -> str:
        return "\n".join(self.lines)


# the guide's table (sd-scripts README, FLUX.1 LoRA): card size -> what it uses
GUIDE_ROWS: tuple[tuple[int, dict, str], ...] = (
    (24, {}, "the base settings (fp8 base, batch size 2 fits)"),
    (16, {"blocks_to_swap": 8}, "block swap (the guide names no count)"),
    (12, {"blocks_to_swap": 16, "optimizer_type": "AdamW8bit"}, "--blocks_to_swap 16 with 8-bit AdamW"),
    (10, {"blocks_to_swap": 22, "t5xxl_fp8": True}, "--blocks_to_swap 22 and T5-XXL in fp8"),
    (8, {"blocks_to_swap": 28, "t5xxl_fp8": True}, "--blocks_to_swap 28 and T5-XXL in fp8"),
)
ROW_SHARE = 0.9  # a card of N GB has somewhat less than N GiB free
MAX_SWAP = MAX_SWAPPED_BLOCKS


def plan_memory(free_bytes: float, device_type: str = "cuda", *, resolution: tuple[int, int] = (1024, 1024),
                batch_size: int = 1, size: TransformerSize = FLUX_DEV, allow_fp8: bool = True,
                allow_swap: bool = True, host_free_bytes: float | None = None) -> MemoryPlan:
    """The fastest settings whose estimated peak fits the free memory, and why. `allow_fp8` / `allow_swap` False
    leave out what the user's other options rule out (base_weights or no mixed precision; CPU-offloaded
    checkpointing). With `host_free_bytes` (available_host_bytes(): what the host, or ComfyUI's process, leaves) no
    block-swap count whose pinned host memory exceeds it is picked."""
    gib = free_bytes / 2**30
    base = {"gradient_checkpointing": True, "cpu_offload_checkpointing": False, "blocks_to_swap": None,
            "cache_latents": True, "cache_latents_to_disk": False, "cache_text_encoder_outputs": True,
            "cache_text_encoder_outputs_to_disk": False}
    shape = f"{resolution[0]}x{resolution[1]}, batch {batch_size}"
    if device_type == "cpu":
        return MemoryPlan(gib, None, {**base, "fp8_base": False}, {}, (
            f"auto: training on the CPU ({gib:.1f} GiB free RAM): nothing to move off a GPU; gradient checkpointing "
            "on, latents and text-encoder outputs cached in memory, bf16 base",))
    budget = gib - HEADROOM_GIB
    fp8_choices = (False, True) if allow_fp8 else (False,)
    candidates = [(fp8, 0) for fp8 in fp8_choices]
    if allow_swap:
        candidates += [(fp8_choices[-1], n) for n in range(1, MAX_SWAP + 1)]
    candidates = [(fp8, n) for fp8, n in candidates
                  if host_free_bytes is None or pinned_host_bytes(n, fp8, size) <= host_free_bytes]
    chosen = next(((fp8, n) for fp8, n in candidates
                   if estimate_peak_gib(size, fp8, n, resolution, batch_size) <= budget), None)
    fits = chosen is not None
    fp8, swap = chosen if fits else candidates[-1]
    estimate = estimate_peak_gib(size, fp8, swap, resolution, batch_size)
    row = next((r for r, _, _ in GUIDE_ROWS if gib >= ROW_SHARE * r), GUIDE_ROWS[-1][0])
    row = None if not fp8 else row
    would = next((dict(w) for r, w, _ in GUIDE_ROWS if r == row), {})
    fields_ = {**base, "fp8_base": fp8, "blocks_to_swap": swap or None, "t5xxl_fp8": gib < T5_FP8_BELOW_GIB,
               "mixed_precision": "bf16"}  # what FLUX.1 was trained in (and fp8 base computes in)
    settings = ", ".join(["fp8 base" if fp8 else "bf16 base"] + ([f"--blocks_to_swap {swap}"] if swap else [])
                         + (["T5-XXL in fp8 while it encodes"] if fields_["t5xxl_fp8"] else []))
    lines = [f"auto: {gib:.1f} GiB free; at {shape}: {settings}, gradient checkpointing, latents and text-encoder "
             f"outputs cached in memory; estimated peak {estimate:.1f} GiB"
             + ("" if fits else ", MORE than is free: lower the resolution or batch size, or expect an out-of-memory "
                                "error")]
    if swap:
        lines.append(f"block swap pins {pinned_host_bytes(swap, fp8, size) / GIB:.1f} GiB of host memory"
                     + (f" ({host_free_bytes / GIB:.1f} GiB available)" if host_free_bytes is not None else ""))
    if row is not None:
        why = next(y for r, _, y in GUIDE_ROWS if r == row)
        lines.append(f"the guide's {row} GB row uses {why}"
                     + ("" if gib >= ROW_SHARE * row else " (this is below its smallest row)"))
    if would.get("optimizer_type"):
        lines.append(f"the guide also uses {would['optimizer_type']}, which saves about half a GiB more: choose it "
                     "on the optimizer node (or --optimizer_type)")
    return MemoryPlan(gib, row, fields_, would, tuple(lines), estimate)


def drop_impossible_caches(fields: dict, datasets, train_t5xxl: bool) -> list[str]:
    """Caches that a plan (not the user) turned on are turned off again where a dataset changes images or captions
    every step, or where T5-XXL trains, instead of failing after the models have loaded; says what it dropped."""
    notes = []
    subsets = [s for d in datasets for s in d.subsets]
    random_latents = sorted({o for s in subsets for o in s.options_changing_images()})
    if random_latents and fields.get("cache_latents"):
        fields["cache_latents"] = fields["cache_latents_to_disk"] = False
        notes.append(f"latents are not cached: {', '.join(random_latents)} changes the images every step")
    random_captions = any(s.options_changing_captions() for s in subsets)
    if fields.get("cache_text_encoder_outputs") and (train_t5xxl or random_captions):
        fields["cache_text_encoder_outputs"] = fields["cache_text_encoder_outputs_to_disk"] = False
        notes.append("text-encoder outputs are not cached: " + (
            "T5-XXL is trained (its outputs change every step)" if train_t5xxl else
            "a dataset changes its captions every step (shuffle, dropout, warmup or wildcards)"))
    return notes


# ------------------------------------------------------------------------------------------ after out of memory

SWAP_LADDER = (8, 16, 22, 28, MAX_SWAP)  # the guide's counts (16, 12, 10, 8 GB rows), then all that can move


def step_down(blocks_to_swap: int | None, fp8: bool, *, allow_swap: bool = True, allow_fp8: bool = True,
              size: TransformerSize = FLUX_DEV, host_free_bytes: float | None = None) -> tuple[dict, str] | None:
    """The next leaner setting after an out-of-memory error (`--memory auto` steps down by itself): more blocks
    swapped (the guide's next count whose pinned host memory fits), then the fp8 base; None when nothing is left.
    Returns (the fields to change, what changed in words)."""
    current = blocks_to_swap or 0
    if allow_swap:
        more = [n for n in SWAP_LADDER if n > current
                and (host_free_bytes is None or pinned_host_bytes(n, fp8, size) <= host_free_bytes)]
        if more:
            return {"blocks_to_swap": more[0]}, f"--blocks_to_swap {more[0]} (was {current})"
    if allow_fp8 and not fp8:
        return {"fp8_base": True}, "--fp8_base (the transformer's weights in fp8)"
    return None


def leaner_options(free_bytes: float | None, blocks_to_swap: int | None, fp8: bool, *,
                   resolution: tuple[int, int] = (1024, 1024), batch_size: int = 1, size: TransformerSize = FLUX_DEV,
                   allow_swap: bool = True, allow_fp8: bool = True, host_free_bytes: float | None = None) -> str:
    """What to change after an out-of-memory error, as options to type: "at 1024² on 15.6 GiB free:
    --blocks_to_swap 12, or --fp8_base". With the free memory known, the fewest swapped blocks whose estimated
    peak fits it; else the next count of the guide's."""
    current = blocks_to_swap or 0
    budget = None if free_bytes is None else free_bytes / GIB - HEADROOM_GIB

    def fits(fp8_: bool, n: int) -> bool:
        return host_free_bytes is None or pinned_host_bytes(n, fp8_, size) <= host_free_bytes

    def fewest(fp8_: bool, above: int) -> int | None:
        counts = [n for n in range(above + 1, MAX_SWAP + 1) if fits(fp8_, n)]
        if budget is not None:
            return next((n for n in counts if estimate_peak_gib(size, fp8_, n, resolution, batch_size) <= budget),
                        None)
        return next((n for n in SWAP_LADDER if n in counts), None)

    options = []
    swap = fewest(fp8, current) if allow_swap else None
    if swap is not None:
        options.append(f"--blocks_to_swap {swap}")
    if allow_fp8 and not fp8:
        if budget is None or estimate_peak_gib(size, True, current, resolution, batch_size) <= budget:
            options.append("--fp8_base")
        elif allow_swap and (n := fewest(True, current)) is not None:
            options.append(f"--fp8_base with --blocks_to_swap {n}")
    if not options:
        options.append("a lower resolution or batch size (nothing more can be swapped or stored in fp8)")
    w, h = resolution
    shape = f"{w}²" if w == h else f"{w}x{h}"
    shape += f", batch {batch_size}" if batch_size > 1 else ""
    where = f"at {shape}" + (f" on {free_bytes / GIB:.1f} GiB free" if free_bytes is not None else "")
    return f"{where}: {', or '.join(options)}"
