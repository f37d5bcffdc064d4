"""Models node: which FLUX.1 (or Chroma) files to train on, from ComfyUI's model folders. Nothing is loaded here;
the file headers are read so a wrong file in a slot fails on this node with the core's message, and a Chroma
transformer is recognised from its file (no CLIP-L then)."""

from __future__ import annotations

from comfy_api.latest import io

from ..trainer.config.sections import MemoryConfig
from .common import (
    CATEGORY,
    PREFIX,
    Models,
    comfy_package_dir,
    first,
    model_choices,
    node_errors,
    optional_file_choices,
)
from .translate import BASE_PRECISIONS, default, for_transformer, model_fields


class FluxLoraTrainerModels(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        transformers = model_choices("diffusion_models")
        encoders = model_choices("text_encoders")
        vaes = model_choices("vae")
        precision_default = next(k for k, v in BASE_PRECISIONS.items() if v == default(MemoryConfig, "fp8_base"))
        return io.Schema(
            node_id=f"{PREFIX}Models", display_name="FLUX LoRA Trainer: Models", category=CATEGORY,
            description="The FLUX.1 files to train on, from ComfyUI's model folders. Nothing loads until the train "
                        "node runs; a file in the wrong slot is reported here.",
            inputs=[
                io.Combo.Input("transformer", options=transformers, default=first(transformers, ("flux",)),
                               tooltip="FLUX.1 dev or schnell transformer (models/diffusion_models, also models/unet): "
                                       "BFL, ComfyUI or diffusers layout, bf16/fp16/fp8; or a Chroma transformer "
                                       "(e.g. Chroma1-Base), recognised from the file."),
                io.Combo.Input("clip_l", options=encoders, default=first(encoders, ("clip_l", "clip")),
                               tooltip="CLIP-L text encoder (models/text_encoders or models/clip), e.g. "
                                       "clip_l.safetensors. Not used for Chroma."),
                io.Combo.Input("t5xxl", options=encoders, default=first(encoders, ("t5",)),
                               tooltip="T5-XXL text encoder (models/text_encoders or models/clip), e.g. "
                                       "t5xxl_fp16.safetensors or t5xxl_fp8_e4m3fn.safetensors."),
                io.Combo.Input("ae", options=vaes, default=first(vaes, ("ae", "flux")),
                               tooltip="FLUX autoencoder (models/vae), e.g. ae.safetensors."),
                io.Combo.Input("checkpoint", options=optional_file_choices("checkpoints"), default="(none)",
                               tooltip="A full ComfyUI FLUX checkpoint (models/checkpoints) holding transformer, "
                                       "autoencoder and text encoders: set a slot above to '(from checkpoint)' "
                                       "to read that part from it."),
                io.Combo.Input("base_precision", options=list(BASE_PRECISIONS), default=precision_default,
                               tooltip="Weights of the transformer's blocks while training: bf16, or fp8_e4m3fn to "
                                       "save about 11 GiB (needs bf16/fp16 mixed precision; the LoRA itself "
                                       "trains in full precision)."),
                io.Boolean.Input("t5xxl_fp8", default=False,
                                 tooltip="Keep T5-XXL's weights in fp8 while it encodes the captions (the guide's "
                                         "10 GB and 8 GB rows)."),
            ],
            outputs=[Models.Output("models", display_name="models", tooltip="The chosen files, for the train node.")],
        )

    @classmethod
    def execute(cls, transformer, clip_l, t5xxl, ae, checkpoint, base_precision, t5xxl_fp8) -> io.NodeOutput:
        import folder_paths

        with node_errors():
            from ..trainer.models import check_model_file, read_flux_params
            from .paths import comfy_tokenizers

            files = model_fields(transformer=transformer, clip_l=clip_l, t5xxl=t5xxl, ae=ae, checkpoint=checkpoint,
                                 base_precision=base_precision, t5xxl_fp8=t5xxl_fp8,
                                 full_path=folder_paths.get_full_path,
                                 tokenizers=comfy_tokenizers(comfy_package_dir()))
            params = read_flux_params(files.models.pretrained_model_name_or_path)
            files = for_transformer(files, params.variant)
            for slot in ("clip_l", "t5xxl", "ae"):
                if getattr(files.models, slot) is not None:
                    check_model_file(getattr(files.models, slot), slot)
        text = (f"{transformer_label(params)}: {params.depth} double + {params.depth_single_blocks} single blocks, "
                f"hidden {params.hidden_size}; base {base_precision}"
                + ("; T5-XXL in fp8" if files.t5xxl_fp8 else "")
                + ("; CLIP-L not used" if files.models.clip_l is None else ""))
        return io.NodeOutput(files, ui={"text": [text]})


def transformer_label(params) -> str:
    """What the file is, as the node says it: FLUX.1 dev, FLUX.1 schnell or Chroma."""
    if params.variant == "chroma":
        return "Chroma"
    return f"FLUX.1 {'dev' if params.guidance_embed else 'schnell'}"


NODES = [FluxLoraTrainerModels]
