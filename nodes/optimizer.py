"""Optimizer node: optimizer, learning rate and schedule, gradient clipping and accumulation (sd-scripts' names;
choices and defaults from trainer.config)."""

from __future__ import annotations

from comfy_api.latest import io

from ..trainer.config import OPTIMIZERS, SCHEDULERS, canonical_optimizer
from .common import CATEGORY, PREFIX, Optimizer, node_errors
from .translate import optimizer_fields, recommended

LR_STEP = 0.000001


class FluxLoraTrainerOptimizer(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        rec = recommended().optimizer
        needs = ", ".join(f"{name} needs {package}" for name, package in OPTIMIZERS.items() if package)
        return io.Schema(
            node_id=f"{PREFIX}Optimizer", display_name="FLUX LoRA Trainer: Optimizer", category=CATEGORY,
            description="Optimizer and learning-rate schedule. Without this node the train node uses "
                        f"{canonical_optimizer(rec.optimizer_type)} at {rec.learning_rate:g}, "
                        f"{rec.lr_scheduler}.",
            inputs=[
                io.Combo.Input("optimizer_type", options=list(OPTIMIZERS),
                               default=canonical_optimizer(rec.optimizer_type),
                               tooltip="AdamW is the reference; AdamW8bit / Adafactor save memory (the guide's 12 GB "
                                       f"row uses AdamW8bit). {needs}."),
                io.Float.Input("learning_rate", default=rec.learning_rate, min=0.0, max=1.0, step=LR_STEP,
                               tooltip="Learning rate of the transformer's LoRA (1e-4 is the usual start; the "
                                       "D-Adaptation family and Prodigy set their own step size and take 1.0)."),
                io.Combo.Input("lr_scheduler", options=list(SCHEDULERS), default=rec.lr_scheduler,
                               tooltip="How the learning rate changes over the run."),
                io.Float.Input("lr_warmup_steps", default=float(rec.lr_warmup_steps), min=0.0, max=100000.0,
                               step=0.01, tooltip="Warmup: a step count, or below 1 a fraction of all steps."),
                io.Int.Input("lr_scheduler_num_cycles", default=rec.lr_scheduler_num_cycles, min=1, max=1000,
                             tooltip="Restarts of cosine_with_restarts."),
                io.Float.Input("lr_scheduler_power", default=rec.lr_scheduler_power, min=0.01, max=100.0, step=0.1,
                               tooltip="Power of the polynomial schedule."),
                io.Float.Input("lr_scheduler_min_lr_ratio", default=rec.lr_scheduler_min_lr_ratio or 0.0, min=0.0,
                               max=1.0, step=0.01,
                               tooltip="Lowest learning rate as a share of the start (cosine_with_min_lr, "
                                       "warmup_stable_decay)."),
                io.Float.Input("max_grad_norm", default=rec.max_grad_norm, min=0.0, max=100.0, step=0.1,
                               tooltip="Gradient clipping (0 = off; the Adafactor recipe uses 0)."),
                io.Int.Input("gradient_accumulation_steps", default=rec.gradient_accumulation_steps,
                             min=1, max=1024, tooltip="Batches summed into one optimizer step."),
                io.String.Input("optimizer_args", multiline=True, default="",
                                tooltip="key=value arguments for the optimizer, one per line, e.g. weight_decay=0.01 "
                                        "or betas=(0.9,0.99). Empty with Adafactor = the guide's recipe "
                                        "(relative_step=False scale_parameter=False warmup_init=False)."),
            ],
            outputs=[Optimizer.Output("optimizer", display_name="optimizer",
                                      tooltip="Optimizer settings, for the train node.")],
        )

    @classmethod
    def execute(cls, **widgets) -> io.NodeOutput:
        with node_errors():
            section, notes = optimizer_fields(**widgets)
        text = f"{section.optimizer_type} at {section.learning_rate:g}, {section.lr_scheduler}"
        return io.NodeOutput(section, ui={"text": ["\n".join([text, *notes])]})


NODES = [FluxLoraTrainerOptimizer]
