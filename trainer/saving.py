"""LoRA files and state folders under sd-scripts' names, with its rotation rules and metadata."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from .events import Reporter, Saved
from .lora import lora_metadata, save_lora

SAVE_DTYPES = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, None: torch.float32}


class LoRAWriter:
    def __init__(self, session):
        self.session = session
        self.config = c = session.config
        # --save_n_epoch_ratio N: about N epoch saves over the run (sd-scripts: every floor(epochs / N), at least 1)
        self.every_n_epochs = (max(1, session.epochs // c.save_n_epoch_ratio) if c.save_n_epoch_ratio
                               else c.save_every_n_epochs)
        self.folder = Path(self.config.output_dir)
        self.name = self.config.name
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

    # ------------------------------------------------------------------------------------------ names

    def epoch_path(self, epoch: int) -> Path:
        return self.folder / f"{self.name}-{epoch:06d}.safetensors"

    def step_path(self, step: int) -> Path:
        return self.folder / f"{self.name}-step{step:08d}.safetensors"

    def final_path(self) -> Path:
        return self.folder / f"{self.name}.safetensors"

    def state_folder_for_epoch(self, epoch: int) -> Path:
        return self.folder / f"{self.name}-{epoch:06d}-state"

    def state_folder_for_step(self, step: int) -> Path:
        return self.folder / f"{self.name}-step{step:08d}-state"

    def final_state_folder(self) -> Path:
        return self.folder / f"{self.name}-state"

    # ------------------------------------------------------------------------------------------ writing

    def _save(self, path: Path, step: int, epoch: int, reporter: Reporter) -> Path | None:
        if not self.session.world.is_main:
            return None
        self.last_metadata = self.metadata(step, epoch)
        save_lora(self.session.network, path, self.last_metadata, SAVE_DTYPES[self.config.save_precision])
        reporter.emit(Saved(path, "lora", step))
        return path

    def save_final(self, step: int, epoch: int, reporter: Reporter) -> Path | None:
        return self._save(self.final_path(), step, epoch, reporter)

    def save_epoch(self, epoch: int, step: int, reporter: Reporter) -> None:
        self._save(self.epoch_path(epoch), step, epoch, reporter)
        if self.session.world.is_main:
            self._mark(self.epoch_path(epoch).name)
        old = self._expired_epoch(epoch)
        if old:
            self._remove(self.epoch_path(old), lambda p: p.unlink(missing_ok=True))

    def save_step(self, step: int, epoch: int, reporter: Reporter) -> None:
        self._save(self.step_path(step), step, epoch, reporter)
        if self.session.world.is_main:
            self._mark(self.step_path(step).name)
        self._drop_old_steps(step, ".safetensors", lambda p: p.unlink(missing_ok=True))

    def rotate_states_for_epoch(self, epoch: int) -> None:
        """--save_last_n_epochs_state (else --save_last_n_epochs) N: the state folders of the last N saves."""
        if self.session.world.is_main:
            self._mark(self.state_folder_for_epoch(epoch).name)  # the loop saved it just before
        old = self._expired_epoch(epoch, self.config.save_last_n_epochs_state or self.config.save_last_n_epochs)
        if old:
            self._remove(self.state_folder_for_epoch(old), lambda p: shutil.rmtree(p, ignore_errors=True))

    def _remove(self, path: Path, remove) -> None:
        """Remove a file or folder of this training's (never one another run left under the same name)."""
        if path.name in self.written:
            remove(path)
            self.written.remove(path.name)

    def _expired_epoch(self, epoch: int, keep: int | None = None) -> int | None:
        """--save_last_n_epochs N: the epoch whose save falls out of the last N when `epoch` is saved."""
        keep = self.config.save_last_n_epochs if keep is None else keep
        every = self.every_n_epochs
        if not keep or not every or not self.session.world.is_main:
            return None
        old = epoch - every * keep
        return old if old > 0 else None

    def rotate_states_for_step(self, step: int) -> None:
        if self.session.world.is_main:
            self._mark(self.state_folder_for_step(step).name)  # the loop saved it just before
        self._drop_old_steps(step, "-state", lambda p: shutil.rmtree(p, ignore_errors=True),
                             self.config.save_last_n_steps_state or self.config.save_last_n_steps)

    def _drop_old_steps(self, step: int, suffix: str, remove, keep: int | None = None) -> None:
        """--save_last_n_steps N: keep what was saved in the last N steps, the save N steps ago included (as
        sd-scripts). Only this training's saves are candidates (`written`), as `<name>-stepNNNNNNNN<suffix>`
        exactly."""
        keep = self.config.save_last_n_steps if keep is None else keep
        if not keep or not self.session.world.is_main:
            return
        prefix = f"{self.name}-step"
        for name in list(self.written):
            digits = name[len(prefix):-len(suffix)]
            if (name.startswith(prefix) and name.endswith(suffix) and len(digits) == 8 and digits.isascii()
                    and digits.isdigit() and int(digits) < step - keep):
                self._remove(self.folder / name, remove)

    # ------------------------------------------------------------------------------------------ metadata

    def metadata(self, step: int, epoch: int) -> dict[str, str]:
        c, s = self.config, self.session
        summaries = [d.summary() for d in s.datasets.datasets]
        training = {
            "ss_output_name": c.output_name or "", "ss_learning_rate": c.learning_rate, "ss_unet_lr": c.unet_lr,
            "ss_text_encoder_lr": list(c.text_encoder_lr) if c.text_encoder_lr else c.learning_rate,
            "ss_num_train_images": sum(x["num_train_images"] for x in summaries),
            "ss_num_reg_images": sum(x["num_reg_images"] for x in summaries),
            "ss_num_batches_per_epoch": len(s.datasets), "ss_num_epochs": s.epochs,
            "ss_gradient_checkpointing": c.gradient_checkpointing,
            "ss_gradient_accumulation_steps": c.gradient_accumulation_steps, "ss_max_train_steps": s.total_steps,
            "ss_lr_warmup_steps": c.lr_warmup_steps, "ss_lr_scheduler": c.lr_scheduler,
            "ss_mixed_precision": c.mixed_precision, "ss_full_fp16": c.full_fp16, "ss_seed": s.seed,
            "ss_optimizer": (c.optimizer_type or "AdamW")
                            + (f"({','.join(c.optimizer_args)})" if c.optimizer_args else ""),
            "ss_max_grad_norm": c.max_grad_norm, "ss_prior_loss_weight": c.prior_loss_weight,
            "ss_caption_dropout_rate": _first(s, "caption_dropout_rate"),
            "ss_caption_tag_dropout_rate": _first(s, "caption_tag_dropout_rate"),
            "ss_loss_type": c.flow.loss_type, "ss_huber_schedule": c.flow.huber_schedule, "ss_huber_c": c.flow.huber_c,
            "ss_huber_scale": c.flow.huber_scale, "ss_fp8_base": c.fp8_base, "ss_fp8_base_unet": c.fp8_base_unet,
            "ss_apply_t5_attn_mask": c.apply_t5_attn_mask, "ss_weighting_scheme": c.flow.weighting_scheme,
            "ss_logit_mean": c.flow.logit_mean, "ss_logit_std": c.flow.logit_std, "ss_mode_scale": c.flow.mode_scale,
            "ss_guidance_scale": c.flow.guidance_scale, "ss_timestep_sampling": c.flow.timestep_sampling,
            "ss_sigmoid_scale": c.flow.sigmoid_scale, "ss_model_prediction_type": c.flow.model_prediction_type,
            "ss_discrete_flow_shift": c.flow.discrete_flow_shift, "ss_steps": step, "ss_epoch": epoch,
            "ss_training_finished_at": time.time(), "ss_training_comment": c.training_comment or "",
            "ss_num_validation_images": sum(len(d.held_out) for d in s.datasets.datasets),
            "ss_validation_seed": c.validation_seed if c.validation_seed is not None else s.seed,
            "ss_validation_split": c.validation_split, "ss_max_validation_steps": c.max_validation_steps,
            "ss_datasets": json.dumps(summaries),
            "ss_tag_frequency": json.dumps({k: v for x in summaries for k, v in x["tag_frequency"].items()}),
            "ss_dataset_dirs": json.dumps({k: v for x in summaries for k, v in x["dataset_dirs"].items()}),
        }
        resolution = s.datasets.datasets[0].config.resolution
        meta = lora_metadata(c.network, s.flux.params.variant, c.metadata_title or c.output_name, resolution,
                             {k: v if isinstance(v, str) else json.dumps(v) if isinstance(v, (list, dict)) else str(v)
                              for k, v in training.items()}, timestamp=self.started)
        for option in MODELSPEC_OPTIONS:
            value = getattr(c, f"metadata_{option}")
            if value is not None:
                meta[f"modelspec.{option}"] = value
        if c.no_metadata:  # sd-scripts: only the keys a loader needs, and the model spec
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
