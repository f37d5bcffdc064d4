"""Every option of sd-scripts' flux_train_network.py parser (tests/reference/sd_scripts_flux_train_network_options.json,
taken from its own setup_parser()) parses with a value of its type and lands where it should: in the config field of
its name, in what the command line does with it, in one warning saying why it does nothing here, or in a clear
refusal."""

import dataclasses
import json
from pathlib import Path

import pytest

from trainer.cli import ACTING, build_parser, config_from_args
from trainer.cli_options import NO_EFFECT, REFUSED, SD_SCRIPTS_GROUPS
from trainer.config import FLAG_SECTIONS, FlowConfig, LoRAConfig, TrainConfig
from trainer.errors import ConfigError

OPTIONS = json.loads((Path(__file__).parent / "reference" / "sd_scripts_flux_train_network_options.json")
                     .read_text())["options"]
BASE = ["--pretrained_model_name_or_path", "f.safetensors", "--clip_l", "c.safetensors", "--t5xxl", "t.safetensors",
        "--ae", "a.safetensors", "--train_data_dir", "images", "--resolution", "512"]
# options whose value must be one of a set, or that need a companion option to be valid
VALUES = {
    "mixed_precision": ["bf16"], "save_precision": ["bf16"], "lr_scheduler": ["cosine"], "log_with": ["tensorboard"],
    "loss_type": ["l1"], "huber_schedule": ["constant"], "weighting_scheme": ["logit_normal"],
    "timestep_sampling": ["shift"], "model_prediction_type": ["additive"], "save_model_as": ["safetensors"],
    "optimizer_type": ["Lion"], "network_module": ["networks.lora_flux"], "resume": None,
    "network_args": ["conv_dim=4", "train_blocks=single", "ggpo_sigma=0.03", "colour=1"],
    "optimizer_args": ["weight_decay=0.1"],
    "lr_scheduler_args": ["T_max=10"], "text_encoder_lr": ["0.5", "0.25"], "base_weights": ["a.safetensors"],
    "base_weights_multiplier": ["0.5"], "dataset_config": None, "train_data_dir": ["other"],
    "resolution": ["640,384"], "resize_interpolation": ["bicubic"], "dynamo_backend": ["eager"],
    "face_crop_aug_range": ["2.0,4.0"], "console_log_level": ["INFO"], "model_type": ["flux"],
    "sample_sampler": ["euler"], "lr_warmup_steps": ["10%"], "lr_decay_steps": ["0.2"], "blocks_to_swap": ["4"],
    "validation_split": ["0.25"], "caption_dropout_rate": ["0.25"], "caption_tag_dropout_rate": ["0.25"],
    "lr_scheduler_min_lr_ratio": ["0.25"], "config_file": None, "output_config": None, "zero_stage": ["3"],
}
COMPANIONS = {"fp8_base": ["--mixed_precision", "bf16"], "fp8_base_unet": ["--mixed_precision", "bf16"],
              "full_fp16": ["--mixed_precision", "fp16"], "full_bf16": ["--mixed_precision", "bf16"],
              "cpu_offload_checkpointing": ["--gradient_checkpointing"], "base_weights_multiplier":
              ["--base_weights", "a.safetensors"],
              # upload settings act in sd-scripts only with a repository to upload to
              **{name: ["--huggingface_repo_id", "me/lora"] for name in (
                  "huggingface_repo_type", "huggingface_path_in_repo", "huggingface_token",
                  "huggingface_repo_visibility", "save_state_to_huggingface", "async_upload")}}
# what an acting command-line option does to the config
ACTS = {
    "caption_extention": lambda c: c.data.caption_extension == "v",
    "use_8bit_adam": lambda c: c.optimizer.optimizer_type == "AdamW8bit",
    "use_lion_optimizer": lambda c: c.optimizer.optimizer_type == "Lion",
    "network_args": lambda c: c.network.train_blocks == "single",
    "network_module": lambda c: isinstance(c.network, LoRAConfig),
    "split_mode": lambda c: c.memory.blocks_to_swap == 18,
}
TYPED = {"int": "3", "float": "0.5", "str": "v"}


def value_words(option: dict) -> list[str]:
    name = option["dest"]
    if name in VALUES:
        return VALUES[name]
    if option["nargs"] == 0:
        return []
    if option["choices"]:
        return [str(next(c for c in option["choices"] if c is not None))]
    return [TYPED[option["type"]]]


def where(config: TrainConfig, name: str):
    if name in FLAG_SECTIONS:
        return getattr(getattr(config, FLAG_SECTIONS[name]), name)
    for holder in (config.flow, config.network):
        if name in {f.name for f in dataclasses.fields(holder)}:
            return getattr(holder, name)
    raise AssertionError(f"{name} is not a config field")


def field_names() -> set[str]:
    return {*FLAG_SECTIONS, *(f.name for cls in (FlowConfig, LoRAConfig) for f in dataclasses.fields(cls))}


def test_the_reference_list_is_sd_scripts_whole_parser():
    assert len(OPTIONS) == 215
    grouped = [name for _, names in SD_SCRIPTS_GROUPS for name in names]
    assert grouped == [o["dest"] for o in OPTIONS], "--help groups follow sd-scripts' parser order, each option once"


@pytest.mark.parametrize("option", [o for o in OPTIONS if VALUES.get(o["dest"], 1) is not None],
                         ids=lambda o: o["dest"])
def test_each_option_parses_and_lands(option):
    name = option["dest"]
    argv = BASE + COMPANIONS.get(name, []) + [option["opts"][0], *value_words(option)]
    if name == "train_data_dir":
        argv = [w for w in argv if w != "images"]
        argv.remove("--train_data_dir")
        argv += ["--train_data_dir", "other"]
    ns = build_parser().parse_args(argv)
    assert name in vars(ns), f"{name} did not reach the namespace"
    warnings = []
    if name in REFUSED:
        with pytest.raises(ConfigError, match=f"--{name} is not supported"):
            config_from_args(ns, warn=warnings.append)
        return
    config = config_from_args(ns, warn=warnings.append)
    if name in NO_EFFECT:
        assert [w for w in warnings if w.startswith(f"--{name} has no effect here: ")], warnings
    elif name in ACTS:
        assert ACTS[name](config), f"--{name} did not act"
        if name == "network_args":  # sd-scripts ignores keys its network does not take; so do we, saying so
            assert any("conv_dim is not supported here (FLUX's blocks have no convolutions)" in w for w in warnings)
            assert config.network.ggpo_sigma == 0.03  # GGPO applies: parsed, not warned about
            assert not any(w.startswith("network_args: ggpo_sigma") for w in warnings), warnings
            assert any("unknown key 'colour', ignored" in w for w in warnings), warnings
    elif name in field_names():
        landed = where(config, name)
        given = ns.__dict__[name]
        expected = tuple(given) if isinstance(given, list) else given
        if name == "text_encoder_lr":
            expected = (0.5, 0.25)
        assert landed == expected, f"{name}: config has {landed!r}, the command line gave {given!r}"
    else:
        assert name in ACTING, f"{name}: neither a field, acting, without effect nor refused"


def test_every_option_is_accounted_for():
    for option in OPTIONS:
        name = option["dest"]
        kinds = [name in field_names(), name in NO_EFFECT, name in REFUSED, name in ACTING]
        assert sum(kinds) == 1, f"{name} is {kinds} (field, no effect, refused, acting)"


def test_no_effect_options_at_their_default_say_nothing():
    warnings = []
    config_from_args(build_parser().parse_args(BASE + ["--zero_stage", "2", "--multires_noise_discount", "0.3",
                                                       "--noise_offset", "0"]), warn=warnings.append)
    assert warnings == []
