"""LoRA network in the file format of sd-scripts' `networks.lora_flux`, which ComfyUI and Forge load as is."""

from ..config.lora import LoRAConfig
from ..errors import LoRAConfigError
from .files import apply_lora, read_lora, remove_loras, safetensors_hashes, save_lora
from .metadata import lora_metadata
from .network import LoRANetwork, LoRAWeightsError

__all__ = ["LoRAConfig", "LoRAConfigError", "LoRANetwork", "LoRAWeightsError", "apply_lora", "remove_loras",
           "read_lora", "save_lora", "lora_metadata", "safetensors_hashes"]
