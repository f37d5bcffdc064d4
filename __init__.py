"""ComfyUI entry point of the FLUX LoRA trainer pack (V3 node API).

Importing this must stay fast and free of side effects: no torch, no model code, not even ComfyUI's API. ComfyUI
calls `comfy_entrypoint()`, whose extension imports the nodes (`nodes/`) when it asks for the node list; the nodes
import the trainer core only when they run. There is deliberately no NODE_CLASS_MAPPINGS: with one, ComfyUI would
read it and ignore the V3 entry point.
"""

WEB_DIRECTORY = "./js"


async def comfy_entrypoint():
    from comfy_api.latest import ComfyExtension

    class FluxLoraTrainerExtension(ComfyExtension):
        async def get_node_list(self):
            from .nodes import node_list

            return node_list()

    return FluxLoraTrainerExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
