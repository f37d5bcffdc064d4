"""Before any model loads: `check(config)` does the cheap file reads (model headers, prompt file, LoRA to continue
from, resume state, dataset folders) so a wrong input fails in a second, not after caching; `preflight_report`
builds the datasets (no model) and says what training will see: images, skipped files, captions, buckets, steps.
The CLI prints the report with --check_only and the ComfyUI dataset node shows it."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import check_state_folder
from .config import OPTIMIZERS, TrainConfig, canonical_optimizer, resolve_datasets
from .errors import ConfigError, LoRAWeightsError, TrainerError
from .lora import read_lora
from .models import check_model_file, read_flux_params
from .sampling import read_prompts


def check(config: TrainConfig) -> None:
    """Raise a TrainerError naming the first input that cannot work; reads file headers only."""
    read_flux_params(config.pretrained_model_name_or_path)
    for slot in ("ae", "clip_l", "t5xxl"):
        check_model_file(getattr(config, slot), slot)
    optimizer = canonical_optimizer(config.optimizer_type)
    package = OPTIMIZERS.get(optimizer)
    if package and importlib.util.find_spec(package) is None:
        raise ConfigError(f"optimizer_type {optimizer} needs {package}: pip install {package}")
    if optimizer not in OPTIMIZERS:
        from .optim import import_optimizer_class

        import_optimizer_class(optimizer)
    if config.sample_prompts:
        read_prompts(config.sample_prompts)
    if config.network_weights:
        weights, _ = read_lora(config.network_weights)
        if not config.dim_from_weights:
            _check_lora_fits(config, weights)
    if config.resume:
        check_state_folder(Path(config.resume))
    for dataset in resolve_datasets(config):
        for subset in dataset.subsets:
            if subset.image_dir and not Path(subset.image_dir).is_dir():
                raise ConfigError(f"image_dir {subset.image_dir}: not a folder")
            if subset.metadata_file and not Path(subset.metadata_file).is_file():
                raise ConfigError(f"metadata_file {subset.metadata_file}: no such file")


def _check_lora_fits(config: TrainConfig, weights: dict) -> None:
    """The transformer layers of --network_weights against the network `config` builds, on the meta device (no
    memory, no file read beyond the header)."""
    import torch

    from .lora import LoRANetwork
    from .models.flux import Flux

    params = read_flux_params(config.pretrained_model_name_or_path)
    with torch.device("meta"):
        network = LoRANetwork.create(config.network, Flux(params))
        try:
            network.load_kohya({k: v if k.endswith("alpha") else v.to("meta") for k, v in weights.items()
                                if k.startswith("lora_unet_")})
        except TrainerError as e:
            raise LoRAWeightsError(f"network_weights {config.network_weights}: {e}") from None


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
            buckets=tuple((w, h, n) for (w, h), n in dataset.bucket_table()), batches=len(dataset)))
    return reports, len(group)


def preflight_report(config: TrainConfig, processes: int = 1) -> PreflightReport:
    """What training on `config`'s datasets will see, without loading a model (reads the images' headers)."""
    from dataclasses import replace

    from .session import plan_steps

    configs = [replace(c, batch_size=c.batch_size * processes) for c in resolve_datasets(config)]
    reports, batches = dataset_report(configs, config.seed if config.seed is not None else 0)
    steps_per_epoch, total, epochs = plan_steps(batches, config)
    return PreflightReport(tuple(reports), batches, steps_per_epoch, total, epochs, tuple(config.advice()))
