"""LoRA network node: rank and alpha, per-layer ranks, which blocks get a LoRA, text-encoder LoRAs, LoRA+,
dropouts, and continuing from a LoRA in ComfyUI's loras folder. The options are sd-scripts' `networks.lora_flux`
ones (LoRAConfig); anything without a widget goes in `network_args` as key=value lines."""

from __future__ import annotations

from comfy_api.latest import io

from ..trainer.config import IN_DIM_TARGETS, TRAIN_BLOCKS, TYPE_DIM_OPTIONS, LoRAConfig
from ..trainer.config.sections import ModelsConfig
from .common import CATEGORY, PREFIX, Network, node_errors, optional_file_choices
from .translate import BLOCK_PRESETS, NONE, default, network_fields, recommended

TYPE_DIM_TIPS = {
    "img_attn_dim": "image attention (qkv, proj) in double blocks",
    "txt_attn_dim": "text attention (qkv, proj) in double blocks",
    "img_mlp_dim": "image MLP in double blocks", "txt_mlp_dim": "text MLP in double blocks",
    "img_mod_dim": "image modulation in double blocks", "txt_mod_dim": "text modulation in double blocks",
    "single_dim": "linear1/linear2 in single blocks", "single_mod_dim": "modulation in single blocks",
}
LR_STEP = 0.000001


def _dropout(name: str) -> float:
    return default(LoRAConfig, name) or 0.0


class FluxLoraTrainerNetwork(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        rec = recommended().network
        type_dims = [io.Int.Input(name, default=-1 if default(LoRAConfig, name) is None else default(LoRAConfig, name),
                                  min=-1, max=1024,
                                  tooltip=f"Rank for {TYPE_DIM_TIPS[name]}: -1 = the main rank, 0 = no LoRA there.")
                     for name in TYPE_DIM_OPTIONS]
        return io.Schema(
            node_id=f"{PREFIX}Network", display_name="FLUX LoRA Trainer: LoRA Network", category=CATEGORY,
            description="Which layers and blocks get a LoRA, at which rank; text-encoder LoRAs; LoRA+; dropout; "
                        "continue from an existing LoRA. Without this node the train node uses rank "
                        f"{rec.network_dim} on every block, transformer only.",
            inputs=[
                io.Int.Input("network_dim", default=rec.network_dim, min=1, max=1024,
                             tooltip="LoRA rank: capacity (and file size). 16-32 for a person or style."),
                io.Float.Input("network_alpha", default=float(rec.network_alpha), min=0.0, max=1024.0, step=0.01,
                               tooltip="LoRA alpha: scale = alpha / rank (0 = same as the rank)."),
                io.Combo.Input("block_preset", options=list(BLOCK_PRESETS), default="custom",
                               tooltip="Which blocks get a LoRA; 'custom' uses the two index fields below."),
                io.String.Input("double_blocks", default=rec.train_double_block_indices or "all",
                                tooltip="Double-block indices (FLUX.1: 0-18): 'all', 'none', or e.g. '0-5,10'."),
                io.String.Input("single_blocks", default=rec.train_single_block_indices or "all",
                                tooltip="Single-block indices (FLUX.1: 0-37): 'all', 'none', or e.g. '7-20'."),
                io.Combo.Input("train_blocks", options=list(TRAIN_BLOCKS), default=rec.train_blocks,
                               tooltip="Train LoRAs in all blocks, single blocks only or double blocks only."),
                *type_dims,
                io.String.Input("in_dims", default="",
                                tooltip="Ranks for the embedders, five numbers for "
                                        f"{', '.join(IN_DIM_TARGETS)}, e.g. 4,0,0,0,4; empty = none."),
                io.Boolean.Input("split_qkv", default=rec.split_qkv,
                                 tooltip="Separate LoRAs for q, k and v in the attention projections."),
                io.Boolean.Input("train_clip_l", default=not rec.network_train_unet_only,
                                 tooltip="Also train a LoRA on CLIP-L (lora_te1_ keys)."),
                io.Boolean.Input("train_t5xxl", default=rec.train_t5xxl,
                                 tooltip="Also train a LoRA on T5-XXL (lora_te3_ keys; its outputs are then not "
                                         "cached, which costs memory and time)."),
                io.Float.Input("clip_l_lr", default=0.0, min=0.0, max=1.0, step=LR_STEP,
                               tooltip="Learning rate of the CLIP-L LoRA; 0 = the run's learning rate."),
                io.Float.Input("t5xxl_lr", default=0.0, min=0.0, max=1.0, step=LR_STEP,
                               tooltip="Learning rate of the T5-XXL LoRA; 0 = the run's learning rate."),
                io.Float.Input("loraplus_lr_ratio", default=rec.loraplus_lr_ratio or 0.0, min=0.0, max=64.0,
                               step=0.5, tooltip="LoRA+: the up weights learn this many times faster (0 = off; "
                                                 "16 is common)."),
                io.Float.Input("loraplus_unet_lr_ratio", default=rec.loraplus_unet_lr_ratio or 0.0, min=0.0,
                               max=64.0, step=0.5, tooltip="LoRA+ ratio for the transformer only (0 = the one "
                                                           "above)."),
                io.Float.Input("loraplus_text_encoder_lr_ratio", default=rec.loraplus_text_encoder_lr_ratio or 0.0,
                               min=0.0, max=64.0, step=0.5,
                               tooltip="LoRA+ ratio for the text encoders only (0 = the first one)."),
                io.Float.Input("network_dropout", default=_dropout("network_dropout"), min=0.0, max=0.99,
                               step=0.01, tooltip="Dropout on the LoRA's hidden units (0 = off)."),
                io.Float.Input("rank_dropout", default=_dropout("rank_dropout"), min=0.0, max=0.99, step=0.01,
                               tooltip="Drops whole ranks at random (0 = off)."),
                io.Float.Input("module_dropout", default=_dropout("module_dropout"), min=0.0, max=0.99,
                               step=0.01, tooltip="Skips whole LoRA layers at random for a step (0 = off)."),
                io.Combo.Input("continue_from", options=optional_file_choices("loras"), default=NONE,
                               tooltip="Start from this LoRA (models/loras) instead of from zero."),
                io.Boolean.Input("dim_from_weights", default=default(ModelsConfig, "dim_from_weights"),
                                 tooltip="Take ranks and layers from the LoRA above instead of these widgets."),
                io.String.Input("network_args", multiline=True, default="",
                                tooltip="More sd-scripts network_args, key=value, one per line, e.g. "
                                        "network_reg_dims=single.*linear1=8 or network_reg_lrs=double.*=5e-5."),
            ],
            outputs=[Network.Output("network", display_name="network", tooltip="The LoRA layout, for the train node.")],
        )

    @classmethod
    def execute(cls, network_dim, network_alpha, block_preset, double_blocks, single_blocks, train_blocks, in_dims,
                split_qkv, train_clip_l, train_t5xxl, clip_l_lr, t5xxl_lr, loraplus_lr_ratio, loraplus_unet_lr_ratio,
                loraplus_text_encoder_lr_ratio, network_dropout, rank_dropout, module_dropout, continue_from,
                dim_from_weights, network_args, **type_dims) -> io.NodeOutput:
        import folder_paths

        with node_errors():
            weights = None
            if continue_from not in (None, "", NONE):
                weights = folder_paths.get_full_path("loras", continue_from)
                if weights is None:
                    raise ValueError(f"continue_from: {continue_from!r} is not in ComfyUI's loras folder")
                from ..trainer.lora import read_lora

                read_lora(weights)  # a file that is no LoRA fails here, with the core's message
            choice = network_fields(
                network_dim=network_dim, network_alpha=network_alpha, block_preset=block_preset,
                train_double_block_indices=double_blocks, train_single_block_indices=single_blocks,
                train_blocks=train_blocks, split_qkv=split_qkv, in_dims=in_dims,
                type_dims={k: type_dims[k] for k in TYPE_DIM_OPTIONS if k in type_dims},
                train_clip_l=train_clip_l, train_t5xxl=train_t5xxl, clip_l_lr=clip_l_lr, t5xxl_lr=t5xxl_lr,
                loraplus_lr_ratio=loraplus_lr_ratio, loraplus_unet_lr_ratio=loraplus_unet_lr_ratio,
                loraplus_text_encoder_lr_ratio=loraplus_text_encoder_lr_ratio, network_dropout=network_dropout,
                rank_dropout=rank_dropout, module_dropout=module_dropout, network_args=network_args,
                network_weights=weights, dim_from_weights=dim_from_weights)
        net = choice.network
        text = (f"rank {net.network_dim}, alpha {net.network_alpha:g}; double blocks "
                f"{net.train_double_block_indices or 'all'}, single blocks {net.train_single_block_indices or 'all'}"
                f" ({net.train_blocks}); text encoders: "
                + (", ".join(n for n, on in (("CLIP-L", not net.network_train_unet_only and train_clip_l),
                                             ("T5-XXL", net.train_t5xxl)) if on) or "none")
                + (f"; continues from {continue_from}" if weights else ""))
        return io.NodeOutput(choice, ui={"text": [text]})


NODES = [FluxLoraTrainerNetwork]
