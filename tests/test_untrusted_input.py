"""Values a shared workflow, a config file or a command line can hold that must be refused before anything runs:
regular expressions with unbounded matching work, NaN and infinity in any number, seeds past 64 bits, and
--lr_warmup_steps written the way sd-scripts' parser refuses."""

import math

import pytest

from trainer.cli import build_parser, config_from_args
from trainer.config import DatasetConfig, FlowConfig, LoRAConfig, SubsetConfig, TrainConfig
from trainer.config.data import datasets_from_dict
from trainer.errors import ConfigError, DatasetConfigError, LoRAConfigError

FILES = dict(pretrained_model_name_or_path="flux.safetensors", clip_l="clip_l.safetensors", t5xxl="t5.safetensors",
             ae="ae.safetensors", train_data_dir="images")
ARGV = ["--pretrained_model_name_or_path", "f.safetensors", "--clip_l", "c.safetensors", "--t5xxl", "t.safetensors",
        "--ae", "a.safetensors", "--train_data_dir", "images"]


def config(**overrides) -> TrainConfig:
    return TrainConfig.from_flags(**{**FILES, **overrides})


# ------------------------------------------------------------------------------------------ regular expressions

@pytest.mark.parametrize("key", ["network_reg_dims", "network_reg_lrs"])
def test_the_issues_catastrophic_pattern_is_refused_naming_key_and_pattern(key):
    value = "4" if key == "network_reg_dims" else "1e-4"
    with pytest.raises(LoRAConfigError) as raised:
        LoRAConfig.from_network_args([rf"{key}=^(\w+)+!={value}"])
    message = str(raised.value)
    assert message.startswith(f"{key}: pattern '^(\\\\w+)+!' is refused") and "inside another repeat" in message


@pytest.mark.parametrize("pattern, why", [
    (r"(a|ab)+x", "alternation (a|bc) inside a repeat"),
    (r"(a?){30}a{30}", "inside another repeat"),
    (r"(\w+)_\1", "refers back to a group"),
    (r".*.*.*.*!", "too many ways"),
    (r"(?:x\d*){2,}", "inside another repeat"),
])
def test_patterns_whose_matching_is_not_bounded_are_refused(pattern, why):
    with pytest.raises(LoRAConfigError, match="network_reg_dims: pattern .* is refused") as raised:
        LoRAConfig(network_reg_dims=((pattern, 4),))
    assert why in str(raised.value)


@pytest.mark.parametrize("pattern", [
    ".*single_blocks.*", r"lora_unet_double_blocks_\d+_img_attn.*", "(q|k|v)_proj", r".*blocks_(\d+)_.*",
    "(img|txt)_attn", r"^lora_unet_(double|single)_blocks_[0-9]+_.*", "double_blocks_(0|1|2|10)_", "linear1$",
    r"(?!.*txt).*attn", r"(?:_\d){2}", "lora_te1_", "mlp_0|mlp_2",
])
def test_patterns_sd_scripts_users_write_are_kept(pattern):
    network = LoRAConfig.from_network_args([f"network_reg_dims={pattern}=8", f"network_reg_lrs={pattern}=1e-4"])
    assert network.network_reg_dims == ((pattern, 8),) and network.network_reg_lrs == ((pattern, 1e-4),)


def test_pattern_count_and_length_are_bounded():
    with pytest.raises(LoRAConfigError, match="network_reg_lrs: 65 patterns; at most 64"):
        LoRAConfig(network_reg_lrs=tuple((f"block_{i}", 1e-4) for i in range(65)))
    with pytest.raises(LoRAConfigError, match=r"network_reg_dims: pattern 'a+'\.\.\. is 501 characters long"):
        LoRAConfig(network_reg_dims=(("a" * 501, 4),))


def test_a_pair_that_cannot_be_read_says_what_the_key_takes():
    with pytest.raises(LoRAConfigError, match="network_reg_dims='single': expected comma-separated pattern=value"):
        LoRAConfig.from_network_args(["network_reg_dims=single"])


def test_a_bad_pattern_is_still_named_as_invalid():
    with pytest.raises(LoRAConfigError, match=r"network_reg_dims: '\(' is not a valid regular expression"):
        LoRAConfig(network_reg_dims=(("(", 4),))


# ------------------------------------------------------------------------------------------ NaN and infinity

NAN, INF = math.nan, math.inf


@pytest.mark.parametrize("option, value", [
    ("learning_rate", NAN), ("max_grad_norm", NAN), ("unet_lr", INF), ("lr_warmup_steps", NAN),
    ("lr_scheduler_power", NAN), ("lr_scheduler_min_lr_ratio", NAN), ("prior_loss_weight", -INF),
    ("scale_weight_norms", NAN), ("token_warmup_step", INF), ("validation_split", NAN),
])
def test_nonfinite_train_options_are_refused_by_name(option, value):
    with pytest.raises(ConfigError, match=rf"^{option} {value}: expected a finite number"):
        config(**{option: value})


def test_nonfinite_values_inside_lists_and_arguments_are_named():
    with pytest.raises(ConfigError, match=r"text_encoder_lr\[1\] nan: expected a finite number"):
        config(text_encoder_lr=(1e-5, NAN))
    with pytest.raises(ConfigError, match=r"optimizer_args betas\[1\] inf: expected a finite number"):
        config(optimizer_args=("betas=(0.9,1e999)",))
    with pytest.raises(ConfigError, match="lr_scheduler_args num_cycles inf"):
        config(lr_scheduler="cosine", lr_scheduler_args=("num_cycles=1e999",))
    with pytest.raises(ConfigError, match=r"base_weights_multiplier\[0\] nan"):
        config(base_weights=("a.safetensors",), base_weights_multiplier=(NAN,))


@pytest.mark.parametrize("option", ["discrete_flow_shift", "sigmoid_scale", "guidance_scale", "huber_c"])
def test_nonfinite_flow_options_are_refused_by_name(option):
    with pytest.raises(ConfigError, match=rf"^{option} nan: expected a finite number"):
        config(flow=FlowConfig(**{option: NAN}))


@pytest.mark.parametrize("option", ["network_alpha", "network_dropout", "rank_dropout", "module_dropout",
                                    "loraplus_lr_ratio"])
def test_nonfinite_network_options_are_refused_by_name(option):
    for value in (NAN, INF):
        with pytest.raises(LoRAConfigError, match=rf"^{option} {value}: expected a finite number"):
            LoRAConfig(**{option: value})
    with pytest.raises(LoRAConfigError, match=r"network_reg_lrs\[0\]\[1\] inf"):
        LoRAConfig.from_network_args(["network_reg_lrs=single=inf"])


def test_nonfinite_dataset_values_are_refused_by_key():
    with pytest.raises(DatasetConfigError, match="'network_multiplier' = nan: expected a finite number"):
        DatasetConfig(resolution=(64, 64), network_multiplier=NAN, subsets=(SubsetConfig(image_dir="x"),))
    with pytest.raises(DatasetConfigError, match=r"\[general\]: 'network_multiplier' = inf: expected a finite"):
        datasets_from_dict({"datasets": [{"resolution": 64, "subsets": [{"image_dir": "x"}]}],
                            "general": {"network_multiplier": INF}})
    with pytest.raises(DatasetConfigError, match="'token_warmup_step' = .*: expected a finite number"):
        SubsetConfig(image_dir="x", token_warmup_step=10**400)


@pytest.mark.parametrize("flag", ["--max_grad_norm", "--learning_rate", "--network_alpha", "--discrete_flow_shift"])
def test_nonfinite_command_line_values_are_refused_by_name(flag):
    with pytest.raises((ConfigError, LoRAConfigError), match=rf"{flag[2:]} nan: expected a finite number"):
        config_from_args(build_parser().parse_args(ARGV + [flag, "nan"]), warn=lambda text: None)


# ------------------------------------------------------------------------------------------ seeds

@pytest.mark.parametrize("option", ["seed", "validation_seed"])
def test_seeds_past_64_bits_are_refused_by_name(option):
    with pytest.raises(ConfigError, match=rf"^{option}: expected a whole number from -9223372036854775808 to "
                                          "9223372036854775807"):
        config(**{option: 2**64})
    assert config(**{option: 2**63 - 1}).flags()[option] == 2**63 - 1
    assert config(seed=-1).run.seed == -1  # negative seeds work in torch and stay accepted


def test_a_dataset_validation_seed_past_64_bits_is_refused():
    with pytest.raises(DatasetConfigError, match="'validation_seed' = 18446744073709551616"):
        DatasetConfig(resolution=(64, 64), validation_seed=2**64, subsets=(SubsetConfig(image_dir="x"),))


# ------------------------------------------------------------------------------------------ warmup steps

@pytest.mark.parametrize("text", ["50.0", "1e2", "1.5", "1.0"])
def test_warmup_written_as_sd_scripts_refuses_it_is_refused(text):
    with pytest.raises(ConfigError, match=r"lr_warmup_steps .*: a number from 1 up is a count of steps and must be a "
                                          "whole number"):
        config_from_args(build_parser().parse_args(ARGV + ["--lr_warmup_steps", text]), warn=lambda text: None)


@pytest.mark.parametrize("text, value", [("50", 50), ("0.5", 0.5), ("10%", 0.1), ("0", 0)])
def test_warmup_sd_scripts_accepts_is_kept(text, value):
    c = config_from_args(build_parser().parse_args(ARGV + ["--lr_warmup_steps", text, "--lr_decay_steps", text]),
                         warn=lambda text: None)
    assert c.optimizer.lr_warmup_steps == pytest.approx(value) and type(c.optimizer.lr_warmup_steps) is type(value)
    assert c.optimizer.lr_decay_steps == pytest.approx(value)


def test_warmup_message_says_what_to_write():
    with pytest.raises(ConfigError, match="lr_warmup_steps 50: .*; write 50 for 50 steps, or a ratio of the run below "
                                          "1"):
        config(lr_warmup_steps=50.0)
    with pytest.raises(ConfigError, match="lr_decay_steps 1.5: .*; write a whole number of steps"):
        config(lr_decay_steps=1.5)


@pytest.mark.parametrize("option", ["max_train_steps", "ddp_timeout", "save_every_n_steps", "lr_scheduler_num_cycles"])
def test_whole_numbers_past_64_bits_are_refused_by_name(option):
    with pytest.raises(ConfigError, match=rf"^{option} 10000000000000000000\.\.\. \(31 digits\): expected a finite "
                                          "number, and a whole number within 64 bits"):
        config(**{option: 10**30})


def test_a_ddp_timeout_the_clock_cannot_hold_is_refused():
    with pytest.raises(ConfigError, match="ddp_timeout: at most 1000000 minutes"):
        config(ddp_timeout=2**62)
    assert config(ddp_timeout=1_000_000).distributed.ddp_timeout == 1_000_000
