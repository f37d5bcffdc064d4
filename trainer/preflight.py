"""Before any model loads: `check(config)` does the cheap file reads (model headers, prompt file, LoRA to continue
from, resume state, dataset folders) so a wrong input fails in a second, not after caching; `preflight_report`
builds the datasets (no model) and says what training will see: images, skipped files, captions, buckets, steps.
The CLI prints the report with --check_only and the ComfyUI dataset node shows it."""

from __future__ import annotations

import glob
import importlib.util
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import check_state_folder
from .config import OPTIMIZERS, TrainConfig, canonical_optimizer, parse_optimizer_args, resolve_datasets
from .config.model_type import required_model_files
from .errors import ConfigError, LoRAWeightsError, TrainerError
from .lora import read_lora
from .models import build_transformer, check_model_file, check_transformer_type, read_flux_params
from .output_names import output_patterns
from .sampling import preview_prompts


def check(config: TrainConfig, warn=None) -> None:
    """Raise a TrainerError naming the first input that cannot work; reads file headers only. `warn(text)`, when
    given, receives what is usable but not as written (a preview prompt's ignored flag)."""
    network = _meta_network(config)  # the transformer's LoRA as this config builds it, without memory
    for slot in ("ae", "clip_l", "t5xxl"):
        if slot in required_model_files(config.models.model_type):  # Chroma reads no CLIP-L
            check_model_file(getattr(config.models, slot), slot)
    optimizer = canonical_optimizer(config.optimizer.optimizer_type)
    package = OPTIMIZERS.get(optimizer)
    if package and importlib.util.find_spec(package) is None:
        raise ConfigError(f"optimizer_type {optimizer} needs {package}: pip install {package}")
    if optimizer not in OPTIMIZERS:
        from .optim import import_optimizer_class

        import_optimizer_class(optimizer)
    _check_optimizer_args(config, optimizer)
    _check_device(config.memory.device)
    _check_pinned_host_memory(config)
    preview_prompts(config.previews, warn=warn)
    if config.models.network_weights:
        weights, _ = read_lora(config.models.network_weights)
        if not config.models.dim_from_weights:
            _check_lora_fits(config, weights, network)
    for path in config.models.base_weights:
        read_lora(path)  # a LoRA file in a layout we read (the merge itself waits for the models)
    if config.saving.resume:
        _check_resume_state(config, optimizer, network)
    datasets = resolve_datasets(config)
    for dataset in datasets:
        for subset in dataset.subsets:
            if subset.image_dir and not Path(subset.image_dir).is_dir():
                raise ConfigError(f"image_dir {subset.image_dir}: not a folder")
            if subset.metadata_file and not Path(subset.metadata_file).is_file():
                raise ConfigError(f"metadata_file {subset.metadata_file}: no such file")
    _check_outputs_spare_inputs(config, datasets)
    _check_writable(config, network)


def _meta_network(config: TrainConfig):
    """The LoRA network `config` builds on the transformer (and on T5-XXL with train_t5xxl), on the meta device (the
    files' headers give the sizes)."""
    import torch

    from .lora import LoRANetwork
    from .models.text_encoders import t5_encoder_on_meta

    params = read_flux_params(config.models.pretrained_model_name_or_path)
    check_transformer_type(config.models.pretrained_model_name_or_path, params, config.models.model_type)
    t5 = t5_encoder_on_meta(config.models.t5xxl) if config.network.train_t5xxl else None
    with torch.device("meta"):
        return LoRANetwork.create(config.network, build_transformer(params), t5=t5)


def _check_optimizer_args(config: TrainConfig, optimizer: str) -> None:
    """Build the optimizer over one dummy parameter: a bad --optimizer_args value fails now, not after caching."""
    import torch

    from .optim import create_optimizer

    if optimizer in OPTIMIZERS and OPTIMIZERS[optimizer] not in (None, "bitsandbytes"):
        return  # a package of its own (Prodigy): constructed with the real parameters only
    dummy = [{"params": [torch.zeros(1, requires_grad=True)]}]
    options = config.optimizer
    create_optimizer(options.optimizer_type, dummy, options.learning_rate, parse_optimizer_args(options.optimizer_args))


def _check_pinned_host_memory(config: TrainConfig) -> None:
    """--blocks_to_swap pins the swapped blocks' weights in host memory: refused before loading when that is more
    than the host has available."""
    if not config.memory.blocks_to_swap:
        return
    import torch

    from .config.memory_plan import TransformerSize, check_pinned_host_memory

    device_type = torch.device(config.memory.device).type if config.memory.device else \
        ("cuda" if torch.cuda.is_available() else "cpu")
    size = TransformerSize.of(read_flux_params(config.models.pretrained_model_name_or_path))
    check_pinned_host_memory(config.memory.blocks_to_swap, config.memory.fp8, size, device_type)


def _check_device(device: str | None) -> None:
    if not device:
        return
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"device {device!r}: not a device name ({e}); expected cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device}: this PyTorch sees no CUDA GPU (torch {torch.__version__}); use "
                              "--device cpu or a CUDA build of PyTorch")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")


def _check_outputs_spare_inputs(config: TrainConfig, datasets: list) -> None:
    """No file the run writes may replace one it reads: the model files, --network_weights, the images (previews
    go to <output_dir>/sample), --resume (its own state folder is replaced by the newer state, as intended)."""
    out = Path(config.saving.output_dir).resolve()
    patterns = output_patterns(config.saving.name)
    models = config.models
    inputs = [(option, Path(getattr(models, option))) for option in
              ("pretrained_model_name_or_path", "clip_l", "t5xxl", "ae", "network_weights") if getattr(models, option)]
    for option, path in inputs:
        path = path.resolve()
        if path.parent == out and any(p.fullmatch(path.name) for p in patterns):
            raise ConfigError(f"output_name {config.saving.name!r} in output_dir {config.saving.output_dir} would "
                              f"replace --{option} {path}; choose another output_name or output_dir")
    samples = out / "sample"
    for dataset in datasets:
        for subset in dataset.subsets:
            folder = Path(subset.image_dir or subset.metadata_file or ".").resolve()
            if folder in (out, samples) and subset.image_dir:
                raise ConfigError(f"output_dir {config.saving.output_dir}: the run writes into {folder}, which holds "
                                  f"training images (image_dir {subset.image_dir}); choose another output_dir")


def _check_writable(config: TrainConfig, network) -> None:
    """The output folder (and the cache folder for disk caches) can be created and written, and has room."""
    folders = [("output_dir", Path(config.saving.output_dir))]
    if config.logging.logging_dir:
        folders.append(("logging_dir", Path(config.logging.logging_dir)))
    caching = config.caching
    if caching.cache_dir and (caching.cache_latents_to_disk or caching.cache_text_encoder_outputs_to_disk):
        folders.append(("cache_dir", Path(caching.cache_dir)))
    for option, folder in folders:
        existing = folder.absolute()
        while not existing.exists():  # a folder still to be made: its nearest existing parent must take it
            existing = existing.parent
        if not existing.is_dir():
            raise ConfigError(f"{option} {folder}: {existing} is a file, not a folder")
        try:
            with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-check-"):
                pass
        except OSError as e:
            raise ConfigError(f"{option} {folder}: cannot be written ({e.strerror or e})") from None
    outputs = _output_bytes(config, network)
    needs = {Path(config.saving.output_dir): ("output_dir", "the LoRA files and training states", outputs)}
    for folder, size in _cache_bytes(config).items():
        option, what, known = needs.get(folder, ("cache_dir" if config.caching.cache_dir else "image_dir", "", 0))
        needs[folder] = (option, (what + " and " if what else "") + "the disk caches", known + size)
    for folder, (option, what, needed) in needs.items():
        existing = folder.absolute()
        while not existing.exists():
            existing = existing.parent
        free = shutil.disk_usage(existing).free
        if needed > free:
            raise ConfigError(f"{option} {folder}: {size_text(free)} free, but {what} need about "
                              f"{size_text(needed)}")


def size_text(size: float) -> str:
    """Bytes in the largest unit that keeps at least 1 of it: '0 bytes', '812 bytes', '3.5 KiB', '120 MiB'."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            value = size / scale
            shown = f"{value:.1f}".removesuffix(".0") if value < 10 else f"{value:.0f}"
            return f"{shown} {unit}"
    return f"{size:.0f} byte{'' if size == 1 else 's'}"


def _cache_bytes(config: TrainConfig) -> dict[Path, int]:
    """What the disk caches of images not cached yet would take, per folder they go to (an upper bound: every
    image counted, flipped latents and a full T5 sequence included)."""
    latents, text = config.caching.cache_latents_to_disk, config.caching.cache_text_encoder_outputs_to_disk
    if not (latents or text):
        return {}
    from .data.cache_files import cache_folder, text_npz_path
    from .data.images import list_images

    t5_tokens = config.models.t5xxl_max_token_length or 512
    text_bytes = (t5_tokens * 4096 + 768) * 4 + t5_tokens * 8
    out: dict[Path, int] = {}
    for dataset in resolve_datasets(config):
        width, height = dataset.resolution
        latent_bytes = 16 * (height // 8) * (width // 8) * 4 * 2
        for subset in dataset.subsets:
            if not subset.image_dir or not Path(subset.image_dir).is_dir():
                continue
            for image in list_images(subset.image_dir):
                folder = cache_folder(image, config.caching.cache_dir)
                size = 0
                if latents and not any(folder.glob(f"{glob.escape(image.stem)}_*_flux.npz")):
                    size += latent_bytes
                if text and not text_npz_path(image, config.caching.cache_dir).exists():
                    size += text_bytes
                root = Path(config.caching.cache_dir) if config.caching.cache_dir else folder
                out[root] = out.get(root, 0) + size
    return out


def _output_bytes(config: TrainConfig, network) -> int:
    """A generous estimate of what the run writes into output_dir: each LoRA kept, and each state (LoRA in fp32 +
    optimizer moments)."""
    params = sum(p.numel() for p in network.parameters())
    lora = params * (4 if config.saving.save_precision in (None, "float") else 2)
    kept_loras = 1 + (config.saving.save_last_n_epochs or config.saving.save_last_n_steps or 4 if (
        config.saving.save_every_n_epochs or config.saving.save_every_n_steps) else 0)
    states = (kept_loras if config.saving.save_state else 1) * params * 4 * 3
    return lora * kept_loras + states


def _check_resume_state(config: TrainConfig, optimizer: str, network) -> None:
    """The whole --resume state from its headers: complete, undamaged, made by this optimizer for the network this
    config builds (the transformer's layers; with --dim_from_weights the loop checks them)."""
    from .checkpoint import network_shapes

    expected = None if (config.models.network_weights and config.models.dim_from_weights) else {
        name: shape for name, shape in network_shapes(network).items() if name.startswith("lora_unet_")}
    check_state_folder(Path(config.saving.resume), expected, optimizer=optimizer, scope="lora_unet_")


def _check_lora_fits(config: TrainConfig, weights: dict, network) -> None:
    """The transformer layers of --network_weights against the network `config` builds (on the meta device)."""
    import torch

    with torch.device("meta"):
        try:
            network.load_kohya({k: v if k.endswith("alpha") else v.to("meta") for k, v in weights.items()
                                if k.startswith("lora_unet_")})
        except TrainerError as e:
            raise LoRAWeightsError(f"network_weights {config.models.network_weights}: {e}") from None


@dataclass(frozen=True)
class DatasetReport:
    name: str
    resolution: tuple[int, int]
    batch_size: int
    images: int  # usable files
    training_images: int  # with repeats, as one epoch sees them
    regularisation_images: int
    repeats: tuple[tuple[str, int], ...]  # (folder, num_repeats) per subset
    captioned: int
    uncaptioned: tuple[Path, ...]  # no caption file: trained with the class tokens (or an empty caption)
    skipped: tuple[tuple[Path, str], ...]  # (file, why)
    buckets: tuple[tuple[int, int, int], ...]  # (width, height, images with repeats)
    batches: int
    held_out: int = 0  # images kept out of training for the validation loss (validation_split)


@dataclass(frozen=True)
class PreflightReport:
    datasets: tuple[DatasetReport, ...]
    batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    epochs: int
    warnings: tuple[str, ...] = field(default=())

    def lines(self) -> list[str]:
        out = []
        for d in self.datasets:
            out.append(f"{d.name}: {d.resolution[0]}x{d.resolution[1]}, batch size {d.batch_size}, {d.images} images "
                       f"({d.training_images} per epoch with repeats"
                       + (f", {d.regularisation_images} regularisation" if d.regularisation_images else "") + ")")
            for folder, repeats in d.repeats:
                out.append(f"  {folder}: {repeats} repeat(s)")
            if d.held_out:
                out.append(f"  validation: {d.held_out} images held out of training for the validation loss")
            out.append(f"  captions: {d.captioned} of {d.images} images have a caption file"
                       + (f"; {len(d.uncaptioned)} use the class tokens or an empty caption (e.g. "
                          f"{d.uncaptioned[0].name})" if d.uncaptioned else ""))
            for width, height, count in d.buckets:
                out.append(f"  bucket {width}x{height}: {count} images")
            if d.skipped:
                out.append(f"  skipped {len(d.skipped)} file(s):")
                out += [f"    {path.name}: {why}" for path, why in d.skipped]
        out.append(f"{self.batches_per_epoch} batches per epoch -> {self.steps_per_epoch} steps per epoch; "
                   f"{self.total_steps} steps in {self.epochs} epoch(s)")
        out += [f"warning: {w}" for w in self.warnings]
        return out

    def text(self) -> str:
        return "\n".join(self.lines())


def dataset_report(datasets: list, seed: int = 0) -> tuple[list[DatasetReport], int]:
    """Per-dataset reports and the batches per epoch of typed datasets (reads the images' headers, no model)."""
    from .data import build_datasets

    group = build_datasets(list(datasets), seed)
    reports = []
    for dataset in group.datasets:
        items = dataset.items
        uncaptioned = tuple(dataset.uncaptioned)
        reports.append(DatasetReport(
            name=dataset.name, resolution=tuple(dataset.config.resolution), batch_size=dataset.config.batch_size,
            images=len(items), training_images=sum(i.repeats for i in items if not i.subset.is_reg),
            regularisation_images=sum(i.repeats for i in items if i.subset.is_reg),
            repeats=tuple((str(s.image_dir or s.metadata_file), s.num_repeats) for s in dataset.config.subsets),
            captioned=len(items) - len(uncaptioned), uncaptioned=uncaptioned,
            skipped=tuple(sorted(dataset.skipped.problems.items())),
            buckets=tuple((w, h, n) for (w, h), n in dataset.bucket_table()), batches=len(dataset),
            held_out=len(dataset.held_out)))
    return reports, len(group)


def preflight_report(config: TrainConfig, processes: int = 1) -> PreflightReport:
    """What training on `config`'s datasets will see, without loading a model (reads the images' headers)."""
    from dataclasses import replace

    from .session import plan_steps

    configs = [replace(c, batch_size=c.batch_size * processes) for c in resolve_datasets(config)]
    reports, batches = dataset_report(configs, config.run.seed if config.run.seed is not None else 0)
    steps_per_epoch, total, epochs = plan_steps(batches, config)
    prompt_notes: list[str] = []
    preview_prompts(config.previews, warn=prompt_notes.append)
    return PreflightReport(tuple(reports), batches, steps_per_epoch, total, epochs,
                           (*config.advice(), *prompt_notes))
