"""Dataset pipeline: sd-scripts dataset TOML, buckets, captions, images, latent and text-encoder caches."""

from ..config.data import DatasetConfig, SubsetConfig, load_dataset_config, single_folder_dataset
from ..errors import DatasetConfigError
from .buckets import BucketPlanner, bucket_resolutions, crop_ltrb
from .cache_files import latent_npz_path, text_npz_path
from .dataset import Batch, DatasetError, DatasetGroup, FluxDataset, build_datasets, build_validation_datasets
from .latent_cache import cache_latents
from .text_cache import cache_text_outputs

__all__ = ["BucketPlanner", "bucket_resolutions", "crop_ltrb", "DatasetConfig", "DatasetConfigError", "SubsetConfig",
           "load_dataset_config", "single_folder_dataset", "Batch", "DatasetError", "DatasetGroup", "FluxDataset",
           "build_datasets", "build_validation_datasets", "cache_latents", "latent_npz_path", "cache_text_outputs",
           "text_npz_path"]
