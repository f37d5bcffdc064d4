"""Dataset configuration: sd-scripts' dataset TOML (`[general]`, `[[datasets]]`, `[[datasets.subsets]]`), or the
same schema as a `.json` file, read the way sd-scripts reads it. A value is looked up subset > dataset > general >
command line > default.

Every problem (syntax, unknown key, wrong type, missing value) is one `DatasetConfigError` naming the file, the
table, the key and what is accepted.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from ..errors import DatasetConfigError

log = logging.getLogger(__name__)
SEED_MAX = 2**63 - 1
INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box")


@dataclass(frozen=True)
class SubsetConfig:
    image_dir: str | None = None
    metadata_file: str | None = None  # fine-tune style captions (JSON), instead of caption files
    num_repeats: int = 1
    caption_extension: str = ".caption"  # sd-scripts' command-line default
    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0
    flip_aug: bool = False
    color_aug: bool = False
    random_crop: bool = False
    face_crop_aug_range: tuple[float, float] | None = None
    class_tokens: str | None = None
    is_reg: bool = False
    alpha_mask: bool = False
    conditioning_data_dir: str | None = None  # loss masks named like the images (their R channel), sd-scripts' way
    cache_info: bool = False
    custom_attributes: dict | None = None  # carried to every sample of a batch (Batch.custom_attributes)
    resize_interpolation: str | None = None

    def __post_init__(self):
        _check_values(self, "subset")
        if self.conditioning_data_dir is not None:
            _check_mask_folder_subset(self)

    def options_changing_captions(self) -> list[str]:
        """The options set here that change the caption from step to step (text-encoder outputs then cannot be
        cached)."""
        return [o for o in CAPTION_CHANGING_OPTIONS if getattr(self, o)]

    def options_changing_images(self) -> list[str]:
        """The options set here that change the image from step to step (latents then cannot be cached)."""
        return [o for o in IMAGE_CHANGING_OPTIONS if getattr(self, o)]


CAPTION_CHANGING_OPTIONS = ("shuffle_caption", "caption_dropout_rate", "caption_dropout_every_n_epochs",
                            "caption_tag_dropout_rate", "token_warmup_step", "enable_wildcard")
IMAGE_CHANGING_OPTIONS = ("color_aug", "random_crop")


@dataclass(frozen=True)
class DatasetConfig:
    resolution: tuple[int, int] = (0, 0)  # (width, height); required
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    network_multiplier: float = 1.0
    resize_interpolation: str | None = None
    prior_loss_weight: float = 1.0
    validation_split: float = 0.0  # the fraction of each subset's images held out for the validation loss
    validation_seed: int | None = None  # shuffles the images before the split; None: the training seed
    subsets: tuple[SubsetConfig, ...] = field(default=())

    def __post_init__(self):
        """Typed values (the ComfyUI nodes build these) get the checks a TOML file gets."""
        if self.resolution == (0, 0):
            raise DatasetConfigError("dataset: 'resolution' is required")
        _check_values(self, "dataset")
        object.__setattr__(self, "subsets", tuple(self.subsets))
        if not self.subsets or not all(isinstance(s, SubsetConfig) for s in self.subsets):
            raise DatasetConfigError("dataset: needs at least one subset (a SubsetConfig)")
        if any(s.image_dir is None and s.metadata_file is None for s in self.subsets):
            raise DatasetConfigError("dataset: each subset needs 'image_dir' (or 'metadata_file' for fine-tune style "
                                     "captions)")
        if len({s.metadata_file is not None for s in self.subsets}) > 1:
            raise DatasetConfigError("dataset: subsets with 'metadata_file' and folder subsets cannot be mixed in one "
                                     "dataset; put them in separate datasets")
        _check_dataset(self, "dataset")


def _check_mask_folder_subset(subset: SubsetConfig) -> None:
    """A subset takes its loss masks from one place: mask images pair with the images of image_dir (sd-scripts'
    schema for such subsets has neither metadata_file nor alpha_mask)."""
    if subset.metadata_file is not None or subset.image_dir is None:
        raise DatasetConfigError("subset: 'conditioning_data_dir' (mask images named like the images) needs "
                                 "'image_dir' and cannot be used with 'metadata_file'")
    if subset.alpha_mask:
        raise DatasetConfigError("subset: 'conditioning_data_dir' and 'alpha_mask' both give the loss mask; use one "
                                 "(mask images, or the images' alpha channel)")


def _check_values(config, where: str) -> None:
    """Each value set away from its default passes the same check as in a TOML file (converted the same way)."""
    for f in fields(config):
        value = getattr(config, f.name)
        if f.name != "subsets" and value is not None and value != f.default:
            object.__setattr__(config, f.name, _expect(value, f.name, where))


# Which table may set which key (sd-scripts' schema): subset-level keys may also be set on a dataset or in
# [general] (they "ascend"); dataset-level keys in [general]; a few keys belong to the subset only.
_SUBSET_ONLY = {"image_dir", "metadata_file", "is_reg", "alpha_mask", "conditioning_data_dir"}
_SUBSET_KEYS = {f.name for f in fields(SubsetConfig)}
_DATASET_KEYS = {f.name for f in fields(DatasetConfig)} - {"subsets", "prior_loss_weight"}
_TYPES: dict[str, Any] = {
    **{f.name: f.type for f in fields(SubsetConfig)}, **{f.name: f.type for f in fields(DatasetConfig)},
}


def _expect(value: Any, key: str, where: str) -> Any:
    """Check and convert one value; `where` names the file and table for the message."""
    kind = _TYPES[key]

    def fail(expected: str):
        raise DatasetConfigError(f"{where}: '{key}' = {value!r}: expected {expected}")

    if key == "resolution":
        if isinstance(value, bool):
            fail("a whole number or [width, height]")
        if isinstance(value, int):
            value = (value, value)
        if not (isinstance(value, (list, tuple)) and len(value) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
            fail("a whole number or [width, height] of positive whole numbers")
        return tuple(value)
    if key == "face_crop_aug_range":
        if not (isinstance(value, (list, tuple)) and len(value) == 2
                and all(isinstance(v, (int, float)) and _finite(v) for v in value)):
            fail("[min, max] finite numbers")
        return tuple(float(v) for v in value)
    if key in ("resize_interpolation",):
        if value not in INTERPOLATIONS:
            fail(f"one of {', '.join(INTERPOLATIONS)}")
        return value
    if "bool" in kind:
        if not isinstance(value, bool):
            fail("true or false")
        return value
    if kind.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            fail("a whole number")
        if value < 0 or (key in ("batch_size", "num_repeats", "bucket_reso_steps", "min_bucket_reso", "max_bucket_reso")
                         and value == 0):
            fail("a positive whole number" if value == 0 else "a whole number >= 0")
        if key == "validation_seed" and value > SEED_MAX:
            fail(f"a whole number from 0 to {SEED_MAX} (a 64-bit seed)")
        return value
    if kind.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail("a number")
        if not _finite(value):
            fail("a finite number (NaN and infinity are refused)")
        if key.endswith("_rate") and not 0 <= value <= 1:
            fail("a number between 0 and 1")
        if key == "validation_split" and not 0 <= value < 1:
            fail("a fraction from 0 up to (not including) 1")
        return float(value)
    if kind.startswith("dict"):
        if not isinstance(value, dict):
            fail("a table")
        return value
    if not isinstance(value, str):
        fail("a string")
    return value


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _check_keys(table: Mapping, allowed: set[str], where: str) -> None:
    for key in table:
        if key not in allowed:
            hint = " (it belongs in a [[datasets.subsets]] table)" if key in _SUBSET_ONLY else ""
            raise DatasetConfigError(f"{where}: unknown key '{key}'{hint}; valid keys: {', '.join(sorted(allowed))}")


def load_dataset_config(path: str | os.PathLike, command_line: Mapping[str, Any] | None = None,
                        masked_loss: bool = False) -> list[DatasetConfig]:
    """Datasets described by the file at `path`: TOML, or JSON when its name ends in `.json` (sd-scripts' rule; the
    same schema either way). `command_line` holds values given as options (lower precedence than the file), e.g.
    {"resolution": (1024, 1024), "caption_extension": ".txt"}. `masked_loss` (--masked_loss) lets subsets name a
    folder of mask images (`conditioning_data_dir`), as sd-scripts' schema does only then."""
    from ..tomlio import NotText, TOMLError, loads, loads_json, read_text

    path = Path(path)
    try:
        text = read_text(path)  # UTF-8, or UTF-16/32 with a byte-order mark (Windows editors' "Unicode")
    except OSError as e:
        raise DatasetConfigError(f"{path}: cannot be read ({e.strerror or e})") from e
    except NotText as e:
        raise DatasetConfigError(f"{path}: {e}") from None
    if path.suffix.lower() == ".json":
        try:
            document = loads_json(text)
        except ValueError as e:
            raise DatasetConfigError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(document, dict):
            raise DatasetConfigError(f"{path}: expected a JSON object with \"datasets\" (and optionally "
                                     f"\"general\"), not {type(document).__name__}")
    else:
        try:
            document = loads(text)
        except TOMLError as e:
            raise DatasetConfigError(f"{path}: not valid TOML ({e})") from e
    return datasets_from_dict(document, command_line, source=str(path), masked_loss=masked_loss)


def datasets_from_dict(document: Mapping[str, Any], command_line: Mapping[str, Any] | None = None,
                       source: str = "dataset config", masked_loss: bool = False) -> list[DatasetConfig]:
    _check_keys(document, {"general", "datasets"}, source)
    general = document.get("general", {})
    if not isinstance(general, dict):
        raise DatasetConfigError(f"{source}: [general] must be a table")
    _check_keys(general, (_DATASET_KEYS | _SUBSET_KEYS) - _SUBSET_ONLY, f"{source} [general]")
    datasets = document.get("datasets", [])
    if not isinstance(datasets, list) or not datasets:
        raise DatasetConfigError(f"{source}: needs at least one [[datasets]] table with [[datasets.subsets]]")
    cli = {k: v for k, v in (command_line or {}).items() if v is not None}
    out = []
    for d, dataset in enumerate(datasets):
        where = f"{source} [[datasets]] #{d + 1}"
        if not isinstance(dataset, dict):
            raise DatasetConfigError(f"{where}: must be a table")
        _check_keys(dataset, (_DATASET_KEYS | _SUBSET_KEYS | {"subsets"}) - _SUBSET_ONLY, where)
        subsets = dataset.get("subsets", [])
        if not isinstance(subsets, list) or not subsets:
            raise DatasetConfigError(f"{where}: needs at least one [[datasets.subsets]] table")

        def lookup(key: str, *tables: tuple[Mapping, str]):
            for table, table_where in tables:
                if key in table:
                    return _expect(table[key], key, table_where)
            return cli.get(key)

        levels = ((dataset, where), (general, f"{source} [general]"))
        dataset_values = {k: v for k in _DATASET_KEYS if (v := lookup(k, *levels)) is not None}
        if "prior_loss_weight" in cli:
            dataset_values["prior_loss_weight"] = float(cli["prior_loss_weight"])
        if "resolution" not in dataset_values:
            raise DatasetConfigError(f"{where}: 'resolution' is required (here, in [general] or as --resolution)")
        subset_configs = []
        for s, subset in enumerate(subsets):
            subset_where = f"{where} [[datasets.subsets]] #{s + 1}"
            if not isinstance(subset, dict):
                raise DatasetConfigError(f"{subset_where}: must be a table")
            _check_keys(subset, _SUBSET_KEYS, subset_where)
            if "conditioning_data_dir" in subset and not masked_loss:
                raise DatasetConfigError(f"{subset_where}: 'conditioning_data_dir' (a folder of loss masks named like "
                                         "the images) is read only with --masked_loss, as in sd-scripts; add "
                                         "--masked_loss or remove the key")
            values = {k: v for k in _SUBSET_KEYS if (v := lookup(k, (subset, subset_where), *levels)) is not None}
            if "conditioning_data_dir" in subset and "alpha_mask" not in subset:
                values.pop("alpha_mask", None)  # --alpha_mask: the mask images win, as in sd-scripts' apply_masked_loss
            if "image_dir" not in values and "metadata_file" not in values:
                raise DatasetConfigError(f"{subset_where}: 'image_dir' is required (or 'metadata_file' for "
                                         "fine-tune style captions)")
            subset_configs.append(_located(SubsetConfig, values, subset_where))
        config = _located(DatasetConfig, {**dataset_values, "subsets": tuple(subset_configs)}, where)
        _warn_unsupported(config, where)
        out.append(config)
    return out


def _located(cls, values: dict, where: str):
    """Build a config from a table; its own checks' messages then name the file and table."""
    try:
        return cls(**values)
    except DatasetConfigError as e:
        raise DatasetConfigError(where + ":" + str(e).split(":", 1)[1]) from None


def _check_dataset(config: DatasetConfig, where: str) -> None:
    """sd-scripts' bucket rules (BaseDataset.adjust_min_max_bucket_reso_by_steps): with buckets on, min_bucket_reso
    is rounded down and max_bucket_reso up to a multiple of bucket_reso_steps (with a warning), then the resolution
    must lie between them. FLUX needs every bucket side to be a multiple of 16."""
    if config.enable_bucket:
        step = config.bucket_reso_steps
        if step % 16:
            raise DatasetConfigError(f"{where}: 'bucket_reso_steps' = {step}: FLUX needs a multiple of 16 (8x "
                                     "downscaled latents, packed in 2x2 patches)")
        low, high = config.min_bucket_reso, config.max_bucket_reso
        if low % step:
            log.warning("%s: min_bucket_reso %d is not a multiple of bucket_reso_steps %d: rounded down to %d", where,
                        low, step, low - low % step)
            object.__setattr__(config, "min_bucket_reso", max(step, low - low % step))
        if high % step:
            log.warning("%s: max_bucket_reso %d is not a multiple of bucket_reso_steps %d: rounded up to %d", where,
                        high, step, high + step - high % step)
            object.__setattr__(config, "max_bucket_reso", high + step - high % step)
        low, high = config.min_bucket_reso, config.max_bucket_reso
        if low > high:
            raise DatasetConfigError(f"{where}: 'min_bucket_reso' {low} is above 'max_bucket_reso' {high}")
        if min(config.resolution) < low:
            raise DatasetConfigError(f"{where}: 'resolution' {list(config.resolution)} is below 'min_bucket_reso' "
                                     f"{low}: lower min_bucket_reso or raise the resolution")
        if max(config.resolution) > high:
            raise DatasetConfigError(f"{where}: 'resolution' {list(config.resolution)} is above 'max_bucket_reso' "
                                     f"{high}: raise max_bucket_reso or lower the resolution")
    elif any(size % 16 for size in config.resolution):
        raise DatasetConfigError(f"{where}: 'resolution' {list(config.resolution)}: without buckets each side must be "
                                 "a multiple of 16")


def _warn_unsupported(config: DatasetConfig, where: str) -> None:
    """Keys sd-scripts accepts that this trainer reads but does not act on (yet): said, not silently dropped."""
    ignored = [f"face_crop_aug_range (subset {i + 1})" for i, s in enumerate(config.subsets) if s.face_crop_aug_range]
    ignored += [f"cache_info (subset {i + 1})" for i, s in enumerate(config.subsets) if s.cache_info]
    if ignored:
        log.warning("%s: %s accepted but not applied by this trainer", where, ", ".join(ignored))


def single_folder_dataset(image_dir: str | os.PathLike, resolution: int | tuple[int, int], **options) -> DatasetConfig:
    """One dataset of one folder: what the ComfyUI nodes and the demo build (same types, same checks)."""
    subset_keys = {k: v for k, v in options.items() if k in _SUBSET_KEYS}
    dataset_keys = {k: v for k, v in options.items() if k not in _SUBSET_KEYS}
    unknown = set(dataset_keys) - {f.name for f in fields(DatasetConfig)}
    if unknown:
        raise DatasetConfigError(f"unknown dataset options: {', '.join(sorted(unknown))}")
    resolution = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    return DatasetConfig(resolution=resolution, subsets=(SubsetConfig(image_dir=str(image_dir), **subset_keys),),
                         **dataset_keys)


__all__ = ["DatasetConfig", "SubsetConfig", "DatasetConfigError", "load_dataset_config", "datasets_from_dict",
           "single_folder_dataset"]
