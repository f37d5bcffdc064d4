"""FLUX.1 model stack: transformer, autoencoder, CLIP-L and T5-XXL, and loaders for the files people have."""

from .loading import check_model_file, load_autoencoder, load_clip_l, load_flux, load_t5xxl, read_flux_params
from .safetensors_file import ModelFileError

__all__ = ["check_model_file", "read_flux_params", "load_flux", "load_autoencoder", "load_clip_l", "load_t5xxl",
           "ModelFileError"]
