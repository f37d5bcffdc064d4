"""FLUX.1 model stack: transformer (or Chroma's), autoencoder, CLIP-L and T5-XXL, and loaders for the files people
have."""

from .loading import (
    build_transformer,
    check_model_file,
    check_transformer_type,
    load_autoencoder,
    load_clip_l,
    load_flux,
    load_t5xxl,
    model_type_of,
    read_flux_params,
)
from .safetensors_file import ModelFileError

__all__ = ["check_model_file", "read_flux_params", "load_flux", "load_autoencoder", "load_clip_l", "load_t5xxl",
           "ModelFileError", "build_transformer", "check_transformer_type", "model_type_of"]
