"""ComfyUI entry point of the FLUX LoRA trainer pack.

Importing this must stay fast and free of side effects: no torch, no model code. Nodes import the trainer core
only when they run.
"""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
