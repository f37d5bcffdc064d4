"""Everything the loop needs, prepared from a TrainConfig: models, datasets, caches, the network and optimizer.

Text encoders and the autoencoder are loaded for caching and released afterwards when their outputs are cached
(the autoencoder stays on the CPU if previews need it). The `Session` is immutable once `prepare` returns it: its
fields are what the run has (a freed encoder is None from the start); what changes while training (the position,
the weights, the optimizer's state) belongs to the loop and the modules, and a step-down after out of memory
prepares a new session from a leaner config.
"""

from __future__ import annotations

import gc
import random
from dataclasses import dataclass, replace

import torch

from . import data, fp8, memory, oom
from .config import TrainConfig, resolve_datasets
from .distributed import World
from .errors import ConfigError, Stopped
from .events import Message, Phase, Reporter
from .lora import LoRANetwork, apply_lora, read_lora
from .models import check_transformer_type, load_autoencoder, load_clip_l, load_flux, load_t5xxl, read_flux_params
from .models.chroma import NoClipL
from .models.loading import t5_fp8_option
from .optim import build_optimizer_and_scheduler
from .sampling import SamplePrompt, preview_prompts


@dataclass(frozen=True)
class Session:
    config: TrainConfig
    world: World
    device: torch.device
    weight_dtype: torch.dtype
    seed: int
    flux: torch.nn.Module
    datasets: data.DatasetGroup
    network: LoRANetwork
    optimizer: torch.optim.Optimizer
    scheduler: object
    total_steps: int
    epochs: int
    steps_per_epoch: int
    t5_length: int
    ae: torch.nn.Module | None = None
    clip_l: torch.nn.Module | None = None
    t5: torch.nn.Module | None = None
    prompts: tuple[SamplePrompt, ...] = ()
    prompt_conds: tuple[tuple, ...] = ()  # (cond, negative) per prompt, pre-encoded
    train_clip: bool = False
    train_t5: bool = False
    validation_datasets: data.DatasetGroup | None = None  # the held-out images (--validation_split), cached alike


def _weight_dtype(config: TrainConfig) -> torch.dtype:
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[config.memory.mixed_precision]


def plan_steps(batches_per_epoch: int, config: TrainConfig) -> tuple[int, int, int]:
    """(optimizer steps per epoch, total steps, epochs), as sd-scripts counts them."""
    steps_per_epoch = -(-batches_per_epoch // config.optimizer.gradient_accumulation_steps)
    total = config.run.max_train_epochs * steps_per_epoch if config.run.max_train_epochs else config.run.max_train_steps
    return steps_per_epoch, total, -(-total // steps_per_epoch)


def dataset_configs(config: TrainConfig, world: World) -> list[data.DatasetConfig]:
    """The resolved datasets; each process trains an equal slice of every batch, so the datasets draw whole
    (all-process) batches."""
    return [replace(c, batch_size=c.batch_size * world.size) for c in resolve_datasets(config)]


class _StopCheck:
    """Raises `Stopped` when the front end asks to stop before training began (caches written so far are complete
    files and are reused next time); keeps `where` (what an out-of-memory message reports) up to date."""

    def __init__(self, reporter: Reporter, where: oom.Where | None = None):
        self.reporter = reporter
        self.where = where or oom.Where()

    def __call__(self, phase: str) -> None:
        self.where.enter("caching" if phase.startswith("caching") else "loading", phase)
        if phase.startswith(("loading", "caching")):
            oom.inject(self.where.kind, 0)
        if self.reporter.should_stop():
            raise Stopped(f"stopped while {phase}: nothing was trained or saved; caches written so far are kept and "
                          "reused by the next run")

    def progress(self, phase: str, done: int, total: int) -> None:
        self.reporter.emit(Phase(phase, done, total))
        self(phase)


def autoencoder_dtype(dtype: torch.dtype, device_type: str, no_half_vae: bool = False) -> torch.dtype:
    """bf16 with --mixed_precision bf16 on a GPU, as sd-scripts runs it; float32 otherwise or with --no_half_vae."""
    return torch.bfloat16 if dtype == torch.bfloat16 and device_type == "cuda" and not no_half_vae else torch.float32


def prepare(config: TrainConfig, reporter: Reporter, world: World, device: torch.device,
            where: oom.Where | None = None) -> Session:
    seed = config.run.seed if config.run.seed is not None else random.SystemRandom().randrange(2**31)
    if config.run.seed is None:
        reporter.emit(Message(f"no --seed given: using {seed}"))
    torch.manual_seed(seed)
    dtype = _weight_dtype(config)

    # the transformer is loaded last: encoders and the autoencoder do their caching without it in memory
    params = read_flux_params(config.models.pretrained_model_name_or_path)
    check_transformer_type(config.models.pretrained_model_name_or_path, params, config.models.model_type)
    chroma = config.models.model_type == "chroma"
    t5_length = config.models.t5xxl_max_token_length or (512 if params.guidance_embed else 256)

    memory_options, caching = config.memory, config.caching
    if world.enabled and config.network.module_dropout and (memory_options.blocks_to_swap
                                                            or memory_options.cpu_offload_checkpointing):
        raise ConfigError("module_dropout with several processes needs DDP to find unused LoRA layers, which the "
                          "per-block backward of block swap and CPU-offloaded checkpointing does not allow: drop "
                          "module_dropout, or train on one process")
    stop = _StopCheck(reporter, where)
    stop("reading the datasets")
    reporter.emit(Phase("reading the datasets"))
    configs = dataset_configs(config, world)
    datasets = data.build_datasets(configs, seed)
    validation = data.build_validation_datasets(configs, seed)
    groups = [datasets] + ([validation] if validation is not None else [])
    datasets.log_buckets(lambda line: reporter.emit(Message(line)))
    for dataset in datasets.datasets:
        if dataset.skipped.problems:
            reporter.emit(Message(f"{dataset.name}: {dataset.skipped.message()}", "warning"))

    lora = config.network
    train_clip = not lora.network_train_unet_only and not chroma  # Chroma has no CLIP-L (sd-scripts: same)
    train_t5 = lora.train_t5xxl
    need_ae = not caching.cache_latents or config.previews.given
    # the autoencoder is small: float32, or bfloat16 with bf16 training on a GPU (fp16 risks overflow in it)
    ae_dtype = autoencoder_dtype(dtype, device.type, memory_options.no_half_vae)
    stop("loading the autoencoder")
    ae = load_autoencoder(config.models.ae, dtype=ae_dtype, device=device)
    if caching.cache_latents:
        stop("caching latents")
        reporter.emit(Phase("caching latents"))
        for group in groups:
            _cache_share(world, group, lambda g: data.cache_latents(
                g, ae, caching.cache_latents_to_disk, caching.vae_batch_size, seed, stop.progress, caching.cache_dir),
                caching.cache_latents_to_disk)
    if not need_ae:
        ae = None
    elif caching.cache_latents:
        ae = ae.to("cpu")  # kept for decoding previews only

    stop("loading the text encoders")
    models, encoder_dtype = config.models, dtype if device.type != "cpu" else torch.float32
    clip_l = NoClipL() if chroma else load_clip_l(models.clip_l, dtype=encoder_dtype, device=device,
                                                  tokenizer=models.clip_l_tokenizer)
    t5 = load_t5xxl(models.t5xxl, dtype=encoder_dtype, device=device, tokenizer=models.t5xxl_tokenizer,
                    max_length=t5_length, fp8=t5_fp8_option(memory_options.t5xxl_fp8, memory_options.fp8_base,
                                                            memory_options.fp8_base_unet))
    if not chroma and clip_l.model.config.hidden_size != params.vec_in_dim:
        raise ConfigError(f"clip_l {models.clip_l}: pooled size {clip_l.model.config.hidden_size} does not fit the "
                          f"transformer's vector input of {params.vec_in_dim} (a CLIP-G or other encoder?)")
    if t5.model.config.d_model != params.context_in_dim:
        raise ConfigError(f"t5xxl {models.t5xxl}: hidden size {t5.model.config.d_model} does not fit the "
                          f"transformer's text input of {params.context_in_dim}")
    if not chroma:
        merge_base_weights(config, clip_l, reporter)
    merge_base_weights(config, t5, reporter)
    # the pre-flight said the prompt file's notes
    prompts = tuple(preview_prompts(config.previews))
    conds = tuple(_encode_prompt(clip_l, t5, p, models.apply_t5_attn_mask) for p in prompts)
    if caching.cache_text_encoder_outputs:
        stop("caching text-encoder outputs")
        reporter.emit(Phase("caching text-encoder outputs"))
        batch = caching.text_encoder_batch_size or caching.vae_batch_size
        for group in groups:
            _cache_share(world, group, lambda g: data.cache_text_outputs(
                g, clip_l, t5, caching.cache_text_encoder_outputs_to_disk, batch, models.apply_t5_attn_mask,
                stop.progress, caching.cache_dir), caching.cache_text_encoder_outputs_to_disk)
        if not train_clip:
            clip_l = None
        if not train_t5:
            t5 = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    stop("loading the transformer")
    reporter.emit(Phase("loading the transformer"))
    # with block swap on a GPU the transformer is read into host memory: only what stays resident moves to the GPU
    swap_from_host = bool(memory_options.blocks_to_swap) and device.type == "cuda"
    flux = load_flux(models.pretrained_model_name_or_path, dtype=dtype, device="cpu" if swap_from_host else device,
                     fp8=memory_options.fp8, convert_device=device if swap_from_host else None)
    merge_base_weights(config, flux, reporter)
    memory.setup_for_training(flux, memory_options, device, lambda text: reporter.emit(Message(text)))
    if memory_options.fp8:
        fp8.enable(flux)  # each resident block's fp8 weights packed, on their device, for one upcast per pass
    stop("loading the transformer")

    network = _network(config, flux, clip_l if train_clip else None, t5 if train_t5 else None, dtype)
    network.attach()
    groups = network.param_groups(config.optimizer.learning_rate, config.optimizer.unet_lr,
                                  list(config.optimizer.text_encoder_lr) if config.optimizer.text_encoder_lr else None)
    if not groups:
        raise ConfigError("nothing to train: every learning rate is 0")
    steps_per_epoch, total, epochs = plan_steps(len(datasets), config)
    optimizer, scheduler = build_optimizer_and_scheduler(config, groups, total,
                                                         lambda text: reporter.emit(Message(text, "warning")))
    return Session(config, world, device, dtype, seed, flux, datasets, network, optimizer, scheduler, total, epochs,
                   steps_per_epoch, t5_length, ae, clip_l, t5, prompts, conds, train_clip, train_t5, validation)


def merge_base_weights(config: TrainConfig, model: torch.nn.Module, reporter: Reporter) -> None:
    """--base_weights: LoRA files merged into the models before training (and before any caching), each at its
    --base_weights_multiplier (default 1.0); a file's layers for other models are skipped."""
    multipliers = config.models.base_weights_multiplier or (1.0,) * len(config.models.base_weights)
    name = _model_name(model)
    prefixes = {"transformer": ("lora_unet_",), "CLIP-L": ("lora_te1_",), "T5-XXL": ("lora_te3_", "lora_te2_")}[name]
    for path, multiplier in zip(config.models.base_weights, multipliers):
        weights, _ = read_lora(path)
        if not any(key.startswith(prefixes) for key in weights):
            continue  # this file holds nothing for this model
        with torch.random.fork_rng(devices=[]):  # building the merged LoRA draws its (overwritten) init
            apply_lora(model, weights, multiplier, merge=True)
        reporter.emit(Message(f"base_weights: merged {path} at {multiplier:g} into the {name}"))


def _model_name(model: torch.nn.Module) -> str:
    name = type(getattr(model, "model", model)).__name__
    return "transformer" if name == "Flux" else "CLIP-L" if name.startswith("CLIP") else "T5-XXL"

def _cache_share(world: World, datasets: data.DatasetGroup, run, to_disk: bool) -> None:
    """With several processes and a disk cache, each encodes its share, then all read every file."""
    if world.enabled and to_disk:
        for dataset in datasets.datasets:
            keep = dataset.items
            dataset.items = world.share(keep)
            try:
                run(data.DatasetGroup([dataset], datasets.seed))
            finally:
                dataset.items = keep
        world.barrier()
    run(datasets)  # every process: reuses the files just written, or fills its memory cache


def _encode_prompt(clip_l, t5, prompt: SamplePrompt, apply_mask: bool) -> tuple:
    def one(text: str) -> tuple:
        with torch.no_grad():
            pooled = clip_l.encode(text).float().cpu()
            ids, mask = t5.tokenize(text)
            hidden = t5(ids, mask if apply_mask else None).float().cpu()
        return pooled, hidden, (mask if apply_mask else None)

    return one(prompt.prompt), (one(prompt.negative_prompt) if prompt.scale != 1.0 else None)


def _network(config: TrainConfig, flux, clip_l, t5, dtype: torch.dtype) -> LoRANetwork:
    lora_dtype = dtype if config.memory.full_bf16 or config.memory.full_fp16 else torch.float32
    if config.models.network_weights and config.models.dim_from_weights:
        weights, _ = read_lora(config.models.network_weights)
        network = LoRANetwork.from_weights(weights, flux, clip_l, t5, config=config.network, dtype=lora_dtype)
    else:
        network = LoRANetwork.create(config.network, flux, clip_l, t5, dtype=lora_dtype)
        if config.models.network_weights:
            weights, _ = read_lora(config.models.network_weights)
            network.load_kohya(weights)
    return network
