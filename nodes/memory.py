"""Memory node: gradient checkpointing, block swap, CPU-offloaded checkpointing, fp8 base, and where latents and
text-encoder outputs are cached; or `auto`, which the train node plans from the free VRAM after it has unloaded
ComfyUI's models (the guide's 24/16/12/10/8 GB table and the host memory block swap pins, explained on the node);
with `auto` a run that runs out of memory goes on from its last good step one setting leaner."""

from __future__ import annotations

from comfy_api.latest import io

from ..trainer.config.memory_plan import available_host_bytes
from ..trainer.config.swap_split import MAX_SWAPPED_BLOCKS
from .common import CATEGORY, PREFIX, Memory, node_errors
from .paths import CACHE_FOLDER, OUR_FOLDER
from .translate import CACHE_MODES, MEMORY_MODES, cache_mode, memory_fields, plan_memory, recommended


class FluxLoraTrainerMemory(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        rec = recommended()
        return io.Schema(
            node_id=f"{PREFIX}Memory", display_name="FLUX LoRA Trainer: Memory", category=CATEGORY,
            description="How training fits in the GPU's memory. 'auto' picks from the free VRAM following the "
                        "guide's table and says why; 'manual' uses the widgets.",
            inputs=[
                io.Combo.Input("mode", options=list(MEMORY_MODES), default="manual",
                               tooltip="auto: the train node measures the free VRAM after unloading ComfyUI's "
                                       "models and picks the settings below itself (shown on the train node); if "
                                       "training still runs out of memory it goes on from the last good step with "
                                       "more blocks swapped, then fp8, and says so."),
                io.Boolean.Input("gradient_checkpointing", default=rec.memory.gradient_checkpointing,
                                 tooltip="Recompute activations in the backward pass: far less memory, ~25% slower."),
                io.Int.Input("blocks_to_swap", default=rec.memory.blocks_to_swap or 0, min=0, max=MAX_SWAPPED_BLOCKS,
                             tooltip="Free the GPU memory of this many transformer blocks (0 = off; sd-scripts' "
                                     "--blocks_to_swap): their weights stay in pinned CPU memory and stream in "
                                     "while the blocks before them compute. The guide: 16 for 12 GB, 22 for 10 GB, "
                                     "28 for 8 GB."),
                io.Boolean.Input("cpu_offload_checkpointing", default=rec.memory.cpu_offload_checkpointing,
                                 tooltip="Keep checkpointed activations in CPU memory (needs gradient "
                                         "checkpointing; saves about 1 GiB at 1024², much slower: block swap first)."),
                io.Boolean.Input("fp8_base", default=rec.memory.fp8_base,
                                 tooltip="Transformer block weights in fp8 (also set by the models node's "
                                         "base_precision; either turns it on)."),
                io.Combo.Input("latent_cache", options=list(CACHE_MODES),
                               default=cache_mode(rec.caching.cache_latents, rec.caching.cache_latents_to_disk),
                               tooltip="Encode every image once before training: in memory, on disk (reused by "
                                       f"later runs; in output/{OUR_FOLDER}/{CACHE_FOLDER}) or off."),
                io.Combo.Input("text_cache", options=list(CACHE_MODES),
                               default=cache_mode(rec.caching.cache_text_encoder_outputs,
                                                  rec.caching.cache_text_encoder_outputs_to_disk),
                               tooltip="Encode every caption once, then free the text encoders: in memory, on disk "
                                       "or off (off when captions change each step or T5 is trained)."),
                io.Boolean.Input("cache_beside_images", default=False,
                                 tooltip="Write disk caches beside the images, as sd-scripts does (so sd-scripts "
                                         "can reuse them), instead of in our cache folder. Writes into the image "
                                         "folder."),
            ],
            outputs=[Memory.Output("memory", display_name="memory", tooltip="Memory settings, for the train node.")],
        )

    @classmethod
    def execute(cls, **widgets) -> io.NodeOutput:
        with node_errors():
            choice = memory_fields(**widgets)
        if choice.auto:
            text = _auto_preview()
        else:
            memory = choice.memory
            text = (f"checkpointing {'on' if memory.gradient_checkpointing else 'off'}, blocks to swap "
                    f"{memory.blocks_to_swap or 0}, fp8 base {'on' if memory.fp8_base else 'off'}, latents "
                    f"{widgets['latent_cache']}, text {widgets['text_cache']}")
        return io.NodeOutput(choice, ui={"text": [text]})


def _auto_preview() -> str:
    """What auto would pick now; the train node plans again after unloading ComfyUI's models."""
    try:
        import comfy.model_management as mm

        device = mm.get_torch_device()
        device_type = getattr(device, "type", str(device))
        plan = plan_memory(mm.get_free_memory(device), device_type,
                           host_free_bytes=available_host_bytes() if device_type == "cuda" else None)
    except Exception as e:  # a preview only: the train node's plan is the one that counts
        return f"auto: planned by the train node ({e})"
    return plan.text() + "\n(measured now; the train node measures again after unloading ComfyUI's models)"


NODES = [FluxLoraTrainerMemory]
