"""A small training workspace: tiny models in the real layouts, a generated captioned dataset, a dataset TOML."""

from __future__ import annotations

from pathlib import Path

from trainer.config import TrainConfig
from trainer.demo import write_dataset
from trainer.flow import FlowConfig
from trainer.lora import LoRAConfig
from trainer.models.tiny import write_model_set


def make_workspace(root: Path, batch_size: int = 2, repeats: int = 1) -> dict[str, Path]:
    files = write_model_set(root / "models")
    write_dataset(root / "dataset")
    toml = root / "dataset.toml"
    toml.write_text(f'[general]\ncaption_extension = ".txt"\n[[datasets]]\nresolution = 64\nbatch_size = {batch_size}\n'
                    f'[[datasets.subsets]]\nimage_dir = "{(root / "dataset").as_posix()}"\nnum_repeats = {repeats}\n')
    return {**files, "toml": toml, "root": root}


def config(ws: dict[str, Path], tokenizers: dict[str, Path], out: Path, **overrides) -> TrainConfig:
    base = dict(pretrained_model_name_or_path=str(ws["flux"]), clip_l=str(ws["clip_l"]), t5xxl=str(ws["t5xxl"]),
                ae=str(ws["ae"]), clip_l_tokenizer=str(tokenizers["clip_l"]), t5xxl_tokenizer=str(tokenizers["t5xxl"]),
                t5xxl_max_token_length=16, device="cpu", dataset_config=str(ws["toml"]),
                network=LoRAConfig(network_dim=4, network_alpha=4, network_train_unet_only=True),
                flow=FlowConfig(guidance_scale=1.0, model_prediction_type="raw", timestep_sampling="flux_shift"),
                learning_rate=2e-3, max_train_steps=8, seed=3, cache_latents=True, cache_text_encoder_outputs=True,
                output_dir=str(out), output_name="test_lora")
    base.update(overrides)
    return TrainConfig.from_flags(**base)


def cli_args(ws: dict[str, Path], tokenizers: dict[str, Path], out: Path) -> list[str]:
    return ["--pretrained_model_name_or_path", str(ws["flux"]), "--clip_l", str(ws["clip_l"]),
            "--t5xxl", str(ws["t5xxl"]),
            "--ae", str(ws["ae"]), "--clip_l_tokenizer", str(tokenizers["clip_l"]), "--t5xxl_tokenizer",
            str(tokenizers["t5xxl"]), "--t5xxl_max_token_length", "16", "--device", "cpu",
            "--dataset_config", str(ws["toml"]), "--output_dir", str(out)]
