"""Every checkpoint of a run compared in the graph: "LoRA Checkpoints" applies each LoRA the train node saved, at
each strength, to MODEL (and CLIP) and outputs them as lists, so that one stock KSampler downstream renders the
same prompt and seed once per (checkpoint, strength); "Label Grid" gathers the images into one labelled grid.
ComfyUI caches both: a re-queue with the same inputs runs neither again."""

from __future__ import annotations

from comfy_api.latest import io

from ..trainer.errors import ConfigError
from .apply import apply_lora
from .checkpoint_list import cell_labels, parse_strengths
from .common import CATEGORY, PREFIX, Checkpoints, node_errors

MAX_CELLS = 256  # each cell is a sampler run; more is a typo ("0.1 0.2 ..." with hundreds of checkpoints)


class FluxLoraTrainerCheckpoints(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}Checkpoints", display_name="FLUX LoRA Trainer: LoRA Checkpoints", category=CATEGORY,
            description="Applies every LoRA the train node saved (save_every_n_steps / epochs, and the final one) at "
                        "each strength, and outputs lists: one stock KSampler downstream then renders the same prompt "
                        "and seed once per checkpoint and strength. Feed the images and labels to Label Grid.",
            inputs=[
                io.Model.Input("model", tooltip="The FLUX model (e.g. from Load Diffusion Model)."),
                Checkpoints.Input("checkpoints", tooltip="The train node's 'checkpoints' output."),
                io.Clip.Input("clip", optional=True,
                              tooltip="The FLUX text encoders; patched too (matters for a LoRA that trained them)."),
                io.String.Input("strengths", default="1.0",
                                tooltip="LoRA strengths to sweep, separated by commas, e.g. '0.5, 1.0'."),
            ],
            outputs=[
                io.Model.Output("MODEL", display_name="MODEL", is_output_list=True,
                                tooltip="One MODEL per checkpoint and strength (checkpoint-major)."),
                io.Clip.Output("CLIP", display_name="CLIP", is_output_list=True,
                               tooltip="The matching CLIPs (the input CLIP patched; none if no CLIP is connected)."),
                io.String.Output("label", display_name="label", is_output_list=True,
                                 tooltip="'step N, strength S' for each, for Label Grid."),
            ],
        )

    @classmethod
    def execute(cls, model, checkpoints, strengths, clip=None) -> io.NodeOutput:
        import comfy.utils

        with node_errors():
            values = parse_strengths(strengths)
            checkpoints = _checked(checkpoints, len(values))
        models, clips = [], []
        for checkpoint in checkpoints:
            try:
                lora = comfy.utils.load_torch_file(checkpoint.path, safe_load=True)
            except Exception as e:  # a damaged or foreign file: say which, not a traceback
                raise ValueError(f"LoRA checkpoint {checkpoint.path}: cannot be read as a LoRA ({e})") from None
            for strength in values:
                patched_model, patched_clip = apply_lora(model, clip, lora, strength, strength)
                models.append(patched_model)
                clips.append(patched_clip)
        labels = cell_labels(checkpoints, values)
        return io.NodeOutput(models, clips, labels, ui={"text": ["\n".join(labels)]})


def _checked(checkpoints, strengths: int) -> tuple:
    from pathlib import Path

    checkpoints = tuple(checkpoints or ())
    if not checkpoints:
        raise ConfigError("checkpoints: the list is empty; connect the train node's 'checkpoints' output")
    if len(checkpoints) * strengths > MAX_CELLS:
        raise ConfigError(f"checkpoints x strengths: {len(checkpoints)} x {strengths} images; at most {MAX_CELLS}")
    for checkpoint in checkpoints:
        if not Path(checkpoint.path).is_file():
            raise ConfigError(f"checkpoints: {checkpoint.path} ({checkpoint.label}) no longer exists; queue the "
                              "training again")
    return checkpoints


class FluxLoraTrainerLabelGrid(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}LabelGrid", display_name="FLUX LoRA Trainer: Label Grid", category=CATEGORY,
            description="Gathers a list of images (e.g. one per checkpoint and strength) into one grid, each cell "
                        "labelled.",
            is_input_list=True,
            inputs=[
                io.Image.Input("images", tooltip="The images, one per label (a list, e.g. from VAE Decode after "
                                                 "LoRA Checkpoints; each item may be a batch)."),
                io.String.Input("labels", force_input=True, tooltip="LoRA Checkpoints' 'label' output."),
                io.Int.Input("columns", default=0, min=0, max=256,
                             tooltip="Cells per row; 0 = about square. The number of strengths puts one "
                                     "checkpoint per row."),
            ],
            outputs=[io.Image.Output(display_name="IMAGE")],
        )

    @classmethod
    def execute(cls, images, labels, columns) -> io.NodeOutput:
        from .grid_image import label_grid

        pictures, names = [], []
        for i, batch in enumerate(images):
            for image in batch:  # IMAGE: [B, H, W, 3] in 0..1
                pictures.append(_to_pil(image))
                names.append(labels[i] if i < len(labels) else "")
        with node_errors():
            grid = label_grid(pictures, names, int(columns[0]))
        return io.NodeOutput(_to_tensor(grid))


def _to_pil(image):
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.clip(image.cpu().numpy() * 255.0 + 0.5, 0, 255).astype(np.uint8))


def _to_tensor(image):
    import numpy as np
    import torch

    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]


NODES = [FluxLoraTrainerCheckpoints, FluxLoraTrainerLabelGrid]
