"""LoRA files under sd-scripts' names where the cadence (cadence.py) says, the saves they retire removed, and their
metadata."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from .cadence import Save
from .events import Reporter, Saved
from .lora import lora_metadata, save_lora
from .output_names import final_lora_name, state_name

SAVE_DTYPES = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, None: torch.float32}


class LoRAWriter:
    """Writes the LoRA files a `Save` (cadence.py) names, and removes the earlier ones it retires."""

    def __init__(self, session):
        self.session = session
        self.config = session.config
        self.folder = Path(self.config.saving.output_dir)
        self.name = self.config.saving.name
        self.started = time.time()
        self.last_metadata: dict[str, str] | None = None
        # names of the step/epoch files and state folders this training wrote (a resumed one: its states list what
        # the runs before wrote): rotation deletes only these, never a file an earlier, other run left here
        self.written: list[str] = []

    def adopt(self, names) -> None:
        """The names a resumed state lists as written by the training it continues (rotated like this run's)."""
        self._mark(*[str(name) for name in names if isinstance(name, str) and "/" not in name and "\\" not in name])

    def _mark(self, *names: str) -> None:
        self.written += [name for name in names if name not in self.written]

    def final_state_folder(self) -> Path:
        return self.folder / state_name(final_lora_name(self.name))

    # ------------------------------------------------------------------------------------------ writing

    def _save(self, path: Path, step: int, epoch: int, reporter: Reporter) -> Path | None:
        if not self.session.world.is_main:
            return None
        self.last_metadata = self.metadata(step, epoch)
        save_lora(self.session.network, path, self.last_metadata, SAVE_DTYPES[self.config.saving.save_precision])
        reporter.emit(Saved(path, "lora", step))
        return path

    def save(self, save: Save, reporter: Reporter) -> Path | None:
        """The LoRA file `save` names (main process only), then the earlier saves it retires."""
        path = self._save(self.folder / save.lora, save.step, save.epoch, reporter)
        if save.kind != "final" and self.session.world.is_main:
            self._mark(save.lora)
        self._retire(save.retired, lambda p: p.unlink(missing_ok=True))
        return path

    def state_saved(self, save: Save) -> None:
        """After the loop saved the state folder `save` names: the earlier state folders it retires."""
        if save.kind != "final" and self.session.world.is_main:
            self._mark(save.state)
        self._retire(save.retired_states, lambda p: shutil.rmtree(p, ignore_errors=True))

    def _retire(self, names: tuple[str, ...], remove) -> None:
        """Remove files or folders of this training's (never one another run left under the same name)."""
        if not self.session.world.is_main:
            return
        for name in names:
            if name in self.written:
                remove(self.folder / name)
                self.written.remove(name)

    # ------------------------------------------------------------------------------------------ metadata

    def metadata(self, step: int, epoch: int) -> dict[str, str]:
        c, s = self.config, self.session
        opt, mem, saving, flow = c.optimizer, c.memory, c.saving, c.flow
        summaries = [d.summary() for d in s.datasets.datasets]
        training = {
            "ss_output_name": saving.output_name or "", "ss_learning_rate": opt.learning_rate,
            "ss_unet_lr": opt.unet_lr,
            "ss_text_encoder_lr": list(opt.text_encoder_lr) if opt.text_encoder_lr else opt.learning_rate,
            "ss_num_train_images": sum(x["num_train_images"] for x in summaries),
            "ss_num_reg_images": sum(x["num_reg_images"] for x in summaries),
            "ss_num_batches_per_epoch": len(s.datasets), "ss_num_epochs": s.epochs,
            "ss_gradient_checkpointing": mem.gradient_checkpointing,
            "ss_gradient_accumulation_steps": opt.gradient_accumulation_steps, "ss_max_train_steps": s.total_steps,
            "ss_lr_warmup_steps": opt.lr_warmup_steps, "ss_lr_scheduler": opt.lr_scheduler,
            "ss_mixed_precision": mem.mixed_precision, "ss_full_fp16": mem.full_fp16, "ss_seed": s.seed,
            "ss_optimizer": (opt.optimizer_type or "AdamW")
                            + (f"({','.join(opt.optimizer_args)})" if opt.optimizer_args else ""),
            "ss_max_grad_norm": opt.max_grad_norm, "ss_prior_loss_weight": c.data.prior_loss_weight,
            "ss_caption_dropout_rate": _first(s, "caption_dropout_rate"),
            "ss_caption_tag_dropout_rate": _first(s, "caption_tag_dropout_rate"),
            "ss_loss_type": flow.loss_type, "ss_huber_schedule": flow.huber_schedule, "ss_huber_c": flow.huber_c,
            "ss_huber_scale": flow.huber_scale, "ss_fp8_base": mem.fp8_base, "ss_fp8_base_unet": mem.fp8_base_unet,
            "ss_apply_t5_attn_mask": c.models.apply_t5_attn_mask, "ss_weighting_scheme": flow.weighting_scheme,
            "ss_logit_mean": flow.logit_mean, "ss_logit_std": flow.logit_std, "ss_mode_scale": flow.mode_scale,
            "ss_guidance_scale": flow.guidance_scale, "ss_timestep_sampling": flow.timestep_sampling,
            "ss_sigmoid_scale": flow.sigmoid_scale, "ss_model_prediction_type": flow.model_prediction_type,
            "ss_discrete_flow_shift": flow.discrete_flow_shift, "ss_steps": step, "ss_epoch": epoch,
            "ss_training_finished_at": time.time(), "ss_training_comment": saving.training_comment or "",
            "ss_num_validation_images": sum(len(d.held_out) for d in s.datasets.datasets),
            "ss_validation_seed": c.data.validation_seed if c.data.validation_seed is not None else s.seed,
            "ss_validation_split": c.data.validation_split,
            "ss_max_validation_steps": c.validation.max_validation_steps,
            "ss_datasets": json.dumps(summaries),
            "ss_tag_frequency": json.dumps({k: v for x in summaries for k, v in x["tag_frequency"].items()}),
            "ss_dataset_dirs": json.dumps({k: v for x in summaries for k, v in x["dataset_dirs"].items()}),
        }
        resolution = s.datasets.datasets[0].config.resolution
        meta = lora_metadata(c.network, s.flux.params.variant, saving.metadata_title or saving.output_name, resolution,
                             {k: v if isinstance(v, str) else json.dumps(v) if isinstance(v, (list, dict)) else str(v)
                              for k, v in training.items()}, timestamp=self.started)
        for option in MODELSPEC_OPTIONS:
            value = getattr(saving, f"metadata_{option}")
            if value is not None:
                meta[f"modelspec.{option}"] = value
        if saving.no_metadata:  # sd-scripts: only the keys a loader needs, and the model spec
            meta = {k: v for k, v in meta.items() if k in MINIMUM_KEYS or k.startswith("modelspec.")}
        return meta


# --metadata_<name> -> modelspec.<name>
MODELSPEC_OPTIONS = ("author", "description", "license", "tags", "usage_hint", "thumbnail", "merged_from",
                     "trigger_phrase", "preprocessor", "is_negative_embedding")
# what --no_metadata keeps (sd-scripts' SS_METADATA_MINIMUM_KEYS)
MINIMUM_KEYS = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                "ss_network_args")


def _first(session, option: str):
    for dataset in session.datasets.datasets:
        for subset in dataset.config.subsets:
            return getattr(subset, option)
    return 0
