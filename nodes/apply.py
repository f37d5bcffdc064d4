"""Apply node: the trained LORA_MODEL onto ComfyUI's MODEL and CLIP in the same graph (ComfyUI's file-based LoRA
loaders cannot see a file written in the same run, and its Load LoRA Model node patches the MODEL only)."""

from __future__ import annotations

from comfy_api.latest import io

from .common import CATEGORY, PREFIX


class FluxLoraTrainerApplyLora(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}ApplyLora", display_name="FLUX LoRA Trainer: Apply LoRA", category=CATEGORY,
            description="Applies a LoRA from the train node to a MODEL and its CLIP (text-encoder LoRAs too), for "
                        "sampling with it in the same graph.",
            inputs=[
                io.Model.Input("model", tooltip="The FLUX model (e.g. from Load Diffusion Model)."),
                io.Clip.Input("clip", tooltip="The FLUX text encoders (DualCLIPLoader, type flux)."),
                io.LoraModel.Input("lora", tooltip="The train node's 'lora' output."),
                io.Float.Input("strength_model", default=1.0, min=-100.0, max=100.0, step=0.01,
                               tooltip="Strength on the transformer."),
                io.Float.Input("strength_clip", default=1.0, min=-100.0, max=100.0, step=0.01,
                               tooltip="Strength on the text encoders (only matters for a LoRA that trained them)."),
            ],
            outputs=[io.Model.Output(display_name="MODEL"), io.Clip.Output(display_name="CLIP")],
        )

    @classmethod
    def execute(cls, model, clip, lora, strength_model, strength_clip) -> io.NodeOutput:
        return io.NodeOutput(*apply_lora(model, clip, lora, strength_model, strength_clip))


def apply_lora(model, clip, lora: dict, strength_model: float, strength_clip: float) -> tuple:
    """(MODEL, CLIP) with the LoRA state dict `lora` patched in by ComfyUI's own loader (clones; the inputs stay as
    they are). `clip` may be None (then None comes back)."""
    import comfy.sd

    if strength_model == 0 and strength_clip == 0:
        return model, clip
    return comfy.sd.load_lora_for_models(model, clip, lora, strength_model, strength_clip)


NODES = [FluxLoraTrainerApplyLora]
