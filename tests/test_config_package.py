"""`trainer.config`: one torch-free source of every option, default, choice and check; the CLI parser is built
from it, and mistakes that need no file fail when the config is made."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.cli import CLI_ONLY, build_parser, config_from_args, option_fields
from trainer.config import (
    FLAG_SECTIONS,
    DatasetConfig,
    FlowConfig,
    LoRAConfig,
    SubsetConfig,
    TrainConfig,
    resolve_datasets,
    single_folder_dataset,
)
from trainer.errors import (
    CaptionError,
    ConfigError,
    DatasetConfigError,
    DatasetError,
    LoRAConfigError,
    LoRAWeightsError,
    ModelFileError,
    PromptFileError,
    StateError,
    Stopped,
    TrainerError,
)

REPO = Path(__file__).resolve().parents[1]
MODELS = dict(pretrained_model_name_or_path="flux.safetensors", clip_l="clip.safetensors", t5xxl="t5.safetensors",
              ae="ae.safetensors")
REQUIRED_ARGV = [f"--{k}={v}" for k, v in MODELS.items()] + ["--dataset_config", "d.toml"]


def make(**overrides) -> TrainConfig:
    return TrainConfig.from_flags(**{**MODELS, "dataset_config": "d.toml", **overrides})


def test_config_and_cli_parser_import_no_torch():
    code = ("import sys, trainer.config, trainer.cli; trainer.cli.build_parser(); "
            "print(sorted(m for m in ('torch', 'numpy', 'PIL', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert out.strip() == "[]"


def test_every_field_has_a_flag_and_every_flag_a_field_or_a_reason():
    parser = build_parser()
    flags = {a.dest for a in parser._actions if a.dest != "help"}
    fields = {f.name for f in option_fields()}
    assert set(FLAG_SECTIONS) - {"datasets", "sample_prompt_lines"} <= fields
    assert {f.name for f in dataclasses.fields(FlowConfig)} <= fields
    assert fields <= flags, f"fields without a flag: {sorted(fields - flags)}"
    assert flags - fields == set(CLI_ONLY), f"flags without a field: {sorted(flags - fields - set(CLI_ONLY))}"


def test_defaults_are_written_once_in_the_dataclasses():
    ns = build_parser().parse_args(REQUIRED_ARGV)
    given = {f.name for f in option_fields()} & set(vars(ns))
    assert given == set(MODELS) | {"dataset_config"}, "the parser holds defaults of its own"
    config = config_from_args(ns, warn=lambda text: None)
    assert config == make() and config.flow == FlowConfig() and config.network == LoRAConfig()
    changed = config_from_args(build_parser().parse_args(REQUIRED_ARGV + [
        "--network_dim", "8", "--guidance_scale", "1", "--learning_rate", "1e-4", "--network_args", "split_qkv=True"]))
    assert (changed.network.network_dim, changed.network.network_alpha, changed.network.split_qkv) == (8, 1.0, True)
    assert changed.flow.guidance_scale == 1.0 and changed.optimizer.learning_rate == 1e-4


def test_model_files_are_required():
    with pytest.raises(TypeError):
        TrainConfig.from_flags(dataset_config="d.toml")
    with pytest.raises(ConfigError, match="ae: a model file is required"):
        make(ae=" ")


@pytest.mark.parametrize("overrides, message", [
    (dict(optimizer_type="AdamW9bit"), "optimizer_type 'AdamW9bit' is unknown; expected one of AdamW, AdamW8bit"),
    (dict(optimizer_args=("weight_decay",)), "optimizer_args: 'weight_decay' is not of the form key=value"),
    (dict(text_encoder_lr=(1e-5, 2e-5, 3e-5)), "text_encoder_lr: expected one value"),
    (dict(lr_scheduler="cosine_annealing"), "lr_scheduler: expected one of constant"),
    (dict(lr_scheduler="adafactor"), "needs --optimizer_type Adafactor"),
    (dict(lr_scheduler_min_lr_ratio=1.5), "lr_scheduler_min_lr_ratio: expected a number between 0 and 1"),
    (dict(lr_scheduler_power=0.0), "lr_scheduler_power: expected a positive number"),
    (dict(log_with="mlflow"), "log_with: expected one of tensorboard, wandb, all"),
    (dict(train_data_dir="images"), "training data given twice"),
])
def test_mistakes_that_need_no_file_fail_at_construction(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        make(**overrides)


def test_optimizer_names_are_case_blind_and_dotted_paths_pass():
    assert make(optimizer_type="adamw8bit").optimizer.optimizer_type == "adamw8bit"
    assert make(optimizer_type="torch.optim.RAdam", lr_scheduler="cosine").optimizer.lr_scheduler == "cosine"
    assert make(optimizer_type="Adafactor", lr_scheduler="adafactor",
                optimizer_args=("relative_step=True",)).optimizer.optimizer_args == ("relative_step=True",)


def test_flow_options_are_checked_with_the_error_root():
    with pytest.raises(ConfigError, match="timestep_sampling: expected one of sigma"):
        FlowConfig(timestep_sampling="logit")


def test_every_user_error_shares_one_root():
    for error in (ConfigError, LoRAConfigError, LoRAWeightsError, DatasetConfigError, DatasetError, CaptionError,
                  ModelFileError, PromptFileError, StateError, Stopped):
        assert issubclass(error, TrainerError)


def test_the_cli_reports_user_errors_in_one_line_and_lets_bugs_raise(monkeypatch, capsys):
    from trainer import cli

    assert cli.main(REQUIRED_ARGV + ["--optimizer_type", "Nope"]) == 2
    assert capsys.readouterr().err.startswith("error: optimizer_type 'Nope' is unknown")

    def bug(*args, **kwargs):
        raise ValueError("a bug, not bad input")

    monkeypatch.setattr(cli, "config_from_args", bug)
    with pytest.raises(ValueError, match="a bug"):
        cli.main(REQUIRED_ARGV)


def test_advice_comes_from_the_core():
    assert any("guidance_scale 3.5" in note for note in make().advice())
    assert make(flow=FlowConfig(guidance_scale=1.0)).advice() == []
    assert TrainConfig.recommended(**MODELS, dataset_config="d.toml").advice() == []


# ------------------------------------------------------------------------------------------------ datasets


def test_typed_datasets_are_checked_like_toml_values(tmp_path):
    with pytest.raises(DatasetConfigError, match="'caption_dropout_rate' = 1.5: expected a number between 0 and 1"):
        SubsetConfig(image_dir="x", caption_dropout_rate=1.5)
    with pytest.raises(DatasetConfigError, match="'resolution' is required"):
        DatasetConfig(subsets=(SubsetConfig(image_dir="x"),))
    with pytest.raises(DatasetConfigError, match="'bucket_reso_steps' = 40: FLUX needs a multiple of 16"):
        single_folder_dataset("x", 512, enable_bucket=True, bucket_reso_steps=40)
    with pytest.raises(DatasetConfigError, match="each subset needs 'image_dir'"):
        DatasetConfig(resolution=(64, 64), subsets=(SubsetConfig(),))
    assert DatasetConfig(resolution=512, subsets=[SubsetConfig(image_dir="x")]).resolution == (512, 512)
    toml = tmp_path / "d.toml"
    toml.write_text('[[datasets]]\nresolution = 512\nenable_bucket = true\nbucket_reso_steps = 40\n'
                    '[[datasets.subsets]]\nimage_dir = "x"\n')
    with pytest.raises(DatasetConfigError, match=r"d.toml \[\[datasets\]\] #1: 'bucket_reso_steps' = 40"):
        resolve_datasets(make(dataset_config=str(toml)))


def test_one_function_resolves_every_kind_of_dataset_source(tmp_path):
    typed = (single_folder_dataset(tmp_path, 512, batch_size=2), single_folder_dataset(tmp_path, 768))
    assert resolve_datasets(make(dataset_config=None, datasets=typed)) == list(typed)
    toml = tmp_path / "d.toml"
    toml.write_text(f'[general]\nbatch_size = 3\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{tmp_path}"\n')
    (from_toml,) = resolve_datasets(make(dataset_config=str(toml), resolution=(640, 640), train_batch_size=5))
    assert from_toml.resolution == (640, 640) and from_toml.batch_size == 3  # file > command line > default
    (tmp_path / "4_sks").mkdir()
    (folder,) = resolve_datasets(make(dataset_config=None, train_data_dir=str(tmp_path), resolution=(512, 512),
                                      train_batch_size=2))
    assert [(s.num_repeats, s.class_tokens) for s in folder.subsets] == [(4, "sks")] and folder.batch_size == 2


def test_the_readme_dataset_example_reads_as_described():
    import re

    from trainer.config import datasets_from_dict
    from trainer.tomlio import loads

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    (example,) = re.findall(r"```toml\n(.*?)```", readme, flags=re.S)
    first, second = datasets_from_dict(loads(example))
    assert (first.resolution, first.batch_size) == ((1024, 1024), 2)
    assert (second.resolution, second.batch_size) == ((512, 512), 4)
    assert first.subsets[0].keep_tokens == 1 and first.subsets[1].is_reg and first.max_bucket_reso == 1536
