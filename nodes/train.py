"""Train node: the one node that runs the core's `train()`. It unloads ComfyUI's models, trains with progress,
previews, websocket events and Cancel, copies the LoRA into ComfyUI's loras folder (never over an existing file),
and outputs the LoRA as ComfyUI's LORA_MODEL, its file name, a loss curve and the newest previews.

Files: the run writes into `<ComfyUI output>/flux_lora_trainer/<output_name>/` (LoRA, states, previews, metrics),
disk caches into `<ComfyUI output>/flux_lora_trainer/cache/`; output names that could leave those folders are
refused. Re-queuing the same graph does not train again: ComfyUI reuses the cached outputs while no input changes.
Out of memory ends the prompt with the core's one message (where, what was resident, what to change), the LoRA and
a resumable state of the last good step saved and the GPU memory given back; with the memory node's `auto` the run
goes on one setting leaner instead.
"""

from __future__ import annotations

from pathlib import Path

from comfy_api.latest import io

from ..trainer.config import LOSS_TYPES, PREDICTION_TYPES, TIMESTEP_SAMPLINGS
from .checkpoint_list import list_checkpoints, resumed_step_in
from .common import (
    CATEGORY,
    PREFIX,
    Checkpoints,
    Datasets,
    Memory,
    Models,
    Network,
    Optimizer,
    node_errors,
    output_dir,
)
from .paths import cache_folder, copy_without_overwrite, resolve_state_folder, run_folder, state_folders
from .translate import FLOW_WIDGETS, NONE, recommended, train_config

DEFAULT_NAME = "flux_lora"
MAX_LOG_LINES = 40


class FluxLoraTrainerTrain(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        rec = recommended()
        flow = rec.flow
        try:
            states = state_folders(output_dir())
        except Exception:
            states = []
        return io.Schema(
            node_id=f"{PREFIX}Train", display_name="FLUX LoRA Trainer: Train", category=CATEGORY,
            description="Trains the LoRA (ComfyUI's own models are unloaded first). Progress, loss and previews show "
                        "on the node; Cancel stops within a step and saves the LoRA and a resumable state. Outputs "
                        "the LoRA for 'Apply LoRA' (or ComfyUI's Load LoRA Model) and saves it in models/loras.",
            is_output_node=True,
            hidden=[io.Hidden.unique_id],
            inputs=[
                Models.Input("models", tooltip="From the models node."),
                Datasets.Input("datasets", tooltip="From a dataset node (or a chain of them) or the TOML node."),
                Network.Input("network", optional=True, tooltip="From the network node; default: rank "
                                                                f"{rec.network.network_dim} on every block."),
                Optimizer.Input("optimizer", optional=True, tooltip="From the optimizer node; default: AdamW at "
                                                                    f"{rec.optimizer.learning_rate:g}."),
                Memory.Input("memory", optional=True, tooltip="From the memory node; default: gradient "
                                                              "checkpointing, caches in memory."),
                io.String.Input("output_name", default=DEFAULT_NAME,
                                tooltip="Name of the LoRA file (models/loras/<name>.safetensors; an existing file is "
                                        "never replaced: _2, _3 ... are added) and of the run folder "
                                        "output/flux_lora_trainer/<name>. No folders, no '..'."),
                io.Int.Input("max_train_steps", default=rec.run.max_train_steps, min=1, max=1_000_000,
                             tooltip="Optimizer steps to train (unless epochs are set)."),
                io.Int.Input("max_train_epochs", default=rec.run.max_train_epochs or 0, min=0, max=100_000,
                             tooltip="Epochs to train instead of steps; 0 = use the steps."),
                # control_after_generate=False: without it the frontend adds its "randomize" control to any INT
                # named seed, which reseeds after every queue, so the next queue would train again
                io.Int.Input("seed", default=-1 if rec.run.seed is None else rec.run.seed, min=-1, max=2**31 - 1,
                             control_after_generate=False,
                             tooltip="Seed of noise, timesteps and LoRA initialisation; -1 = a new random seed "
                                     "each run (it is written in the LoRA's metadata)."),
                io.Int.Input("save_every_n_steps", default=rec.saving.save_every_n_steps or 0, min=0, max=1_000_000,
                             tooltip="Also save the LoRA every N steps in the run folder (0 = only at the end)."),
                io.Boolean.Input("save_state", default=rec.saving.save_state,
                                 tooltip="Save a resumable state with each save (a Cancel always saves one)."),
                io.String.Input("sample_prompts", multiline=True, default="",
                                tooltip="Preview prompts, one per line, sd-scripts syntax: 'a photo of sks dog --w "
                                        "512 --h 512 --s 20 --d 42 --g 3.5'. Empty = no previews."),
                io.Int.Input("sample_every_n_steps", default=rec.previews.sample_every_n_steps or 0, min=0,
                             max=1_000_000,
                             tooltip="Render the previews every N steps (0 = only at the end)."),
                io.Combo.Input("timestep_sampling", options=list(TIMESTEP_SAMPLINGS), default=flow.timestep_sampling,
                               tooltip="How noise levels are drawn: flux_shift (resolution-dependent shift, "
                                       "recommended), shift, sigmoid, uniform, sigma."),
                io.Float.Input("discrete_flow_shift", default=flow.discrete_flow_shift, min=0.0001, max=100.0,
                               step=0.0001, tooltip="Shift for the 'shift' and 'sigma' samplings (3.1582 = "
                                                  "flux_shift's value at 1024²)."),
                io.Float.Input("sigmoid_scale", default=flow.sigmoid_scale, min=0.01, max=100.0, step=0.01,
                               tooltip="Scale of the normal draw before the sigmoid."),
                io.Combo.Input("model_prediction_type", options=list(PREDICTION_TYPES),
                               default=flow.model_prediction_type,
                               tooltip="raw (recommended), additive or sigma_scaled."),
                io.Float.Input("guidance_scale", default=flow.guidance_scale, min=0.0, max=100.0, step=0.1,
                               tooltip="Guidance value fed to FLUX.1-dev while training; 1.0 is recommended."),
                io.Combo.Input("loss_type", options=list(LOSS_TYPES), default=flow.loss_type,
                               tooltip="l2 (usual), l1, huber, smooth_l1 (huber needs --huber_schedule constant or "
                                       "exponential in extra_options)."),
                io.Boolean.Input("apply_t5_attn_mask", default=rec.models.apply_t5_attn_mask,
                                 tooltip="Mask T5's padding tokens in T5 and in every attention."),
                io.Int.Input("t5xxl_max_token_length", default=rec.models.t5xxl_max_token_length or 0, min=0, max=512,
                             tooltip="T5 tokens per caption; 0 = 512 for dev, 256 for schnell."),
                io.Combo.Input("resume", options=[NONE, *states], default=NONE,
                               tooltip="Continue a run from a state saved in output/flux_lora_trainer (a Cancel "
                                       "saves one)."),
                io.String.Input("extra_options", multiline=True, default="",
                                tooltip="Any other sd-scripts training option, command-line style, e.g. "
                                        "--weighting_scheme logit_normal --huber_schedule constant --huber_c 0.1 "
                                        "--save_last_n_steps 2 --sample_at_first --mixed_precision fp16. Files and "
                                        "folders are set by the nodes, not here."),
            ],
            outputs=[
                io.LoraModel.Output("lora", display_name="lora",
                                    tooltip="The trained LoRA (kohya keys) for 'Apply LoRA' or ComfyUI's Load LoRA "
                                            "Model."),
                io.String.Output("lora_name", display_name="lora_name",
                                 tooltip="The LoRA's file name in models/loras."),
                io.Image.Output("loss_curve", display_name="loss_curve",
                                tooltip="Loss per step and its moving average."),
                io.Image.Output("previews", display_name="previews",
                                tooltip="The newest preview images (a blank 64x64 if none)."),
                Checkpoints.Output("checkpoints", display_name="checkpoints",
                                   tooltip="Every LoRA the run saved (save_every_n_steps / epochs, and the final one) "
                                           "with its step, a resumed run's earlier saves included: for 'LoRA "
                                           "Checkpoints'."),
            ],
        )

    @classmethod
    def execute(cls, models, datasets, output_name, resume, sample_prompts, extra_options, network=None,
                optimizer=None, memory=None, **widgets) -> io.NodeOutput:
        import comfy.model_management as mm
        import folder_paths

        from ..trainer.config.memory_plan import available_host_bytes
        from ..trainer.errors import Stopped, TrainerError
        from ..trainer.events import MemoryPlanned, Message
        from ..trainer.loop import train
        from .reporter import ComfyReporter

        comfy_output = folder_paths.get_output_directory()
        with node_errors():
            run_dir = run_folder(comfy_output, output_name)
            resume_dir = None if resume in (None, "", NONE) else resolve_state_folder(resume, comfy_output)
            resumed_step = resumed_step_in(run_dir, resume_dir)  # before the run saves over the state
        device = mm.get_torch_device()
        mm.unload_all_models()
        mm.soft_empty_cache()
        auto = memory is not None and getattr(memory, "auto", False)
        with node_errors():
            plan = train_config(
                models=models, datasets=datasets, network=network, optimizer=optimizer, memory=memory,
                flow={k: widgets.pop(k) for k in FLOW_WIDGETS}, sample_prompts=sample_prompts,
                extra_options=extra_options, output_dir=run_dir, output_name=output_name,
                cache_dir=cache_folder(comfy_output), resume=resume_dir, device=str(device),
                free_memory=mm.get_free_memory(device) if auto else None, device_type=device.type,
                free_host=available_host_bytes() if auto and device.type == "cuda" else None,
                transformer=_transformer_size(models) if auto else None, **widgets)
        run_dir.mkdir(parents=True, exist_ok=True)
        reporter = ComfyReporter.for_node(cls.hidden.unique_id if cls.hidden else None)
        for note in plan.notes:
            reporter.emit(Message(note))
        if plan.memory is not None:
            reporter.emit(MemoryPlanned.of(plan.memory))
        try:
            result = train(plan.config, reporter, step_down=auto)  # auto: out of memory steps down
        except Stopped as e:
            if reporter.cancelled:
                mm.interrupt_current_processing(True)
                mm.throw_exception_if_processing_interrupted()
            raise ValueError(str(e)) from None
        except TrainerError as e:
            raise ValueError(str(e)) from None
        finally:
            mm.soft_empty_cache()
        if result.stopped_early:  # LoRA and state are saved in the run folder; end the prompt as interrupted
            mm.interrupt_current_processing(True)
            mm.throw_exception_if_processing_interrupted()
        checkpoints = list_checkpoints(run_dir, output_name, result.lora, result.steps, resumed_step)
        return cls._outputs(plan, result, reporter, output_name, run_dir, checkpoints)

    @classmethod
    def _outputs(cls, plan, result, reporter, output_name: str, run_dir: Path, checkpoints: tuple) -> io.NodeOutput:
        import folder_paths

        from .images import loss_curve

        loras = folder_paths.get_folder_paths("loras")[0]
        target = copy_without_overwrite(result.lora, loras, output_name)
        lines = [f"{result.steps} steps" + (f"; last loss {result.losses[-1]:.4f}" if result.losses else ""),
                 f"LoRA: {target.name} in {loras}"]
        if target.name != f"{output_name}.safetensors":
            lines.append(f"note: {output_name}.safetensors already existed in {loras}; this LoRA is {target.name}")
        lines.append(f"run folder: {run_dir}")
        lines += reporter.log[-MAX_LOG_LINES:]
        loss_image = _batch([loss_curve(result.losses)])  # the losses of every step, a resumed run's included
        previews = _batch(reporter.previews) if reporter.previews else _blank()
        return io.NodeOutput(result.state_dict, target.name, loss_image, previews, checkpoints,
                             ui={"text": ["\n".join(lines)], "loss": [float(v) for v in result.losses]})


def _batch(images):
    """PIL images -> ComfyUI's IMAGE: float tensor [B, H, W, 3] in 0..1."""
    import numpy as np
    import torch

    from .images import same_size

    return torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in same_size(images)]))


def _blank():
    import torch

    return torch.zeros(1, 64, 64, 3)


NODES = [FluxLoraTrainerTrain]


def _transformer_size(models):
    """The chosen transformer's parameter counts, from its file's header, for the memory plan (None for anything
    but the models node's output, which train_config refuses by name)."""
    from ..trainer.config.memory_plan import TransformerSize
    from ..trainer.models import read_flux_params
    from .pieces import ModelFiles

    if not isinstance(models, ModelFiles):
        return None
    return TransformerSize.of(read_flux_params(models.models.pretrained_model_name_or_path))
