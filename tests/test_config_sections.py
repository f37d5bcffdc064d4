"""TrainConfig is composed of frozen sections (trainer/config/sections.py), each checking its own values; one table
(FLAG_SECTIONS) places sd-scripts' flat option names into them; torch-free."""

import dataclasses

import pytest

from trainer.block_swap import swap_plan
from trainer.cli import option_fields
from trainer.config import FLAG_SECTIONS, SECTIONS, DatasetConfig, FlowConfig, LoRAConfig, SubsetConfig, TrainConfig
from trainer.config.memory_plan import FLUX_DEV, streamed_blocks
from trainer.config.sections import DataConfig, MemoryConfig, OptimizerConfig, SavingConfig
from trainer.config.swap_split import MAX_SWAPPED_BLOCKS, freed_blocks
from trainer.errors import ConfigError

FILES = dict(pretrained_model_name_or_path="f.safetensors", clip_l="c.safetensors", t5xxl="t.safetensors",
             ae="a.safetensors", dataset_config="d.toml")


def test_every_flat_option_belongs_to_exactly_one_section():
    placed = [f.name for cls in SECTIONS.values() for f in dataclasses.fields(cls)]
    assert len(placed) == len(set(placed)) == len(FLAG_SECTIONS)
    cli_fields = {f.name for f in option_fields()}
    nested = {f.name for cls in (FlowConfig, LoRAConfig) for f in dataclasses.fields(cls)}
    assert cli_fields - nested == set(FLAG_SECTIONS) - {"datasets", "sample_prompt_lines"}  # typed values, no flag


def test_from_flags_places_each_option_in_its_section_and_flags_gives_them_back():
    config = TrainConfig.from_flags(**FILES, learning_rate=3e-4, blocks_to_swap=8, save_every_n_steps=5,
                                    sample_at_first=True, seed=7, cache_latents_to_disk=True)
    assert (config.optimizer.learning_rate, config.memory.blocks_to_swap, config.saving.save_every_n_steps,
            config.previews.sample_at_first, config.run.seed) == (3e-4, 8, 5, True, 7)
    assert config.caching.cache_latents  # the _to_disk form implies it, in its section
    again = TrainConfig.from_flags(network=config.network, flow=config.flow, **config.flags())
    assert again == config


def test_an_unknown_flat_option_is_refused_by_name():
    with pytest.raises(ConfigError, match="^learnig_rate: not a training option"):
        TrainConfig.from_flags(**FILES, learnig_rate=1e-4)


def test_sections_are_frozen_and_with_flags_checks_the_copy():
    config = TrainConfig.from_flags(**FILES)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.optimizer.learning_rate = 1.0
    assert config.with_flags(learning_rate=5e-5).optimizer.learning_rate == 5e-5
    assert config.optimizer.learning_rate == 2e-6  # sd-scripts' default, unchanged
    with pytest.raises(ConfigError, match="blocks_to_swap: expected 0-35"):
        config.with_flags(blocks_to_swap=36)


@pytest.mark.parametrize("section, values, message", [
    (OptimizerConfig, dict(learning_rate=-1.0), "learning_rate, max_grad_norm and lr_warmup_steps must not be"),
    (MemoryConfig, dict(fp8_base=True), "fp8_base needs --mixed_precision"),
    (SavingConfig, dict(output_name="../x"), "output_name"),
    (DataConfig, dict(), "no training data"),
])
def test_each_section_checks_its_own_values_without_the_rest(section, values, message):
    with pytest.raises(ConfigError, match=message):
        section(**values)


def test_checks_across_sections_stay_on_the_whole_config():
    with pytest.raises(ConfigError, match="base_weights are merged"):
        TrainConfig.from_flags(**FILES, base_weights=("b.safetensors",), fp8_base=True, mixed_precision="bf16")
    with pytest.raises(ConfigError, match="train_t5xxl trains T5 itself"):
        TrainConfig.from_flags(**FILES, network=LoRAConfig(train_t5xxl=True), cache_text_encoder_outputs=True)


def test_the_command_line_dataset_defaults_are_the_datasets_own():
    data = {f.name: f.default for f in dataclasses.fields(DataConfig)}
    shared = [(f.name, f.default) for cls in (SubsetConfig, DatasetConfig) for f in dataclasses.fields(cls)
              if f.name in data and f.name != "resolution"]  # a dataset's resolution is required: none to fall back on
    assert len(shared) >= 25
    assert [(name, data[name]) for name, _ in shared] == shared


@pytest.mark.parametrize("blocks", range(MAX_SWAPPED_BLOCKS + 1))
def test_one_split_of_blocks_to_swap_for_the_runner_and_the_memory_plan(blocks):
    double, single = freed_blocks(blocks)
    assert (double, single) == (min(blocks // 2, 17), min((blocks - blocks // 2) * 2, 36))  # sd-scripts' formula
    plan = swap_plan(blocks, FLUX_DEV.double_count, FLUX_DEV.single_count, slots=2)
    assert (plan.double, plan.single) == streamed_blocks(blocks, FLUX_DEV, slots=2)
