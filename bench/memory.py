"""Speed and peak memory of our training step under each memory setting, beside sd-scripts' on the same card.

On a GPU machine (the whole default run, sd-scripts included, must fit in about 8 minutes on one H200: 18 runs of
2 warm-up + 6 timed steps, most of the time in the swapped and offloaded runs; ours alone take about half):

    python bench/memory.py --tiny --device cuda                                # seconds: every code path on the GPU
    python bench/memory.py --json bench_memory.json                            # ours only
    python bench/memory.py --sd-scripts ~/sd-scripts --json bench_memory.json --budget 450  # side by side
    python bench/memory.py --configs ckpt_1024,fp8_1024 --steps 4 --warmup 1   # a subset, fewer steps

Options: --configs all|name,... (names below), --steps 6 (timed steps), --warmup 2 (untimed steps first), --device,
--tiny (a FLUX-shaped model of a few MB, on the CPU unless --device: what tests/test_bench_memory.py runs), --json
FILE (rewritten after every run, so a run cut short still leaves its results), --budget SECONDS (start no run after
that many seconds; the rest are reported "not run"), --timeout 300 (seconds per run), --no-subprocess (every run in
this process), --fp8-matmul (our fp8 configurations take the opt-in fp8-matmul path of trainer/fp8.py).

What one run is: the full-size FLUX.1-dev transformer (11.9 B parameters, `FluxParams()`) with RANDOM weights (small
normal values, drawn tensor by tensor on the target device: nothing is downloaded, host memory is never doubled),
in bf16, or with the block Linears in float8_e4m3fn as `load_flux(fp8=True)` keeps them; the configuration's block
runner installed by `trainer.memory.setup_for_training` (the session's order: with block swap the model is built in
host memory and the runner moves what stays resident; then `fp8.enable`); LoRA rank 16, alpha 16 on the 304 block
Linears; AdamW lr 1e-4. One step is `trainer.step.loss` (packed latents of the resolution, 1024² -> 4096 tokens of
64 channels, T5 context 512 x 4096, pooled 768, guidance 1.0, uniform sigmas, MSE to noise - latents) under bf16
autocast, backward, gradient clipping at 1.0 (sd-scripts' default), the optimizer step. Time: the median over --steps
after --warmup steps, with `torch.cuda.synchronize()` around each step. Memory: `torch.cuda.max_memory_allocated`
over all the steps, reset after the model, network and optimizer are built ("n/a" on the CPU). Each run (one
configuration, ours or sd-scripts') is a fresh subprocess of this script, so no allocator state or fragmentation
leaks from one into the next and an out-of-memory error ends only its own run (reported as "OOM").

--sd-scripts PATH runs the same configurations through sd-scripts' own code (imported from PATH at run time):
`library.flux_models.Flux` with `configs["dev"].params` and the same kind of random weights,
`networks.lora_flux.create_network` + `apply_to` (rank 16 on the same Linears), `enable_gradient_checkpointing(
cpu_offload=...)`, `enable_block_swap` / `move_to_device_except_swap_blocks` / `prepare_block_swap_before_forward`,
fp8 as sd-scripts does it (every weight float8_e4m3fn, upcast by autocast), the inputs its training script gives
(timesteps = sigmas, inputs requiring grad under checkpointing). An sd-scripts whose API differs prints why and its
columns are left empty. Timings on shared machines are noisy: read the ratios ours/sd-scripts.

Printed: a line per run as it finishes, then a table: config, our s/step and peak GiB, the memory plan's estimate
(`trainer.config.memory_plan.estimate_peak_gib`), the reference (sd-scripts on an H200, from DESIGN.md), sd-scripts'
s/step and GiB measured here with the ratios, and the issue's target with PASS/FAIL; plus the GPU and torch version:

    config           ours s/step  ours GiB  plan GiB | ref s/step  ref GiB | target / result
    ckpt_1024              0.800     25.10     25.73 |       0.87     25.6 |
    swap18_1024            0.950     14.20     15.28 |       2.22     15.1 | <=1.2x ckpt_1024 (0.96 s), <=15 GiB PASS
(made-up numbers: the layout only); with --sd-scripts, "sd s/step  sd GiB  time o/sd  mem o/sd" (sd-scripts measured
here, and ours/theirs) follow the reference. A run that runs out of memory shows "OOM" (nockpt_1024 may, on a small
card); an sd-scripts run it cannot drive shows "skipped", and why.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import inspect
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # `python bench/memory.py` from a checkout that is not installed

from trainer import fp8, memory  # noqa: E402
from trainer import step as train_step  # noqa: E402
from trainer.config import FlowConfig  # noqa: E402
from trainer.config.memory_plan import FLUX_DEV, SWAP_SLOTS, estimate_peak_gib  # noqa: E402
from trainer.data.dataset import Batch  # noqa: E402
from trainer.flow import image_ids, pack_latents, text_ids, unpack_latents  # noqa: E402
from trainer.lora import LoRAConfig, LoRANetwork  # noqa: E402
from trainer.models.flux import Flux, FluxParams  # noqa: E402
from trainer.models.tiny import TINY_FLUX  # noqa: E402

GIB = 2**30
RANK = 16
LR = 1e-4
MAX_GRAD_NORM = 1.0  # sd-scripts' default --max_grad_norm, which our loop applies too
WEIGHT_STD = 0.02
T5_TOKENS, TINY_T5_TOKENS = 512, 16
TINY_PARAMS = replace(TINY_FLUX, depth=4, depth_single_blocks=6)  # enough blocks for both swappers to swap some
TINY_SCALE = 8  # tiny mode: 1024² -> 128² pixels (64 tokens), 512² -> 64² (16 tokens)
FLOW = FlowConfig(timestep_sampling="uniform", model_prediction_type="raw", guidance_scale=1.0)
RESULT_MARK = "@@bench-memory-result "


@dataclass(frozen=True)
class Config:
    name: str
    resolution: int
    fp8: bool = False
    checkpointing: bool = True
    offload: bool = False  # cpu_offload_checkpointing
    swap: int = 0  # blocks_to_swap

    def describe(self) -> str:
        parts = [f"{self.resolution}²", "fp8 base" if self.fp8 else "bf16 base",
                 "checkpointing" if self.checkpointing else "no checkpointing"]
        if self.offload:
            parts.append("CPU-offloaded")
        if self.swap:
            parts.append(f"{self.swap} blocks swapped")
        return ", ".join(parts)


CONFIGS = {c.name: c for c in (
    Config("ckpt_1024", 1024),
    Config("ckpt_512", 512),
    Config("swap18_1024", 1024, swap=18),
    Config("offload_1024", 1024, offload=True),
    Config("fp8_1024", 1024, fp8=True),
    Config("fp8_512", 512, fp8=True),
    Config("fp8_swap18_1024", 1024, fp8=True, swap=18),
    Config("row8gb_1024", 1024, fp8=True, swap=28),  # the guide's 8 GB row
    Config("nockpt_1024", 1024, checkpointing=False),  # last: may run out of memory
)}

# reference (DESIGN.md, H200): sd-scripts, FLUX.1-dev architecture, random weights, LoRA rank 16 on all 304 block
# Linears, bf16, AdamW, batch 1: (s/step, peak GiB)
REFERENCE = {
    "ckpt_1024": (0.87, 25.6), "ckpt_512": (0.55, 24.0), "swap18_1024": (2.22, 15.1), "offload_1024": (3.29, 24.7),
    "fp8_1024": (1.03, 14.6), "fp8_512": (0.93, 13.1), "fp8_swap18_1024": (1.97, 9.4), "nockpt_1024": (0.60, 63.4),
}


@dataclass(frozen=True)
class Target:
    """The issue's target for a configuration: seconds per step (absolute, or a multiple of our ckpt_1024 time) and
    peak GiB; None where the target sets no bound."""
    seconds: float | None = None
    times_ckpt: float | None = None
    peak_gib: float | None = None

    def text(self) -> str:
        parts = []
        if self.times_ckpt is not None:
            parts.append(f"<={self.times_ckpt:g}x ckpt_1024")
        if self.seconds is not None:
            parts.append(f"<={self.seconds:g} s")
        if self.peak_gib is not None:
            parts.append(f"<={self.peak_gib:g} GiB")
        return ", ".join(parts)


TARGETS = {
    "swap18_1024": Target(times_ckpt=1.2, peak_gib=15.0),
    "offload_1024": Target(times_ckpt=1.3, peak_gib=23.0),
    "fp8_1024": Target(seconds=0.50, peak_gib=14.0),
    "fp8_swap18_1024": Target(seconds=0.60, peak_gib=9.4),
    "row8gb_1024": Target(peak_gib=8.0),
}


# ------------------------------------------------------------------------------------------------ models

def random_model(build, place: torch.device, draw: torch.device, dtype_for, seed: int = 0) -> nn.Module:
    """`build()` on the meta device, then every parameter drawn one at a time on `draw` (small normal values, norm
    scales 1) and put on `place` in `dtype_for(module, parameter name)`: no second copy of the model ever exists."""
    with torch.device("meta"):
        model = build()
    generator = torch.Generator(device=draw).manual_seed(seed)
    with torch.no_grad():
        for module_name, module in model.named_modules():
            for name, p in list(module._parameters.items()):
                if p is None:
                    continue
                value = torch.empty(p.shape, dtype=torch.bfloat16, device=draw)
                if p.ndim == 1 and "norm" in f"{module_name}.{name}":
                    value.fill_(1.0)
                else:
                    value.normal_(0.0, WEIGHT_STD, generator=generator)
                value = value.to(device=place, dtype=dtype_for(module_name, module, name))
                module._parameters[name] = nn.Parameter(value, requires_grad=False)
            for name, b in list(module._buffers.items()):
                if b is not None and b.is_meta:
                    module._buffers[name] = torch.zeros(b.shape, dtype=b.dtype, device=place)
    return model


def our_dtype_for(use_fp8: bool):
    def dtype_for(module_name: str, module: nn.Module, name: str) -> torch.dtype:
        if use_fp8 and name == "weight" and isinstance(module, nn.Linear) and "_blocks." in module_name:
            return torch.float8_e4m3fn  # what load_flux(fp8=True) keeps in fp8: the block Linears' weights
        return torch.bfloat16
    return dtype_for


def inputs(params, resolution: int, t5_tokens: int, device: torch.device) -> Batch:
    """One cached-latent batch as the data loader hands it to `trainer.step.loss` (random latents and text)."""
    g = torch.Generator().manual_seed(1)
    side = resolution // 8
    latents = torch.randn(1, 16, side, side, generator=g)
    pooled = torch.randn(1, params.vec_in_dim, generator=g)
    t5 = torch.randn(1, t5_tokens, params.context_in_dim, generator=g)
    mask = torch.ones(1, t5_tokens, dtype=torch.long)
    return Batch(bucket=(resolution, resolution), paths=[Path("random")], captions=[""], loss_weights=torch.ones(1),
                 network_multiplier=1.0, latents=latents.to(device),
                 text=(pooled.to(device), t5.to(device), mask.to(device)), positions=[0])


def build_ours(cfg: Config, params: FluxParams, batch: Batch, device: torch.device, args) -> SimpleNamespace:
    scaled_mm = fp8.SCALED_MM
    if cfg.fp8 and args.fp8_matmul:
        fp8.SCALED_MM = True
    on_host = bool(cfg.swap) and device.type == "cuda"  # as the session loads it: swapped blocks start in host memory
    flux = random_model(lambda: Flux(params), torch.device("cpu") if on_host else device, device,
                        our_dtype_for(cfg.fp8))
    flux.eval().requires_grad_(False)
    options = SimpleNamespace(gradient_checkpointing=cfg.checkpointing, cpu_offload_checkpointing=cfg.offload,
                              blocks_to_swap=cfg.swap or None, torch_compile=False)
    said: list[str] = []
    memory.setup_for_training(flux, options, device, said.append)
    if cfg.fp8:
        fp8.enable(flux)
    network = LoRANetwork.create(LoRAConfig(network_dim=RANK, network_alpha=RANK), flux, dtype=torch.float32)
    network.to(device).attach()
    optimizer = torch.optim.AdamW(network.param_groups(LR), lr=LR)
    trained = [p for group in optimizer.param_groups for p in group["params"]]
    flux.train()
    network.train()
    context = train_step.StepContext(flux=flux, network=network, flow=FLOW, seed=0, weight_dtype=torch.bfloat16,
                                     device=device)

    def one_step(i: int) -> torch.Tensor:
        loss = train_step.loss(context, batch, i)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def close():
        memory.teardown(flux)
        fp8.SCALED_MM = scaled_mm

    return SimpleNamespace(step=one_step, close=close, layers=len(network.loras), note="; ".join(said),
                           keep=(flux, network, optimizer))


# ------------------------------------------------------------------------------------------------ sd-scripts

class SdScriptsUnavailable(Exception):
    """sd-scripts cannot be driven here (not found, or its API is not the one this bench knows)."""


def import_sd_scripts(path: str):
    root = Path(path).expanduser()
    if not (root / "library" / "flux_models.py").is_file() or not (root / "networks" / "lora_flux.py").is_file():
        raise SdScriptsUnavailable(f"{root} is not an sd-scripts checkout (no library/flux_models.py and "
                                   "networks/lora_flux.py there)")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        models = importlib.import_module("library.flux_models")
        lora = importlib.import_module("networks.lora_flux")
    except Exception as e:  # a missing dependency of sd-scripts, a syntax it needs a newer Python for ...
        raise SdScriptsUnavailable(f"importing sd-scripts from {root} failed: {type(e).__name__}: {e}") from e
    missing = [f"library.flux_models.{n}" for n in ("Flux", "FluxParams", "configs") if not hasattr(models, n)]
    missing += [f"Flux.{n}" for n in ("enable_gradient_checkpointing", "enable_block_swap",
                                      "move_to_device_except_swap_blocks", "prepare_block_swap_before_forward")
                if not hasattr(getattr(models, "Flux", None), n)]
    missing += [f"networks.lora_flux.{n}" for n in ("create_network",) if not hasattr(lora, n)]
    if not missing:
        checkpointing = inspect.signature(models.Flux.enable_gradient_checkpointing).parameters
        if "cpu_offload" not in checkpointing:
            missing.append("Flux.enable_gradient_checkpointing(cpu_offload=...)")
        if "dev" not in getattr(models, "configs", {}):
            missing.append('library.flux_models.configs["dev"]')
    if missing:
        raise SdScriptsUnavailable(f"the sd-scripts at {root} lacks what this bench drives: {', '.join(missing)} "
                                   "(a different version of its API)")
    return models, lora


def their_swap_count(blocks_to_swap: int, depth: int, depth_single: int) -> int:
    """The largest count <= blocks_to_swap that sd-scripts' enable_block_swap accepts for this model (it keeps two
    blocks of each kind resident)."""
    n = blocks_to_swap
    while n > 0 and not (n // 2 <= depth - 2 and (n - n // 2) * 2 <= depth_single - 2):
        n -= 1
    return n


def build_theirs(cfg: Config, params: FluxParams, batch: Batch, device: torch.device, args) -> SimpleNamespace:
    models, lora = import_sd_scripts(args.sd_scripts)
    if cfg.offload and device.type != "cuda":
        raise SdScriptsUnavailable("sd-scripts' CPU-offloaded checkpointing moves tensors with .cuda(): needs CUDA")
    if args.tiny:
        theirs = models.FluxParams(in_channels=params.in_channels, vec_in_dim=params.vec_in_dim,
                                   context_in_dim=params.context_in_dim, hidden_size=params.hidden_size,
                                   mlp_ratio=params.mlp_hidden_dim / params.hidden_size, num_heads=params.num_heads,
                                   depth=params.depth, depth_single_blocks=params.depth_single_blocks,
                                   axes_dim=list(params.axes_dim), theta=params.theta, qkv_bias=params.qkv_bias,
                                   guidance_embed=params.guidance_embed)
    else:
        theirs = models.configs["dev"].params
    swap = their_swap_count(cfg.swap, theirs.depth, theirs.depth_single_blocks)
    notes = [f"swaps {swap} (asked {cfg.swap})"] if swap != cfg.swap else []
    on_host = bool(swap) and device.type == "cuda"
    weight_dtype = torch.float8_e4m3fn if cfg.fp8 else torch.bfloat16  # fp8: `unet.to(float8_e4m3fn)`, every weight
    flux = random_model(lambda: models.Flux(theirs), torch.device("cpu") if on_host else device, device,
                        lambda *_: weight_dtype)
    try:  # the order of sd-scripts' train_network / flux_train_network
        if swap:
            flux.enable_block_swap(swap, device)
        network = lora.create_network(1.0, RANK, RANK, None, [], flux, neuron_dropout=None)
        network.apply_to([], flux, apply_text_encoder=False, apply_unet=True)
        if cfg.checkpointing:
            flux.enable_gradient_checkpointing(cpu_offload=cfg.offload)
        flux.requires_grad_(False)
        if swap:
            flux.move_to_device_except_swap_blocks(device)
            flux.prepare_block_swap_before_forward()
        else:
            flux.to(device)
        network.to(device)
        if hasattr(network, "prepare_optimizer_params_with_multiple_te_lrs"):
            groups = network.prepare_optimizer_params_with_multiple_te_lrs(None, None, LR)
        else:
            groups = network.prepare_optimizer_params(None, None, LR)
    except (TypeError, AttributeError) as e:
        raise SdScriptsUnavailable(f"sd-scripts' API differs from the one this bench drives: {type(e).__name__}: "
                                   f"{e}") from e
    groups = groups[0] if isinstance(groups, tuple) else groups
    optimizer = torch.optim.AdamW(groups, lr=LR)
    trained = [p for group in optimizer.param_groups for p in group["params"]]
    network.requires_grad_(True)
    network.train()
    if cfg.checkpointing:  # as sd-scripts' train_network does
        flux.train()
    else:
        flux.eval()
    pooled, t5, _ = batch.text
    latents = batch.latents.float()
    b, _, h, w = latents.shape

    def one_step(i: int) -> torch.Tensor:
        noise, _, uniform, _ = train_step.sample_noise(0, i, batch.positions, tuple(latents.shape[1:]))
        noise, sigmas = noise.to(device), uniform.to(device)  # the same noise and sigmas as our step draws
        s = sigmas.view(-1, 1, 1, 1)
        noisy = ((1 - s) * latents + s * noise).to(torch.bfloat16)
        img, img_ids = pack_latents(noisy), image_ids(b, h, w, device=device)
        txt, y = t5.to(torch.bfloat16), pooled.to(torch.bfloat16)
        guidance = torch.full((b,), FLOW.guidance_scale, device=device)
        if cfg.checkpointing:  # sd-scripts makes every input require grad for its checkpointing
            for t in (img, txt, y, img_ids, guidance):
                t.requires_grad_(True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = flux(img=img, img_ids=img_ids, txt=txt, txt_ids=text_ids(b, txt.shape[1], device=device),
                       timesteps=sigmas, y=y, guidance=guidance)
        prediction = unpack_latents(out.float(), h, w)
        loss = torch.nn.functional.mse_loss(prediction, (noise - latents).float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def close():
        for offloader in (getattr(flux, "offloader_double", None), getattr(flux, "offloader_single", None)):
            if offloader is not None and hasattr(offloader, "thread_pool"):
                offloader.thread_pool.shutdown(wait=True)

    return SimpleNamespace(step=one_step, close=close, layers=len(getattr(network, "unet_loras", ())),
                           note="; ".join(notes), keep=(flux, network, optimizer))


# ------------------------------------------------------------------------------------------------ one run

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def run_one(name: str, impl: str, args) -> dict:
    """Build one configuration (ours or sd-scripts'), run warmup + steps training steps, return what was measured."""
    cfg = CONFIGS[name]
    device = torch.device(args.device)
    result = dict(config=name, impl=impl, status="ok", s_per_step=None, times=[], peak_gib=None, loss=None,
                  layers=None, note="", device=device_name(device), torch=torch.__version__)
    params = TINY_PARAMS if args.tiny else FluxParams()
    resolution = cfg.resolution // TINY_SCALE if args.tiny else cfg.resolution
    built = None
    threads = torch.get_num_threads()
    if args.tiny and device.type == "cpu":
        torch.set_num_threads(1)  # tiny tensors: threads only contend with whatever else the machine runs
    try:
        torch.manual_seed(0)
        batch = inputs(params, resolution, TINY_T5_TOKENS if args.tiny else T5_TOKENS, device)
        built = (build_ours if impl == "ours" else build_theirs)(cfg, params, batch, device, args)
        result["layers"], result["note"] = built.layers, built.note
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        losses = []
        for i in range(args.warmup + args.steps):
            synchronize(device)
            start = time.perf_counter()
            loss = built.step(i)
            synchronize(device)
            elapsed = time.perf_counter() - start
            if i >= args.warmup:
                result["times"].append(elapsed)
            losses.append(float(loss))
        result["s_per_step"] = statistics.median(result["times"]) if result["times"] else None
        result["loss"] = losses[-1]
        if device.type == "cuda":
            result["peak_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        if not all(math.isfinite(x) for x in losses):
            result["note"] = (result["note"] + "; " if result["note"] else "") + "non-finite loss"
    except torch.OutOfMemoryError:
        result["status"] = "OOM"
    except SdScriptsUnavailable as e:
        result["status"], result["note"] = "skipped", str(e)
    except Exception as e:  # one failing run must not stop the others
        result["status"], result["note"] = "error", f"{type(e).__name__}: {e}"
        traceback.print_exc()
    finally:
        if built is not None:
            try:
                built.close()
            except Exception:
                pass
        built = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        torch.set_num_threads(threads)
    return result


def run_in_subprocess(name: str, impl: str, args) -> dict:
    job = dict(config=name, impl=impl, steps=args.steps, warmup=args.warmup, device=args.device, tiny=args.tiny,
               sd_scripts=args.sd_scripts, fp8_matmul=args.fp8_matmul)
    command = [sys.executable, str(Path(__file__).resolve()), "--_child", json.dumps(job)]
    failed = dict(config=name, impl=impl, status="error", s_per_step=None, times=[], peak_gib=None, loss=None,
                  layers=None, note="", device=None, torch=torch.__version__)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, cwd=str(REPO))
    except subprocess.TimeoutExpired:
        return {**failed, "status": "timeout", "note": f"no result within {args.timeout} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            result = json.loads(line[len(RESULT_MARK):])
            if result["status"] == "error":
                sys.stderr.write(done.stderr[-3000:])
            return result
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    status = "OOM" if any("OutOfMemoryError" in t for t in tail) else "error"
    return {**failed, "status": status, "note": f"exit code {done.returncode}: " + " | ".join(tail)}


# ------------------------------------------------------------------------------------------------ report

def plan_estimate(cfg: Config, tiny: bool) -> float | None:
    """The memory plan's estimate of our peak, for the settings it models (checkpointing, not offloaded); the
    plan counts block swap's device slots (SWAP_SLOTS per block kind)."""
    if tiny or not cfg.checkpointing or cfg.offload:
        return None
    extra = {"slots": SWAP_SLOTS} if "slots" in inspect.signature(estimate_peak_gib).parameters else {}
    return estimate_peak_gib(FLUX_DEV, fp8=cfg.fp8, blocks_to_swap=cfg.swap, resolution=(cfg.resolution,) * 2,
                             **extra)


def judge(name: str, ours: dict[str, dict], tiny: bool) -> tuple[str, str]:
    """(the target's text, PASS/FAIL/n/a) for our result of `name`."""
    target = TARGETS.get(name)
    if target is None:
        return "", ""
    mine, ckpt = ours.get(name), ours.get("ckpt_1024")
    seconds = target.seconds
    text = target.text()
    if target.times_ckpt is not None:
        ckpt_time = ckpt.get("s_per_step") if ckpt else None
        if ckpt_time is None:
            return text + " (needs ckpt_1024)", "n/a"
        seconds = target.times_ckpt * ckpt_time
        text = text.replace("ckpt_1024", f"ckpt_1024 ({seconds:.2f} s)")
    if tiny or mine is None or mine.get("status") != "ok":
        return text, "n/a"
    checks = []
    if seconds is not None:
        checks.append(mine["s_per_step"] is not None and mine["s_per_step"] <= seconds)
    if target.peak_gib is not None:
        if mine["peak_gib"] is None:
            return text, "n/a"
        checks.append(mine["peak_gib"] <= target.peak_gib)
    return text, "PASS" if all(checks) else "FAIL"


def number(value, spec: str, result: dict | None = None) -> str:
    if result is not None and result.get("status") not in (None, "ok"):
        return result["status"]
    if value is None:
        return "n/a"
    return format(value, spec)


def table(names: list[str], results: dict[tuple[str, str], dict], args) -> list[str]:
    ours = {n: r for (n, impl), r in results.items() if impl == "ours"}
    with_theirs = any(impl == "sd-scripts" and r["status"] != "skipped" for (_, impl), r in results.items())
    head = f"{'config':<16} {'ours s/step':>11} {'ours GiB':>9} {'plan GiB':>9} | {'ref s/step':>10} {'ref GiB':>8} |"
    if with_theirs:
        head += f" {'sd s/step':>9} {'sd GiB':>7} {'time o/sd':>9} {'mem o/sd':>8} |"
    lines = [head + " target / result", "-" * (len(head) + 40)]
    for name in names:
        cfg, mine = CONFIGS[name], ours.get(name) or {}
        ref_time, ref_mem = REFERENCE.get(name, (None, None))
        row = (f"{name:<16} {number(mine.get('s_per_step'), '.3f', mine):>11} "
               f"{number(mine.get('peak_gib'), '.2f', mine):>9} {number(plan_estimate(cfg, args.tiny), '.2f'):>9} | "
               f"{number(ref_time, '.2f'):>10} {number(ref_mem, '.1f'):>8} |")
        if with_theirs:
            theirs = results.get((name, "sd-scripts")) or {}
            ratios = []
            for key in ("s_per_step", "peak_gib"):
                a, b = mine.get(key), theirs.get(key)
                ok = mine.get("status") == "ok" and theirs.get("status") == "ok" and a is not None and b
                ratios.append(format(a / b, ".2f") if ok else "n/a")
            row += (f" {number(theirs.get('s_per_step'), '.3f', theirs):>9} "
                    f"{number(theirs.get('peak_gib'), '.2f', theirs):>7} {ratios[0]:>9} {ratios[1]:>8} |")
        text, verdict = judge(name, ours, args.tiny)
        lines.append(row + (f" {text} {verdict}" if text else ""))
    return lines


def write_json(path: str, meta: dict, results: dict[tuple[str, str], dict], names: list[str]) -> None:
    ours = {n: r for (n, impl), r in results.items() if impl == "ours"}
    targets = {n: dict(zip(("target", "result"), judge(n, ours, meta["tiny"]))) for n in names if n in TARGETS}
    data = dict(meta, results=list(results.values()), targets=targets,
                plan_estimates={n: plan_estimate(CONFIGS[n], meta["tiny"]) for n in names},
                reference={n: dict(zip(("s_per_step", "peak_gib"), REFERENCE[n])) for n in names if n in REFERENCE})
    temporary = f"{path}.partial"
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
    os.replace(temporary, path)


def say(text: str = "") -> None:
    print(text, flush=True)


# ------------------------------------------------------------------------------------------------ main

def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="all", help=f"all, or some of: {', '.join(CONFIGS)}")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per run (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    ap.add_argument("--sd-scripts", dest="sd_scripts", default=None, metavar="PATH",
                    help="an sd-scripts checkout: run its model and LoRA on the same configurations")
    ap.add_argument("--tiny", action="store_true", help="a tiny FLUX-shaped model (on the CPU unless --device)")
    ap.add_argument("--device", default=None, help="default: cuda when available (cpu with --tiny)")
    ap.add_argument("--json", default=None, metavar="FILE", help="results, rewritten after every run")
    ap.add_argument("--no-subprocess", dest="subprocess", action="store_false",
                    help="run every configuration in this process (default: each in a fresh subprocess)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per run in a subprocess")
    ap.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                    help="start no run after this many seconds (the rest are reported 'not run')")
    ap.add_argument("--fp8-matmul", dest="fp8_matmul", action="store_true",
                    help="our fp8 configurations use the fp8-matmul path (torch._scaled_mm) of trainer/fp8.py")
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.device is None:
        args.device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA device")
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be at least 1 and --warmup at least 0")
    names = list(CONFIGS) if args.configs == "all" else [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown or not names:
        ap.error(f"unknown configuration(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(CONFIGS)}")
    args.names = names
    return args


def child(job: dict) -> None:
    args = SimpleNamespace(**{k: job[k] for k in ("steps", "warmup", "device", "tiny", "sd_scripts", "fp8_matmul")})
    result = run_one(job["config"], job["impl"], args)
    print(RESULT_MARK + json.dumps(result), flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args._child is not None:
        child(json.loads(args._child))
        return 0
    impls = ["ours"]
    if args.sd_scripts:
        try:  # only the checkout's shape here: importing it (seconds) happens in the runs
            root = Path(args.sd_scripts).expanduser()
            if not (root / "library" / "flux_models.py").is_file():
                raise SdScriptsUnavailable(f"{root} is not an sd-scripts checkout (no library/flux_models.py)")
            impls.append("sd-scripts")
        except SdScriptsUnavailable as e:
            say(f"sd-scripts: {e}; its columns are skipped")
    meta = dict(torch=torch.__version__, device=args.device, gpu=None, tiny=args.tiny, steps=args.steps,
                warmup=args.warmup, sd_scripts=args.sd_scripts, fp8_matmul=args.fp8_matmul or fp8.scaled_mm_wanted(),
                isolation="subprocess per run" if args.subprocess else "one process")
    model = "tiny FLUX-shaped model" if args.tiny else "FLUX.1-dev transformer, random weights"
    say(f"bench/memory.py: {model}, LoRA rank {RANK} on every block Linear, AdamW, batch 1; torch {torch.__version__}, "
        f"device {args.device}; {args.warmup} warm-up + {args.steps} timed steps per run; "
        f"{meta['isolation']}")
    results: dict[tuple[str, str], dict] = {}
    total, count, started = len(args.names) * len(impls), 0, time.perf_counter()
    for name in args.names:
        for impl in list(impls):
            count += 1
            if args.budget is not None and time.perf_counter() - started > args.budget:
                results[(name, impl)] = dict(config=name, impl=impl, status="not run", s_per_step=None, times=[],
                                             peak_gib=None, loss=None, layers=None, note="past --budget")
                say(f"[{count}/{total}] {name}, {impl}: not run (past --budget {args.budget:g} s)")
                continue
            say(f"[{count}/{total}] {name} ({CONFIGS[name].describe()}), {impl} ...")
            result = run_in_subprocess(name, impl, args) if args.subprocess else run_one(name, impl, args)
            results[(name, impl)] = result
            if meta["gpu"] is None and result.get("device"):
                meta["gpu"] = result["device"]
                say(f"    device: {meta['gpu']}")
            peak = "n/a" if result["peak_gib"] is None else f"{result['peak_gib']:.2f} GiB"
            seconds = "n/a" if result["s_per_step"] is None else f"{result['s_per_step']:.3f} s/step"
            ok = result["status"] == "ok"
            text = f"{seconds}, peak {peak}, loss {result['loss']:.4g}" if ok else result["status"]
            say(f"    {text}" + (f" ({result['note']})" if result["note"] else "")
                + (f" [{result['layers']} LoRA layers]" if result.get("layers") else ""))
            if impl == "sd-scripts" and result["status"] == "skipped" and "sd-scripts" in impls:
                if "needs CUDA" not in result["note"]:  # its API or import failed: the same for every config
                    say("    sd-scripts: skipping its remaining runs")
                    impls.remove("sd-scripts")
                    total -= len(args.names) - args.names.index(name) - 1
            if args.json:
                write_json(args.json, meta, results, args.names)
    say()
    say(f"device: {meta['gpu']}; torch {torch.__version__}; reference = sd-scripts (DESIGN.md, H200); "
        "plan = estimate_peak_gib (trainer/config/memory_plan.py)")
    for line in table(args.names, results, args):
        say(line)
    for (name, impl), r in results.items():
        if r["status"] not in ("ok", "skipped", "not run") and r["note"]:
            say(f"{name} ({impl}): {r['status']}: {r['note']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
